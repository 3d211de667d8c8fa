"""summary.md: the one-page human summary of a run (configs, results, throughput, files, plots)."""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pretrain.fsio import atomic_write_text
from pretrain.track.plots import PLOT_TITLES, events_by_step
from pretrain.track.runlog import JSONL_NAME, _jsonable, median_tok_s, read_jsonl
from pretrain.units import finite_number, fmt_bytes, fmt_count, fmt_duration

SUMMARY_NAME = "summary.md"


SUMMARY_KEYS = """Keys of `info` for write_summary (all optional; missing ones are left out):
  run_name str; status str ("finished", "interrupted", "failed", ...); command str | list[str];
  train_config dict; model_config dict; params int; non_embedding_params int;
  steps int (done); total_steps int (planned); tokens int (seen); final_val_loss float;
  best_val_loss float; best_step int; tok_s float; mfu float (fraction 0..1, None off-GPU); mfu_causal float;
  elapsed_s float; skipped_steps int; wandb_url str; wandb_sync str; mirror str (--mirror's status); notes list[str].
Throughput (the median over train lines, as `compare` shows) and the history of resumes and run-length
changes are read from run_dir/train.jsonl when it exists.
"""


def _loss_ppl(loss: float) -> str:
    ppl = math.exp(loss) if loss < 700 else float("inf")  # exp overflows past ~709
    return f"{loss:.4f} (ppl {ppl:.2f})"


def _config_table(cfg: Mapping[str, Any]) -> list[str]:
    lines = ["| key | value |", "|---|---|"]
    for key in sorted(cfg):
        value = cfg[key]
        text = value if isinstance(value, str) else json.dumps(_jsonable(value))
        lines.append(f"| `{key}` | `{str(text).replace('|', '&#124;')}` |")
    return lines


def describe_batch_change(change: Mapping[str, Any]) -> str:
    """A resume's new split of the same global batch, from its `batch_change` field, in words."""
    pairs = [change.get(k) for k in ("batch_size", "grad_accum", "world_size")]
    (b0, b1), (a0, a1), (w0, w1) = (p if isinstance(p, list) and len(p) == 2 else ("?", "?") for p in pairs)
    total = b1 * a1 * w1 if all(isinstance(v, int) for v in (b1, a1, w1)) else "?"
    return (f"--batch-size {b0} x --grad-accum {a0} x {w0} rank(s) -> {b1} x {a1} x {w1} "
            f"(global batch {total} sequences, unchanged)")


def describe_branch(branch: Mapping[str, Any]) -> str:
    """A rollback's abandoned branch, from a resume event's `branch` field, in words."""
    files = ", ".join(str(f) for f in branch.get("files") or [])
    return (f"the abandoned branch (to step {branch.get('reached_step')}) is set aside in "
            f"{branch.get('moved_to')}/ ({files}; nothing deleted)")


def _history(records: list[dict]) -> list[str]:
    """'## Resumes' lines from train.jsonl's resume events: when, from which step, and run-length changes."""
    lines = []
    for r in records:
        if r.get("type") != "resume":
            continue
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r["time"])) if finite_number(r.get("time")) else "?"
        line = f"- {when}: resumed at step {r.get('step')}"
        if r.get("from"):
            line += f" from `{Path(str(r['from'])).name}`"
        before, now = r.get("steps_before"), r.get("steps")
        if isinstance(before, int) and isinstance(now, int) and before != now:
            line += f"; run length {before:,} -> {now:,} steps ({'extended' if now > before else 'shortened'})"
            if r.get("lr_note"):
                line += f": {r['lr_note']}"
        if isinstance(r.get("branch"), Mapping):
            line += f"; rolled back: {describe_branch(r['branch'])}"
        if isinstance(r.get("batch_change"), Mapping):
            line += f"; batch split {describe_batch_change(r['batch_change'])}"
        lines.append(line)
    return ["## Resumes", ""] + lines + [""] if lines else []


def _lengths_section(fields: Any) -> list[str]:
    """Val loss per --eval-seq-lens length at the last eval; lengths past the trained one are marked."""
    if not isinstance(fields, Mapping) or not isinstance(fields.get("loss"), Mapping):
        return []
    trained = fields.get("trained_len")
    same = f"; every length scores the same {fields['targets']:,} target tokens" if fields.get("targets") else ""
    lines = ["## Validation loss by length", "", f"Last eval; trained so far on sequences of up to {trained} tokens "
             f"(longer lengths test RoPE extrapolation){same}.", "", "| length | val loss |", "|---:|---|"]
    for n, loss in sorted(fields["loss"].items(), key=lambda kv: int(kv[0])):
        mark = " (extrapolated)" if isinstance(trained, int) and int(n) > trained else ""
        if (v := finite_number(loss)) is not None:
            lines.append(f"| {n}{mark} | {_loss_ppl(v)} |")
    return lines + [""]


def _diagnostics_section(fields: Any) -> list[str]:
    """The last attention diagnostics, one row per layer (see pretrain/evals/diagnostics.py)."""
    if not isinstance(fields, Mapping) or not isinstance(fields.get("layer"), Mapping):
        return []
    cols = [("entropy", "entropy (nats)"), ("null_mass", "null mass"), ("topk_mass", "top-k mass"),
            ("local_mass", "local mass"), ("attn_erank", "attn eff. rank"), ("sem_share", "semantic share"),
            ("share_sem_msq", "sem. share (msq)"),
            ("key_erank", "key eff. rank"), ("value_erank", "value eff. rank"), ("cos_in_out", "cos in/out"),
            ("grad_norm", "grad norm")]
    layers = fields["layer"]
    cols = [(k, t) for k, t in cols if any(finite_number(row.get(k)) is not None for row in layers.values())]
    lines = ["## Attention diagnostics", "",
             f"Last analysis, on a fixed validation batch of {fields.get('rows')} x {fields.get('seq_len')} "
             "tokens; effective ranks out of the width in brackets.", "",
             "| layer | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in sorted(layers.items()):
        cells = []
        for k, _ in cols:
            v = finite_number(row.get(k))
            text = "-" if v is None else f"{v:.3g}"
            width = row.get(k.replace("erank", "width"))
            cells.append(f"{text} ({width})" if k.endswith("erank") and width else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if isinstance(fields.get("attn_map"), str):  # written by --attn-map-layers (pretrain/track/attn_maps.py)
        npz = fields["attn_map"].removesuffix(".png") + ".npz"
        lines += [f"Attention maps of the last analysis ([{npz}]({npz})):", "",
                  f"![attention maps]({fields['attn_map']})", ""]
    return lines


def write_summary(run_dir: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write run_dir/summary.md from `info` (see SUMMARY_KEYS) and the directory listing; returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out: list[str] = [f"# Run `{info.get('run_name') or run_dir.name}`", ""]

    status = [str(info["status"])] if info.get("status") else []
    steps, total = info.get("steps"), info.get("total_steps")
    if isinstance(steps, int):
        status.append(f"{steps}/{total} steps" if isinstance(total, int) and total else f"{steps} steps")
    if (tokens := finite_number(info.get("tokens"))) is not None:
        status.append(f"{fmt_count(tokens)} tokens")
    if (elapsed := finite_number(info.get("elapsed_s"))) is not None:
        status.append(fmt_duration(elapsed))
    if status:
        out += ["**" + " · ".join(status) + "**", ""]

    command = info.get("command")
    if command:
        text = command if isinstance(command, str) else shlex.join(str(c) for c in command)
        out += ["## Command", "", "```bash", text, "```", ""]

    rows: list[tuple[str, str]] = []
    if (v := finite_number(info.get("final_val_loss"))) is not None:
        rows.append(("final val loss", _loss_ppl(v)))
    if (v := finite_number(info.get("best_val_loss"))) is not None:
        at = f" at step {info['best_step']}" if isinstance(info.get("best_step"), int) else ""
        rows.append(("best val loss", _loss_ppl(v) + at))
    for key, label in (("params", "parameters"), ("non_embedding_params", "non-embedding parameters")):
        if (v := finite_number(info.get(key))) is not None:
            rows.append((label, f"{fmt_count(v)} ({int(v):,})"))
    records = read_jsonl(run_dir / JSONL_NAME)
    train = events_by_step(records, "train")
    if (v := median_tok_s(train) if train else finite_number(info.get("tok_s"))) is not None:
        median = f" (median of {len(train)} train lines)" if train else ""
        rows.append(("throughput", f"{fmt_count(v)} tok/s{median}"))
    if (v := finite_number(info.get("mfu"))) is not None:
        causal = finite_number(info.get("mfu_causal"))
        rows.append(("MFU", f"{100 * v:.1f}% on model FLOPs (PaLM convention: full attention)"
                     + (f"; {100 * causal:.1f}% counting causal attention" if causal is not None else "")))
    if elapsed is not None:
        rows.append(("elapsed", fmt_duration(elapsed)))
    if (v := finite_number(info.get("skipped_steps"))) is not None:
        rows.append(("skipped steps (non-finite)", str(int(v))))
    if info.get("wandb_url"):
        rows.append(("wandb", str(info["wandb_url"])))
    elif info.get("wandb_sync"):
        rows.append(("wandb (offline)", f"upload every session with `{info['wandb_sync']}`"))
    if info.get("mirror"):
        rows.append(("mirror", str(info["mirror"])))
    if rows:
        out += ["## Results", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]

    out += _history(records)
    out += _lengths_section(info.get("eval_lengths")) + _diagnostics_section(info.get("diagnostics"))

    for note in info.get("notes") or []:
        out.append(f"- {note}")
    if info.get("notes"):
        out.append("")

    # Plots and files come from the listing, so links never point at PNGs that were not written.
    files = sorted((p for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: p.name)
    pngs = sorted((p for p in files if p.suffix == ".png"),
                  key=lambda p: (list(PLOT_TITLES).index(p.stem) if p.stem in PLOT_TITLES else 99, p.name))
    if pngs:
        out += ["## Plots", ""]
        for p in pngs:
            out += [f"![{PLOT_TITLES.get(p.stem, p.stem)}]({p.name})", ""]

    for title, key in (("Model config", "model_config"), ("Training config", "train_config")):
        if isinstance(info.get(key), Mapping) and info[key]:
            out += [f"## {title}", ""] + _config_table(info[key]) + [""]

    listed = [p for p in files if p.name != SUMMARY_NAME]
    dirs = sorted(p.name + "/" for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if listed or dirs:
        out += ["## Files", ""]
        for p in listed:
            try:  # keep-last-k may delete a step_<N>.pt while we list
                out.append(f"- [`{p.name}`]({p.name}) ({fmt_bytes(p.stat().st_size)})")
            except FileNotFoundError:
                continue
        out += [f"- `{d}`" for d in dirs]
        out.append("")

    path = run_dir / SUMMARY_NAME
    atomic_write_text(path, "\n".join(out))
    return path
