"""Pictures of a run: PNG plots drawn from train.jsonl.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global figure state), so
they can be redrawn at every eval from inside the trainer. Each PNG is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pretrain.track.runlog import JSONL_NAME, read_jsonl

# File stem -> title; also the order summary.md lists them in.
PLOT_TITLES = {
    "loss": "Loss vs tokens (train and val)",
    "lr": "Learning rate",
    "throughput": "Throughput (tok/s)",
    "grad_norm": "Gradient norm (pre-clip)",
    "position_loss": "Val loss vs position in the window (longest --eval-seq-lens)",
    "diagnostics": "Attention diagnostics over time (--analysis-every, mean over layers)",
}
# diagnostics.png panels: title -> the layer-mean keys drawn in it (pretrain/evals/diagnostics.py defines them).
DIAG_PANELS = {
    "entropy (nats)": ("entropy",), "top-k / local-window mass": ("topk_mass", "local_mass", "null_mass"),
    "attention rank": ("attn_rank", "attn_erank"), "semantic share": ("sem_share", "share_sem_msq"),
    "projection stable rank": ("stable_rank_*",), "K/V effective rank": ("key_erank", "value_erank"),
}
# Every PNG write_plots may write: what a fresh start (--overwrite) may remove from a run dir.
PLOT_FILES = tuple(f"{stem}.png" for stem in PLOT_TITLES)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


def events_by_step(records: list[dict], kind: str) -> list[dict]:
    """train.jsonl events of one type, one per step (the last written wins), ordered by step."""
    out: dict[int, dict] = {}
    for r in records:
        if r.get("type") == kind and isinstance(r.get("step"), int):
            out[r["step"]] = r
    return [out[s] for s in sorted(out)]


def _series(rows: list[dict], x_of: Any, *keys: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        value = next((r[k] for k in keys if _is_num(r.get(k))), None)
        x = x_of(r)
        if value is not None and x is not None:
            xs.append(x)
            ys.append(value)
    return xs, ys


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Write a figure as PNG atomically (parents made); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)  # a reader (or a kill) never sees half a PNG
    return path


def new_figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (7, 4.2)) -> tuple[Any, Any]:
    """A pyplot-free figure with one gridded axis, titled and labelled (every PNG of the tool starts here)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def write_plots(run_dir: str | os.PathLike) -> list[Path]:
    """Draw loss.png (train + val vs tokens, val per eval length), lr.png, throughput.png, grad_norm.png from
    train.jsonl, position_loss.png from the last multi-length eval when there is one, and diagnostics.png (the
    attention diagnostics' layer means over time) once --analysis-every has logged one.

    Plots without data (e.g. no grad_norm logged yet) are skipped. Returns the paths written.
    """

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / JSONL_NAME)
    train, evals = events_by_step(records, "train"), events_by_step(records, "eval")

    # x axis: tokens when the train lines carry them (comparable across seq-len/batch settings), else steps.
    tokens_at = {r["step"]: r["tokens"] for r in train if _is_num(r.get("tokens"))}
    use_tokens = bool(tokens_at) and len(tokens_at) == len(train)
    xlabel = "tokens" if use_tokens else "step"

    def x_of(r: dict) -> float | None:
        if not use_tokens:
            return r["step"]
        if _is_num(r.get("tokens")):
            return r["tokens"]
        if r["step"] in tokens_at:
            return tokens_at[r["step"]]
        # an eval line without tokens: take the nearest earlier train step's count (step 0 -> 0)
        earlier = [s for s in tokens_at if s <= r["step"]]
        return tokens_at[max(earlier)] if earlier else (0 if r["step"] == 0 else None)

    written: list[Path] = []
    tx, ty = _series(train, x_of, "loss")
    vx, vy = _series(evals, x_of, "val_loss", "loss")
    if ty or vy:
        fig, ax = new_figure(PLOT_TITLES["loss"], xlabel, "cross-entropy loss")
        if ty:
            ax.plot(tx, ty, lw=1, alpha=0.8, label="train")
        # One val series per eval length: a loss at 256 tokens is not the same figure as one at 64.
        for seq in sorted({r.get("seq_len") for r in evals}, key=lambda n: (n is None, n or 0)):
            sx, sy = _series([r for r in evals if r.get("seq_len") == seq], x_of, "val_loss", "loss")
            if sy:
                ax.plot(sx, sy, "o-", ms=3, lw=1.5, label="val" if seq is None else f"val (seq {seq})")
        if len(ty) > 20:
            # The first steps (loss ~ln(vocab)) would flatten the interesting part of the curve.
            top = max(sorted(ty)[int(0.98 * (len(ty) - 1))], *(vy or [0]))
            low = min(ty + vy)
            ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))
        ax.legend()
        written.append(save_png(fig, run_dir / "loss.png"))

    for stem, keys, ylabel in (("lr", ("lr",), "learning rate"),
                               ("throughput", ("tok_s",), "tokens / second"),
                               ("grad_norm", ("grad_norm", "gnorm"), "L2 norm")):
        xs, ys = _series(train, x_of, *keys)
        if not ys:
            continue
        fig, ax = new_figure(PLOT_TITLES[stem], xlabel, ylabel)
        ax.plot(xs, ys, lw=1)
        if stem == "grad_norm" and min(ys) > 0 and max(ys) / min(ys) > 100:
            ax.set_yscale("log")  # early spikes span orders of magnitude
        written.append(save_png(fig, run_dir / f"{stem}.png"))

    lengths = events_by_step(records, "eval_lengths")
    position = lengths[-1].get("position") if lengths else None
    if isinstance(position, dict) and position.get("x"):
        fig, ax = new_figure(PLOT_TITLES["position_loss"], "position in the window", "val cross-entropy loss")
        line = ax.plot(position["x"], position["loss"], "o-", ms=3, lw=1.2, label=f"step {lengths[-1]['step']}, "
                       f"window {position.get('seq_len')}")[0]
        se, tokens = position.get("se"), position.get("tokens")
        if isinstance(se, list) and len(se) == len(position["loss"]):  # each bin ± its standard error
            ax.fill_between(position["x"], [y - e for y, e in zip(position["loss"], se, strict=True)],
                            [y + e for y, e in zip(position["loss"], se, strict=True)], color=line.get_color(),
                            alpha=0.2, label=f"± se, >= {min(tokens):,} tokens a bin" if tokens else "± se")
        trained = lengths[-1].get("trained_len")
        if _is_num(trained) and trained < position.get("seq_len", 0):
            ax.axvline(trained, color="grey", ls="--", lw=1, label=f"trained so far: {trained}")
        ax.legend()
        written.append(save_png(fig, run_dir / "position_loss.png"))
    diag = [r for r in events_by_step(records, "diagnostics") if isinstance(r.get("mean"), dict)]
    if diag:
        written.append(save_png(diagnostics_figure(diag, x_of, xlabel), run_dir / "diagnostics.png"))
    return written


def diagnostics_figure(diag: list[dict], x_of: Any, xlabel: str) -> Any:
    """One panel per DIAG_PANELS entry that has data, each layer-mean series against tokens (or steps)."""
    from matplotlib.figure import Figure

    keys_seen = {k for r in diag for k in r["mean"]}
    panels = []
    for title, keys in DIAG_PANELS.items():
        names = [k for k in sorted(keys_seen) for p in keys if k == p or (p.endswith("*") and k.startswith(p[:-1]))]
        if names:
            panels.append((title, names))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    fig.suptitle(PLOT_TITLES["diagnostics"])
    for i, (title, names) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        for name in names:
            xs, ys = _series([r["mean"] | {"step": r["step"], "tokens": r.get("tokens")} for r in diag], x_of, name)
            ax.plot(xs, ys, "o-", ms=3, lw=1.2, label=name)
        ax.legend(fontsize=7)
    return fig
