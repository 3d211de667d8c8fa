"""The run's event log on disk: train.jsonl, crash- and resume-safe, and the helpers that read it back.

`train.jsonl` is the run's source of truth: plots, summary, compare and tests read it back. Each line
is one JSON object with a `type` (meta, train, eval, checkpoint, resume, end) and a `time`. A resumed
run first drops the lines past the checkpoint's step, so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from pretrain.fsio import atomic_write_text

JSONL_NAME = "train.jsonl"


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


def median_tok_s(train_events: Iterable[Mapping[str, Any]]) -> float | None:
    """The run's throughput figure: the median tok/s of its train lines (the first ones include warm-up)."""
    rates = [v for e in train_events if isinstance(v := e.get("tok_s"), int | float) and not isinstance(v, bool)
             and math.isfinite(v)]
    return statistics.median(rates) if rates else None


class RunLog:
    """Append-only train.jsonl writer.

    resume_step=None starts a fresh log (an existing file is replaced: the trainer only gets here for a new
    run or with --overwrite). resume_step=N keeps the lines with step <= N plus step-less lines (meta), drops
    a torn last line and any `end` line (the run has not ended), rewrites the file atomically and appends a
    `resume` event (carrying `resume_fields`: where from, steps before and now). Events are flushed per
    line so a kill -9 loses at most the line being written.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None,
                 resume_fields: Mapping[str, Any] | None = None) -> None:
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
            self.event("resume", step=int(resume_step), **(resume_fields or {}))

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
