"""Compare runs side by side: a table (variant, size, KV cache, tokens, val loss, speed, val loss per
--eval-seq-lens length) and PNGs of their val loss against tokens seen and against eval length. This is
how one picks between baseline, GQA, bottleneck and decoupled.

    python -m pretrain.track.compare runs/base runs/gqa --out runs/compare.png
    python -m pretrain.track.compare runs            # every run directory under runs/

Everything is read back from each run's train.jsonl (meta / train / eval / end events), the same record
summary.md and the plots are drawn from, so a run still in progress or killed compares as far as it got.
Under the table: what ± means, and whether the runs are on equal footing and their best is outside the noise
(compare_checks.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.variants import ATTENTION_VARIANTS
from pretrain.errors import ArgumentParser, UserError
from pretrain.evals.infer_bench import add_kv_cache_flags, kv_settings_arg
from pretrain.stats import binomial_se
from pretrain.track.compare_checks import ranking, verdict
from pretrain.track.diag_columns import diag_columns, diag_fields
from pretrain.track.kv_plot import format_kv_table, kv_setting_fields, kv_setting_metrics, plot_quality_vs_kv
from pretrain.track.length_columns import length_columns, length_fields, plot_length_curves
from pretrain.track.plots import events_by_step, new_figure, save_png
from pretrain.track.runlog import JSONL_NAME, median_tok_s, read_jsonl
from pretrain.track.seeds import band, group_key, group_rows, seed_groups
from pretrain.units import finite_number, fmt_count

# Column key -> header, in print order.
COLUMNS = {
    "run": "run", "variant": "variant", "params": "params", "kv_bytes_per_token": "KV B/tok",
    "tokens": "tokens", "best_val_loss": "best val", "final_val_loss": "final val", "tok_s": "tok/s",
    "steps": "steps", "status": "status",
}


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run directories named by `paths`: a run dir itself, or a parent whose subdirs are runs (e.g. runs/)."""
    if not paths:
        raise UserError("no runs given; pass run directories, e.g. runs/a runs/b (or runs/ for all of them)")
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            raise UserError(f"{p} is not a run directory (no such directory); pass runs/<name> dirs")
        if (p / JSONL_NAME).is_file():
            found.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / JSONL_NAME).is_file())
        if not children:
            raise UserError(f"{p} has no {JSONL_NAME} (nor do its subdirectories); is it a run directory? "
                            "runs are made by train_v29.py / run_1b_launch.py --run")
        found += children
    return found


def _kv_bytes(model_config: dict | None) -> int | None:
    from model import ModelConfig  # lazy: the table of a run needs no torch model code until here

    if not model_config:
        return None
    try:
        return ModelConfig.from_dict(model_config).kv_cache_bytes_per_token(2)
    except (TypeError, ValueError):
        return None  # a run written by an older ModelConfig: show the rest of its row anyway


def _variant(model_config: dict | None) -> str | None:
    if not model_config:
        return None
    attn = model_config.get("attn", "?")
    variant = ATTENTION_VARIANTS.get(attn) if isinstance(attn, str) else None
    if variant is not None and variant.kv_heads_settable:  # gqa: its kv heads tell two of its runs apart
        return f"{attn} kv{model_config.get('n_kv_head')}"
    return str(attn)


def _meta(records: list[dict], run_dir: Path, warn: bool = True) -> dict[str, Any]:
    """The run's meta event with each field compare reads of the right type; a wrong one is dropped with one
    warning line, so a hand-edited or foreign train.jsonl still compares as far as it can."""
    meta = next((r for r in records if r.get("type") == "meta"), {})
    want = {"model_config": dict, "train_config": dict, "params": int}
    bad = [k for k, tp in want.items() if k in meta and not isinstance(meta[k], tp)]
    if bad and warn:
        print(f"warning: {run_dir / JSONL_NAME}: the meta line's {', '.join(bad)} is malformed; its columns are "
              "left blank (restore the line from the run's first train.jsonl, or rerun it)", file=sys.stderr)
    return {k: v for k, v in meta.items() if k not in bad}


def measured_fields(infer: dict[str, Any]) -> dict[str, Any]:
    """Figures of a run's latest `infer` event (python -m pretrain.evals.infer_bench): measured KV bytes per token,
    and per context length decode/prefill tokens/s and peak memory."""
    if not infer:
        return {}
    out = {"kv_measured": infer.get("kv_bytes_per_token")}
    out |= {k: v for k, v in infer.items() if "@" in k}
    return out | kv_setting_fields(infer)


def _measured_columns(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Columns for the measured figures present in any row: decode tok/s per length, prefill and peak at the
    longest length (the KV cache decides those at long context)."""
    lengths = sorted({int(k.split("@")[1]) for r in rows for k in r
                      if k.startswith("decode_tok_s@") and not k.endswith("_sd")})
    if not lengths:
        return {}
    cols = {"kv_measured": "KV B/tok meas"}
    cols |= {f"decode_tok_s@{n}": f"dec tok/s@{_length(n)}" for n in lengths}
    cols |= {f"prefill_tok_s@{lengths[-1]}": f"prefill tok/s@{_length(lengths[-1])}",
             f"peak_mem_bytes@{lengths[-1]}": f"peak MiB@{_length(lengths[-1])}"}
    return cols


def run_row(run_dir: Path, warn: bool = True) -> dict[str, Any]:
    """One run's figures; missing ones are None (a run killed before its first eval has no val loss)."""
    records = read_jsonl(run_dir / JSONL_NAME)
    meta = _meta(records, run_dir, warn)
    end = next((r for r in reversed(records) if r.get("type") == "end"), None)
    train = events_by_step(records, "train")
    evals = [e for e in events_by_step(records, "eval") if finite_number(e.get("loss")) is not None]
    mcfg = meta.get("model_config")
    steps = max([r["step"] for r in train + evals], default=0)
    if end and isinstance(end.get("step"), int):
        steps = end["step"]  # a run stopped by a signal saved one step past its last logged line
    # An extended run's `resume` event holds its new length; the meta line keeps the first start's.
    resumed = [r["steps"] for r in records if r.get("type") == "resume" and isinstance(r.get("steps"), int)]
    planned = resumed[-1] if resumed else (meta.get("train_config") or {}).get("steps")
    if end:
        status = str(end.get("status", "ended"))
    else:
        # No end event: still running, or killed; either way rerunning its command resumes it.
        status = "unfinished"
    lengths = events_by_step(records, "eval_lengths")
    last_lengths = lengths[-1] if lengths else {}
    tokens = (end or {}).get("tokens")
    if finite_number(tokens) is None:
        tokens = max([r["tokens"] for r in train + evals if finite_number(r.get("tokens")) is not None], default=None)
    tcfg = meta.get("train_config") or {}
    infer = next((r for r in reversed(records) if r.get("type") == "infer"), {})
    downstream = [e for e in events_by_step(records, "downstream") if finite_number(e.get("acc_norm")) is not None]
    best_eval = min(evals, key=lambda e: e["loss"], default={})
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "seed": tcfg.get("seed"),
        "group_key": group_key(tcfg),
        **measured_fields(infer),
        "acc_norm": downstream[-1]["acc_norm"] if downstream else None,
        "acc_norm_se": binomial_se(downstream[-1]["acc_norm"], downstream[-1].get("n") or 0) if downstream else None,
        "data_fingerprint": (meta.get("dataset") or {}).get("fingerprint"),
        "best_val_loss_se": finite_number(best_eval.get("loss_se")),  # over eval batches (session.evaluate)
        "final_val_loss_se": finite_number(evals[-1].get("loss_se")) if evals else None,
        "variant": _variant(mcfg),
        "params": meta.get("params"),
        "kv_bytes_per_token": _kv_bytes(mcfg),
        "tokens": tokens,
        "best_val_loss": min((e["loss"] for e in evals), default=None),
        "final_val_loss": evals[-1]["loss"] if evals else None,
        "tok_s": median_tok_s(train),  # the same figure summary.md shows
        "steps": steps,
        "planned_steps": planned,
        "status": status,
        # --eval-seq-lens: {length: val loss} at the last eval, and the longest trained length
        "length_loss": {int(n): v for n, v in (last_lengths.get("loss") or {}).items() if finite_number(v) is not None},
        "trained_len": last_lengths.get("trained_len"),
        **length_fields(last_lengths),  # the same losses (± se) as flat `val@<length>` columns
        **diag_fields(records),  # --analysis-every: the last diagnostics' layer means
    }


def compare_runs(paths: Sequence[str | os.PathLike], warn: bool = True) -> list[dict[str, Any]]:
    """One row per run (see `run_row`); UserError for a path that is not a run directory."""
    rows = [run_row(p, warn) for p in find_runs(paths)]
    names = [r["run"] for r in rows]
    for r in rows:
        if names.count(r["run"]) > 1:  # same name under different roots: the path tells them apart
            r["run"] = r["path"]
    return rows


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _cell(key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if value is None:
        return "" if key == "note" else "-"
    sd = row.get(f"{key}_sd")
    if sd is not None:  # a seed group: mean ± sample sd
        return f"{_one(key, row, value)} ± {_one(key, row, sd)} sd"
    se = row.get(f"{key}_se")
    if se is not None and (row.get("seeds") or 1) == 1:  # one run: ± its standard error
        return f"{_one(key, row, value)} ± {_one(key, row, se)} se"
    return _one(key, row, value)


def _one(key: str, row: dict[str, Any], value: Any) -> str:
    if key in ("best_val_loss", "final_val_loss"):
        return f"{value:.4f}"
    if key in ("params", "tokens", "tok_s"):
        return fmt_count(value)
    if key in ("kv_bytes_per_token", "kv_measured"):
        return f"{value:,.0f}"
    if key == "acc_norm":
        return f"{value:.3f}"
    if key.startswith("val@"):
        return f"{value:.4f}"
    if key.startswith("diag:"):
        return f"{value:.3g}"
    if key.startswith("peak_mem_bytes@"):
        return f"{value / 2**20:,.1f}"
    if key.startswith(("decode_tok_s@", "prefill_tok_s@")):
        return fmt_count(value) if value >= 1000 else f"{value:.1f}"
    if key == "steps" and row.get("planned_steps"):
        return f"{value}/{row['planned_steps']}"
    return str(value)


def table_columns(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """COLUMNS, plus the columns only some comparisons have (seeds, downstream accuracy, measured cost)."""
    extra: dict[str, str] = {}
    if any((r.get("seeds") or 1) > 1 for r in rows):
        extra["seeds"] = "seeds"
    if any(r.get("acc_norm") is not None for r in rows):
        extra["acc_norm"] = "acc_norm"
    extra |= _measured_columns(rows)
    extra |= length_columns(rows)
    extra |= diag_columns(rows)
    keys = list(COLUMNS)
    cut = keys.index("steps")
    columns = {k: COLUMNS.get(k) or extra[k] for k in keys[:cut] + list(extra) + keys[cut:]}
    if any(r.get("left_out") for r in rows):  # a run a seed group leaves out says why, and the mean says of what
        columns["note"] = "note"
    return columns


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain aligned text (no box characters: it is pasted into issues and notebooks). Best val marked *."""
    columns = table_columns(rows)
    # The mark goes to a counted row on equal footing (compare_checks): * a lead outside the noise, ~ inside it.
    marked, mark, _ = ranking(rows)
    table = [list(columns.values())]
    for r in rows:
        cells = [_cell(k, r) for k in columns]
        if marked is not None and r["run"] == marked and not r.get("left_out"):
            cells[list(columns).index("best_val_loss")] += f" {mark}"
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    # Text columns left-aligned, numbers right-aligned so digits line up.
    left = {"run", "variant", "status", "note"}
    lines = []
    for line in table:
        parts = [c.ljust(w) if k in left else c.rjust(w) for c, w, k in zip(line, widths, columns, strict=True)]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_val_curves(paths: Sequence[str | os.PathLike], out_png: str | os.PathLike) -> Path:
    """Overlay every run's val loss against tokens seen; write `out_png` atomically and return its path.
    A seed group's counted runs share one line and band; a run it leaves out is a dashed line of its own."""
    fig, ax = new_figure("Validation loss vs tokens", "tokens", "val cross-entropy loss", size=(8, 4.8))
    lows, highs = [], []
    rows = compare_runs(paths, warn=False)  # the table has said what is malformed
    points: dict[str, list] = {}
    for r in rows:
        records = read_jsonl(Path(r["path"]) / JSONL_NAME)
        points[r["path"]] = [(e["tokens"], e["loss"]) for e in events_by_step(records, "eval")
                             if finite_number(e.get("tokens")) is not None and finite_number(e.get("loss")) is not None]
    curves: list[tuple[str, list, list[float], list[float], str]] = []  # label, xs, ys, sds, line style
    for counted, left in seed_groups(rows):
        counted = [m for m in counted if points[m["path"]]]
        if counted:
            first = counted[0]
            label = f"{first['run']} ({first['variant']})" if first.get("variant") else first["run"]
            if len(counted) > 1:
                xs, ys, sds = band([points[m["path"]] for m in counted])
                curves.append((f"{label}, mean ± sd of {len(counted)} seeds", xs, ys, sds, "o-"))
            else:
                xs, ys = (list(v) for v in zip(*points[first["path"]], strict=True))
                curves.append((label, xs, ys, [0.0] * len(ys), "o-"))
        for m in left:
            if points[m["path"]]:
                xs, ys = (list(v) for v in zip(*points[m["path"]], strict=True))
                why = m["left_out"].removeprefix("not in the mean: ")
                curves.append((f"{m['run']} ({why})", xs, ys, [0.0] * len(ys), "o--"))
    for label, xs, ys, sds, style in curves:
        if not ys:
            continue
        line = ax.plot(xs, ys, style, ms=3, lw=1.5, label=label)[0]
        if any(sds):
            ax.fill_between(xs, [y - d for y, d in zip(ys, sds, strict=True)],
                            [y + d for y, d in zip(ys, sds, strict=True)], color=line.get_color(), alpha=0.2)
        lows.append(min(y - d for y, d in zip(ys, sds, strict=True)))  # the whole band stays in view
        highs.append(ys[1] if len(ys) > 2 else max(ys))
    if lows:
        # The step-0 eval (~ln(vocab)) would flatten the differences that decide between variants.
        low, high = min(lows), max(highs)
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no val evaluations yet", ha="center", va="center", transform=ax.transAxes)
    return save_png(fig, out_png)


def build_parser(prog: str = "python -m pretrain.track.compare") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Compare training runs: a table and an overlaid val-loss plot.")
    p.add_argument("runs", nargs="+", help="run directories (runs/<name>), or a parent such as runs/ for all")
    p.add_argument("--out", default=None,
                   help="PNG of val loss vs tokens (default: compare.png beside the first run dir)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--per-seed", action="store_true", help="one row per run instead of mean ± sd per seed group")
    p.add_argument("--measure", action="store_true",
                   help="first measure each run's inference cost (python -m pretrain.evals.infer_bench) and add it")
    p.add_argument("--measure-lengths", default="1K,4K,16K", help="context lengths for --measure")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per length for --measure")
    p.add_argument("--device", default="cpu", help="device for --measure (cpu, cuda)")
    add_kv_cache_flags(p)  # --kv-cache / --quality-tokens for --measure
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m pretrain.track.compare") -> int:
    """CLI entry; `run_1b_launch.py compare ...` calls this with its own `prog` for the help/error text."""
    args = build_parser(prog).parse_args(argv)
    if args.measure:
        _measure([r["path"] for r in compare_runs(args.runs)], args)
    runs = compare_runs(args.runs)
    metrics = (GROUP_METRICS + list(_measured_columns(runs)) + list(length_columns(runs)) + list(diag_columns(runs))
               + kv_setting_metrics(runs))
    rows = group_rows(runs, metrics, merge=not args.per_seed)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows) + "\n\n" + verdict(rows))
    kv_table = "" if args.json else format_kv_table(rows)
    if kv_table:
        print(f"\nKV cache settings (measured; decoded val = held-out text decoded through the cache):\n{kv_table}")
    if not args.no_plot:
        out = Path(args.out) if args.out else Path(runs[0]["path"]).parent / "compare.png"
        plot_val_curves([r["path"] for r in runs], out)
        kv_png = plot_quality_vs_kv(rows, out.with_name(f"{out.stem}_kv{out.suffix}"))
        if not args.json:
            print(f"val loss vs tokens: {out}")
            print(f"val loss vs KV bytes per token: {kv_png}")
        if any(r["length_loss"] for r in runs):
            by_length = plot_length_curves(runs, out.with_name(f"{out.stem}_lengths.png"))
            if not args.json:
                print(f"val loss vs eval length: {by_length}")
    return 0


# Per-run figures averaged over a seed group (the rest, e.g. params or variant, is the same for every seed).
GROUP_METRICS = ["best_val_loss", "final_val_loss", "tok_s", "tokens", "acc_norm", "kv_measured"]


def _measure(paths: Sequence[str], args: Any) -> None:
    """compare --measure: the inference benchmark on every run first (records an `infer` event in each)."""
    import torch

    from pretrain.evals.infer_bench import bench_run, parse_lengths
    from pretrain.evals.run_model import find_checkpoint

    lengths = parse_lengths(args.measure_lengths)
    settings = kv_settings_arg(args)
    for p in paths:
        find_checkpoint(Path(p), "auto")  # all checked before the first measurement
    for p in paths:
        bench_run(Path(p), lengths, args.decode_tokens, torch.device(args.device), None, True, settings,
                  args.quality_tokens)


if __name__ == "__main__":
    from pretrain.errors import script_exit_code

    sys.exit(script_exit_code(main))
