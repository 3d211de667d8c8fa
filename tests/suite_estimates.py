"""The memory estimates the test suite's plans trace, kept in the repo so a clean clone's `make test` does not trace
them again (tests/data/suite_estimates.json; the product's own file of this kind: pretrain/plan/shipped_estimates.json).

A fake-tensor estimate costs 0.3-4 CPU-s and the suite's plans (1b tiers with other flags, tiny models at the cpu
tier, the paper presets) need ~220 that the product does not ship: ~270 of a run's ~1,050 CPU-s. Their result is a
pure function of the key parts and of the code that traces them, so the session's cache (conftest) starts with
them, under the keys the code of this checkout computes, only while the file's environment and the hash of every
file an estimate executes equal this checkout's (estimate_cache's rule for the shipped file). Anything else is
traced as before: a stale file costs time, never a wrong figure. Tests that need a cold plan set their own cache
(tests/test_plan_cache.py, test_shipped_estimates.py); tests/test_suite_estimates.py holds the preload to the rule.

The suite's cpu-tier plans follow the host's bf16 (fp32 where it is emulated), so a run traces only its own host
class's ~60 of them; a save keeps the other class's from the file it replaces, traced again under this code
(other_host_class), so the file serves both classes whichever saved it (the other class would trace them, ~40 s).

Refresh after changing model/, the optimizers or the step tracing (`make test`'s summary says when):

    PRETRAIN_TEST_SAVE_ESTIMATES=1 make test
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pretrain.fsio import atomic_write_text
from pretrain.plan import estimate_cache

FILE = Path(__file__).resolve().parent / "data" / "suite_estimates.json"
SAVE_ENV = "PRETRAIN_TEST_SAVE_ESTIMATES"
ABOUT = ("memory estimates the test suite traces (tests/suite_estimates.py); refresh: "
         f"{SAVE_ENV}=1 make test")


def why_not_used(body: dict | None) -> str | None:
    """Why the file's estimates do not hold for this checkout (None: they do): the shipped file's rule, and the same
    list of files (the keys hash the shipped file's list)."""
    if body is not None and sorted(body["files"]) != estimate_cache.code_files():
        return "it lists other files than pretrain/plan/shipped_estimates.json"
    return estimate_cache.why_not_held(body)


def preload(path: Path = FILE) -> tuple[int, str | None]:
    """Store every estimate of `path` in this process's estimate cache ($PRETRAIN_CACHE_DIR) under this checkout's
    keys. Returns (how many, None), or (0, why none was)."""
    body = estimate_cache.read_shipped(path)
    reason = why_not_used(body)
    if reason is not None:
        return 0, reason
    assert body is not None
    for entry in body["estimates"]:
        estimate_cache.store(estimate_cache.entry_parts(body, entry), entry[-1])
    return len(body["estimates"]), None


def traced(cache_root: Path) -> int:
    """How many estimates the cache at `cache_root` holds."""
    return len(list((cache_root / "plan-memory").glob("*.json")))


def other_host_class(path: Path, records: dict[estimate_cache.Parts, Any]) -> dict[estimate_cache.Parts, Any]:
    """The estimates of `path` (the file a save replaces) that a suite on the other host class plans and this run did
    not: their `amp` is the one the cpu tier picks on the other class (pretrain/plan/resolve.py: autocast where bf16
    is native, fp32 where it is emulated). Each is traced again under this checkout's code. Old entries of this
    host's `amp` that no test asked for are dropped; an obsolete one of the other's stays until the file is remade."""
    from pretrain.plan import instrument_memory, memory, resolve

    try:  # as it is now: read_shipped keeps what it read first
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    other_amp = not resolve.cpu_has_fast_bf16()
    out = {}
    for entry in body["estimates"]:
        parts = estimate_cache.entry_parts(body, entry)
        model_json, cfg_json, seq_len, work, _ = parts
        if parts in records or json.loads(cfg_json)["amp"] is not other_amp:
            continue
        call = None if work == "None" else ast.parse(work, mode="eval").body  # a pass's repr: Name(field=value, ...)
        pass_ = None if call is None else getattr(instrument_memory, call.func.id)(
            **{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
        out[parts] = asdict(memory._trace(model_json, cfg_json, int(seq_len), pass_)) | {"seconds": 0.0}
    return out


def save(cache_root: Path, path: Path = FILE) -> int:
    """Write every estimate the cache at `cache_root` holds (a whole suite's, preloaded and traced) and the other
    host class's from the file it replaces (other_host_class) to `path`, in the shipped file's format; returns how
    many."""
    from pretrain.plan.ship_estimates import _records, shipped_text

    records = _records(cache_root)
    records |= other_host_class(path, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, shipped_text(records, estimate_cache.code_files(), about=ABOUT))
    return len(records)
