"""Seed groups for compare: runs whose settings differ only in --seed are one experiment, shown as mean ± sd.

A difference between two variants means little until it is larger than the spread between seeds of one
variant; grouping makes that spread visible in the table (± sd) and in the plots (a band).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

# Settings that do not change what is trained (cadences, tracking, paths, device, speed knobs): two runs
# differing only in these and in the seed are seeds of one experiment.
_IGNORED = frozenset({
    "seed", "out_dir", "resume", "overwrite", "data", "device", "live", "tb", "compile", "compile_mode",
    "opt_fused", "cpu_offload", "grad_checkpoint", "eval_every", "log_every", "save_every", "save_minutes",
    "keep_last", "max_bad_steps", "sample_every", "sample_prompts", "sample_tokens", "sample_temperature",
    "hellaswag", "downstream_every", "downstream_items", "wandb", "wandb_project", "wandb_entity", "wandb_name",
    "wandb_group", "wandb_tags", "wandb_mode", "wandb_id",
})


def group_key(train_config: dict[str, Any] | None) -> str | None:
    """The run's settings without its seed (and without settings that do not change the experiment)."""
    if not train_config:
        return None
    kept = {k: v for k, v in train_config.items() if k not in _IGNORED}
    return json.dumps(kept, sort_keys=True, default=str)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def group_rows(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per seed group (in first-seen order). A group of one keeps its row as is; a larger group
    gets the mean of each metric, `<metric>_sd`, `seeds` (the count) and `members` (its run names)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get("group_key") or ("run", i), []).append(r)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(dict(members[0], seeds=1))
            continue
        first = members[0]
        row = {k: v for k, v in first.items() if k not in metrics}
        seeds = sorted(m.get("seed") for m in members if m.get("seed") is not None)
        extra = len(members) - 1
        row |= {"run": f"{first['run']} (+{extra} seed{'s' if extra > 1 else ''})", "seeds": len(members),
                "members": [m["run"] for m in members], "seed_list": seeds}
        for key in metrics:
            values = [m[key] for m in members if _num(m.get(key))]
            row[key] = mean_sd(values)[0] if values else None
            if len(set(values)) > 1:  # identical across seeds (tokens, KV bytes): no spread to show
                row[f"{key}_sd"] = mean_sd(values)[1]
        statuses = {m.get("status") for m in members}
        row["status"] = statuses.pop() if len(statuses) == 1 else "mixed"
        out.append(row)
    return out


def band(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """(x, mean, sd) over the x values every curve has (seeds of one config evaluate at the same tokens)."""
    common = set.intersection(*(set(x for x, _ in c) for c in curves)) if curves else set()
    xs = sorted(common)
    by_x = [dict(c) for c in curves]
    means, sds = [], []
    for x in xs:
        m, s = mean_sd([d[x] for d in by_x])
        means.append(m)
        sds.append(s)
    return xs, means, sds
