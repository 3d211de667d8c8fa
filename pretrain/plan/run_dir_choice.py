"""Which run directory a launch uses, and what happens there (fresh, resume, extend, skip or refuse).

Run directories: `<run-root>/<size>-<variant>[-null][-tieqk][-s<seed>][-<tag>]` (the seed when not the
default). Candidates are tried in order (name, name-2, name-3, ...):
  * a missing or empty directory: a fresh run starts there;
  * a directory holding a checkpoint of THIS experiment (same settings except those a resume may change, and
    the same run length): resumed, whatever --if-exists says; a run that already completed its planned steps is
    left alone. A different run length (token budget) is another experiment unless --extend says to continue
    this one; the plan then says what the extension does to the learning rate;
  * anything else (another experiment's run, or a run stopped before its first checkpoint): --if-exists
    decides: suffix (default: try the next name), skip (do nothing, exit 0), error (exit 2),
    overwrite (start afresh there, replacing that run's files).
Values a tier or default chose (micro-batch, accumulation, dtype, ...) are taken from the run being resumed, so
resuming on a different GPU continues the same experiment; explicit flags are never overridden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.variants import ATTENTION_VARIANTS
from pretrain.errors import UserError
from pretrain.plan.resolve import Origin, Resolved, source_of
from pretrain.schedule import describe_lr_extension
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import checkpoint_paths
from pretrain.train.config import TrainConfig, config_differences
from pretrain.train.run_dir import LOCK_NAME

# How a step is computed, not what it computes: changing these keeps the experiment (same sequences per step).
EXECUTION_FIELDS = ("batch_size", "grad_accum", "grad_checkpoint", "checkpoint_policy", "micro_batch_schedule")
PROBE_FILE = "probe.json"  # what --probe measured, beside the run it planned
DEFAULT_SEED = TrainConfig().seed
_GROUP = {f.name: f.metadata["group"] for f in fields(TrainConfig)}


@dataclass
class RunDirChoice:
    """Where the run goes and what happens there: fresh | resume | complete | skip."""

    name: str
    path: Path
    action: str
    note: str = ""
    adopted: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    end: dict[str, Any] | None = None


def run_name(values: dict[str, Any], variant: str | None, tag: str | None, kv_flag: int | None = None,
             seeded: bool = False) -> str:
    """<size>-<variant>[-null][-tieqk][-s<seed>][-<tag>]: the same settings always give the same name.

    The seed shows when it is not the default (always with --seeds N, `seeded`), so seed repeats are told
    apart on a dashboard at a glance.
    """
    label = variant or "baseline"
    variant_entry = ATTENTION_VARIANTS.get(values["attn"])
    if kv_flag is not None and variant_entry is not None and variant_entry.kv_heads_settable:
        label = f"{values['attn']}_kv{kv_flag}"  # --variant gqa --n-kv-head 2 is the same experiment as gqa_kv2
    # A paper preset's name already implies its options, so they are not repeated in the run name.
    options = [] if values.get("exp") else ["null"] * bool(values["null_attn"]) + ["tieqk"] * bool(values["tie_qk"])
    parts = [values["size"], label] + options
    if values.get("seed") is not None and (seeded or values["seed"] != DEFAULT_SEED):
        parts.append(f"s{values['seed']}")
    if tag:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
            raise UserError(f"--tag {tag!r} may hold only letters, digits, '.', '_' and '-'")
        parts.append(tag)
    return "-".join(parts)


def _saved_run(d: Path) -> tuple[dict | None, dict | None]:
    """(train_config, last end event) of an existing run dir, from train.jsonl (cheap) or the checkpoint."""
    events = read_jsonl(d / "train.jsonl")
    meta = next((e for e in events if e.get("type") == "meta"), None)
    ends = [e for e in events if e.get("type") == "end"]
    cfg = meta.get("train_config") if meta else None
    if cfg is None and (last := checkpoint_paths(d)["last"]) is not None:
        import torch

        try:  # mmap: reads the pickled config, not the gigabytes of weights
            cfg = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("train_config")
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is the trainer's to report
            cfg = None
    return cfg, ends[-1] if ends else None


def _run_length(d: Path, saved: dict) -> tuple[int | None, int | None, int]:
    """(planned steps now, LR horizon, step a resume starts from) of a run dir, from its train.jsonl.

    The last resume event carries the length and horizon in force (a run may have been extended before); the
    checkpoint step is the last one logged, which is where `last.pt` stands.
    """
    events = read_jsonl(d / "train.jsonl")
    resumes = [e for e in events if e.get("type") == "resume" and isinstance(e.get("steps"), int)]
    steps = resumes[-1]["steps"] if resumes else saved.get("steps")
    horizon = resumes[-1].get("lr_horizon", steps) if resumes else steps
    saved_at = [e["step"] for e in events if e.get("type") == "checkpoint" and isinstance(e.get("step"), int)]
    return steps, horizon, max(saved_at, default=0)


def _match(saved: dict, res: Resolved) -> tuple[list[str], dict[str, Any], list[str]]:
    """(conflicts, values to adopt, warnings) between a saved run's config and this plan."""
    cfg = res.cfg
    keys = [d.split(":", 1)[0] for d in config_differences(saved, cfg)]
    same_batch = saved.get("batch_size", 0) * saved.get("grad_accum", 0) == cfg.batch_size * cfg.grad_accum
    conflicts, adopt, warnings = [], {}, []
    for k in keys:
        # A different network is always a different experiment, whoever chose it.
        explicit = source_of(res.sources, k).kind is Origin.FLAG or _GROUP.get(k) == "model"
        if k in EXECUTION_FIELDS and same_batch and explicit:
            warnings.append(f"resuming with {k} {saved[k]!r} -> {getattr(cfg, k)!r}: same experiment, but the "
                            "trainer may refuse a changed value on resume")
        elif explicit or (k in EXECUTION_FIELDS and not same_batch and any(
                source_of(res.sources, f).kind is Origin.FLAG for f in ("batch_size", "grad_accum"))):
            conflicts.append(k)
        else:
            adopt[k] = saved[k]
    return conflicts, adopt, warnings


def resolve_run_dir(root: Path, name: str, if_exists: str, res: Resolved, extend: bool = False) -> RunDirChoice:
    """Pick the run directory (see the module docstring); reads the disk, writes nothing."""
    resume = res.values["resume"]
    if resume not in ("auto", "never"):
        return RunDirChoice(name, root / name, "resume", f"from {resume}")
    for i in range(1, 1000):
        n = name if i == 1 else f"{name}-{i}"
        d = root / n
        if not d.exists() or (d.is_dir() and not any(p.name not in (LOCK_NAME, PROBE_FILE) for p in d.iterdir())):
            return RunDirChoice(n, d, "fresh")
        if not d.is_dir():
            raise UserError(f"{d} exists and is not a directory; move it or choose another --run-root / --tag")
        saved, end = _saved_run(d)
        has_ckpt = bool(checkpoint_paths(d)["last"] or checkpoint_paths(d)["numbered"])
        conflicts, adopt, warns = _match(saved, res) if saved else ([], {}, [])
        steps, horizon, at = _run_length(d, saved) if saved else (None, None, 0)
        planned = res.values["steps"]
        other_length = steps is not None and steps != planned
        if has_ckpt and not conflicts and resume == "auto" and (extend or not other_length):
            res.warnings.extend(warns)
            note = ""
            if other_length:
                lr = describe_lr_extension(res.values["lr_schedule"], horizon or steps, planned, at,
                                           res.values["decay_frac"])
                note = f"--extend: run length {steps:,} -> {planned:,} steps from step {at:,}; {lr}"
            return RunDirChoice(n, d, "resume", note, adopt, end=end)
        why = (f"holds a different run ({', '.join(conflicts)} differ)" if conflicts else
               f"holds a run of {steps:,} steps and this plan has {planned:,} (another token budget; pass "
               f"--extend to continue that run instead)" if has_ckpt and other_length and resume == "auto" else
               "holds no checkpoint (a run stopped before its first save, or other files)" if not has_ckpt else
               "holds a checkpoint but --resume never was given")
        if if_exists == "error":
            raise UserError(f"{d} {why}; use another --tag, or --if-exists suffix|skip|overwrite")
        if if_exists == "skip":
            return RunDirChoice(n, d, "skip", f"{d} {why}; --if-exists skip: nothing to do")
        if if_exists == "overwrite":
            return RunDirChoice(n, d, "fresh", f"{why}; --if-exists overwrite replaces it", overwrite=True)
        res.warnings.append(f"{d} {why}; trying the next name (--if-exists suffix)")
    raise UserError(f"no free run name under {root} for {name}; use another --tag")
