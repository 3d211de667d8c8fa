"""The memory estimates the test suite's plans trace, kept in the repo so a clean clone's `make test` does not trace
them again (tests/data/suite_estimates.json; the product's own file of this kind: pretrain/plan/shipped_estimates.json).

A fake-tensor estimate costs 0.3-4 CPU-s and the suite's plans (1b tiers with other flags, tiny models at the cpu
tier, the paper presets) need ~220 that the product does not ship: ~270 of a run's ~1,050 CPU-s. Their result is a
pure function of the key parts and of the code that traces them, so the session's cache (conftest) starts with
them, under the keys the code of this checkout computes, only while the file's environment and the hash of every
file an estimate executes equal this checkout's (estimate_cache's rule for the shipped file). Anything else is
traced as before: a stale file costs time, never a wrong figure. Tests that need a cold plan set their own cache
(tests/test_plan_cache.py, test_shipped_estimates.py); tests/test_suite_estimates.py holds the preload to the rule.

The suite's cpu-tier plans follow the host's bf16 (fp32 where it is emulated), so a save keeps only its own host
class's ~60 of them and the other class traces those (~40 s): the file now holds both, the other class's re-traced
under this code from the previous file (each equal to the trace it replaced). A later save drops them again.

Refresh after changing model/, the optimizers or the step tracing (`make test`'s summary says when):

    PRETRAIN_TEST_SAVE_ESTIMATES=1 make test
"""

from __future__ import annotations

from pathlib import Path

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


def save(cache_root: Path, path: Path = FILE) -> int:
    """Write every estimate the cache at `cache_root` holds (a whole suite's, preloaded and traced) to `path`, in the
    shipped file's format; returns how many."""
    from pretrain.plan.ship_estimates import _records, shipped_text

    records = _records(cache_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, shipped_text(records, estimate_cache.code_files(), about=ABOUT))
    return len(records)
