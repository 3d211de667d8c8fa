"""Seed groups for compare: runs whose settings differ only in --seed are one experiment, shown as mean ± sd.

A difference between two variants means little until it is larger than the spread between seeds of one
variant; grouping makes that spread visible in the table (± sd) and in the plots (a band).

Only finished runs with distinct seeds (the seed each run recorded in its meta event, not its directory name)
go into a mean. A run still in progress, stopped or killed (a step-0 log beside a finished run) and a second
run of a seed already counted (a copied run dir) keep their own row, marked with why they are left out.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from pretrain.runstatus import COMPLETED, RunStatus
from pretrain.units import finite_number

# Settings that do not change what is trained (cadences, tracking, paths, device, speed knobs): two runs
# differing only in these and in the seed are seeds of one experiment.
_IGNORED = frozenset({
    "seed", "out_dir", "resume", "overwrite", "data", "device", "live", "tb", "compile", "compile_mode",
    "opt_fused", "cpu_offload", "grad_checkpoint", "eval_every", "log_every", "save_every", "save_minutes",
    "checkpoint_policy",
    "keep_last", "max_bad_steps", "sample_every", "sample_prompts", "sample_tokens", "sample_temperature",
    "hellaswag", "downstream_every", "downstream_items", "wandb", "wandb_project", "wandb_entity", "wandb_name",
    "wandb_group", "wandb_tags", "wandb_mode", "wandb_id", "mirror",
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


def seed_groups(rows: Sequence[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Per seed group (first-seen order): (the runs its mean counts, the others each with `left_out` saying
    why). A group of runs that differ only in --seed counts each finished run once per recorded seed."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get("group_key") or ("run", i), []).append(r)
    out = []
    for members in groups.values():
        if len(members) == 1:  # nothing to average it with: shown as it is, whatever its state
            out.append((members, []))
            continue
        counted: list[dict[str, Any]] = []
        left: list[dict[str, Any]] = []
        first_of: dict[Any, dict[str, Any]] = {}
        for m in members:
            seed = m.get("seed")
            if RunStatus.parse(m.get("status")) != COMPLETED:
                why = f"not in the mean: unfinished at step {m.get('steps')}"
            elif seed is None:
                why = "not in the mean: no seed recorded"
            elif seed in first_of:
                why = f"not in the mean: seed {seed} again, a duplicate of {first_of[seed]['run']}"
            else:
                first_of[seed] = m
                counted.append(m)
                continue
            left.append(dict(m, left_out=why))
        out.append((counted, left))
    return out


def group_rows(rows: Sequence[dict[str, Any]], metrics: Sequence[str], merge: bool = True) -> list[dict[str, Any]]:
    """One row per seed group (in first-seen order), then a row per run the group leaves out (`left_out`,
    `note`: why). A group of one keeps its row as is; a larger one gets the mean of each metric,
    `<metric>_sd`, `seeds` (the count), `members` (its run names), `seed_list`. merge=False (--per-seed): every
    run its own row, the left-out ones still marked."""
    out = []
    for members, left in seed_groups(rows):
        if not merge or len(members) == 1:
            out += [dict(m, seeds=1) for m in members]
        elif members:
            out.append(_mean_row(members, metrics))
        out += [dict(m, seeds=None, note=m["left_out"]) for m in left]
    return out


def _mean_row(members: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """The mean (± sample sd) row of the counted (finished, one per seed) runs of one seed group."""
    first = members[0]
    row = {k: v for k, v in first.items() if k not in metrics and k.removesuffix("_se") not in metrics}
    seeds = sorted(m["seed"] for m in members)
    extra = len(members) - 1
    row |= {"run": f"{first['run']} (+{extra} seed{'s' if extra > 1 else ''})", "seeds": len(members),
            "members": [m["run"] for m in members], "seed_list": seeds,
            "note": f"mean of seeds {', '.join(map(str, seeds))}"}
    for key in metrics:
        values = [m[key] for m in members if finite_number(m.get(key)) is not None]
        row[key] = mean_sd(values)[0] if values else None
        if len(set(values)) > 1:  # identical across seeds (tokens, KV bytes): no spread to show
            row[f"{key}_sd"] = mean_sd(values)[1]
        errors = [m.get(f"{key}_se") for m in members]
        if values and all(finite_number(e) is not None for e in errors):
            # The mean's own measurement error: n independent estimates, each with its standard error.
            row[f"{key}_se"] = math.sqrt(sum(e * e for e in errors)) / len(errors)
    prints = {m.get("data_fingerprint") for m in members}
    row["data_fingerprint"] = prints.pop() if len(prints) == 1 else "mixed"  # one text, or compare flags it
    return row


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
