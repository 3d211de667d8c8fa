"""Reading offline `run-<id>.wandb` files back in tests: what a wandb dashboard would show after `wandb sync`.

The record scanner itself stays in pretrain/track/wandb_run.py, because WandbRun.finish waits with it for the
file's exit record; the history rows are only ever read by tests.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pretrain.track.wandb_run import iter_wandb_records

__all__ = ["iter_wandb_records", "read_wandb_history"]


def read_wandb_history(path: str | os.PathLike) -> list[dict]:
    """History rows of a .wandb file as dicts: {"_step": 3, "train/loss": 4.2, ...}."""
    rows = []
    for record in iter_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows
