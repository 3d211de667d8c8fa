"""Run records on disk: the train.jsonl event log (crash- and resume-safe) and summary.md.

`train.jsonl` is the run's source of truth: plots, summary, compare and tests read it back. Each line
is one JSON object with a `type` (meta, train, eval, checkpoint, resume, end) and a `time`. A resumed
run first drops the lines past the checkpoint's step, so every step appears once.

wandb, plots and TensorBoard live in `wandb_run.py` and `plots.py`; they are re-exported here so the
trainer imports every tracking name from one place.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from pretrain.fsio import atomic_write_text
from pretrain.plots import PLOT_TITLES, TBWriter, write_plots
from pretrain.wandb_run import WandbRun

__all__ = [
    "RunLog", "read_jsonl", "write_summary", "to_metrics", "WandbRun", "TBWriter", "write_plots",
]

JSONL_NAME = "train.jsonl"
SUMMARY_NAME = "summary.md"


def _jsonable(value: Any) -> Any:
    """Make numbers from numpy/torch, paths and non-finite floats safe for strict JSON."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        # NaN/inf are not JSON (jq and browsers reject them); null keeps the file readable everywhere.
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)  # numpy scalars, 0-d torch tensors
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _parse_lines(text: str) -> list[dict]:
    """Parse JSONL text, skipping a torn last line (and any other unparsable line)."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a crash mid-write leaves a partial last line; never fail on it
        if isinstance(obj, dict):
            records.append(obj)
    return records


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete records of a JSONL file (empty list if it does not exist)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return _parse_lines(text)


class RunLog:
    """Append-only train.jsonl writer.

    resume_step=None starts a fresh log (an existing file is replaced: the trainer only gets here for a new
    run or with --overwrite). resume_step=N keeps the lines with step <= N plus step-less lines (meta), drops
    a torn last line and any `end` line (the run has not ended), rewrites the file atomically and appends a
    `resume` event. Events are flushed per line so a kill -9 loses at most the line being written.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / JSONL_NAME
        self._lock = threading.Lock()  # checkpoint events may come from the async save thread
        kept: list[dict] = []
        if resume_step is not None:
            kept = [
                r for r in read_jsonl(self.path)
                if r.get("type") != "end" and (not isinstance(r.get("step"), int) or r["step"] <= resume_step)
            ]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8", buffering=1)
        if resume_step is not None:
            self.event("resume", step=int(resume_step))

    def event(self, type: str, **fields: Any) -> None:
        """Append one event line; `time` (unix seconds) is added unless given."""
        record = {"type": type, "time": round(time.time(), 3)}
        record.update(fields)
        line = json.dumps(_jsonable(record)) + "\n"
        with self._lock:
            if self._file is None:
                return  # late events at shutdown (e.g. from a save thread) must not crash the trainer
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        """Flush and fsync; safe to call twice."""
        with self._lock:
            if self._file is None:
                return
            self._file.flush()
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_metrics(prefix: str, fields: Mapping[str, Any], skip: Iterable[str] = ("step", "time", "type")) -> dict:
    """Namespace the numeric fields of an event for wandb/TensorBoard: {"loss": 3.2} -> {"train/loss": 3.2}.

    Nested dicts are flattened with "/"; None, strings and bools are dropped (wandb charts numbers only).
    """
    out: dict[str, float] = {}
    skip = set(skip)
    for key, value in fields.items():
        if key in skip:
            continue
        if isinstance(value, Mapping):
            out.update(to_metrics(f"{prefix}/{key}", value, ()))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


# ---------------------------------------------------------------- summary.md

SUMMARY_KEYS = """Keys of `info` for write_summary (all optional; missing ones are left out):
  run_name str; status str ("finished", "interrupted", "failed", ...); command str | list[str];
  train_config dict; model_config dict; params int; non_embedding_params int;
  steps int (done); total_steps int (planned); tokens int (seen); final_val_loss float;
  best_val_loss float; best_step int; tok_s float; mfu float (fraction 0..1, None off-GPU);
  elapsed_s float; skipped_steps int; wandb_url str; notes list[str].
"""


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _loss_ppl(loss: float) -> str:
    ppl = math.exp(loss) if loss < 700 else float("inf")  # exp overflows past ~709
    return f"{loss:.4f} (ppl {ppl:.2f})"


def _size(nbytes: int) -> str:
    for scale, suffix in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "KB")):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {suffix}"
    return f"{nbytes} B"


def _config_table(cfg: Mapping[str, Any]) -> list[str]:
    lines = ["| key | value |", "|---|---|"]
    for key in sorted(cfg):
        value = cfg[key]
        text = value if isinstance(value, str) else json.dumps(_jsonable(value))
        lines.append(f"| `{key}` | `{str(text).replace('|', '&#124;')}` |")
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
    if (tokens := _num(info.get("tokens"))) is not None:
        status.append(f"{_human(tokens)} tokens")
    if (elapsed := _num(info.get("elapsed_s"))) is not None:
        status.append(_duration(elapsed))
    if status:
        out += ["**" + " · ".join(status) + "**", ""]

    command = info.get("command")
    if command:
        text = command if isinstance(command, str) else shlex.join(str(c) for c in command)
        out += ["## Command", "", "```bash", text, "```", ""]

    rows: list[tuple[str, str]] = []
    if (v := _num(info.get("final_val_loss"))) is not None:
        rows.append(("final val loss", _loss_ppl(v)))
    if (v := _num(info.get("best_val_loss"))) is not None:
        at = f" at step {info['best_step']}" if isinstance(info.get("best_step"), int) else ""
        rows.append(("best val loss", _loss_ppl(v) + at))
    for key, label in (("params", "parameters"), ("non_embedding_params", "non-embedding parameters")):
        if (v := _num(info.get(key))) is not None:
            rows.append((label, f"{_human(v)} ({int(v):,})"))
    if (v := _num(info.get("tok_s"))) is not None:
        rows.append(("throughput", f"{_human(v)} tok/s"))
    if (v := _num(info.get("mfu"))) is not None:
        rows.append(("MFU", f"{100 * v:.1f}%"))
    if elapsed is not None:
        rows.append(("elapsed", _duration(elapsed)))
    if (v := _num(info.get("skipped_steps"))) is not None:
        rows.append(("skipped steps (non-finite)", str(int(v))))
    if info.get("wandb_url"):
        rows.append(("wandb", str(info["wandb_url"])))
    if rows:
        out += ["## Results", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]

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
                out.append(f"- [`{p.name}`]({p.name}) ({_size(p.stat().st_size)})")
            except FileNotFoundError:
                continue
        out += [f"- `{d}`" for d in dirs]
        out.append("")

    path = run_dir / SUMMARY_NAME
    atomic_write_text(path, "\n".join(out))
    return path
