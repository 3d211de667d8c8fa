"""The measured time estimate of a CPU plan: tokens per second of real training steps of each phase, timed on this
CPU by `--probe` and kept in the user's cache, so that every later dry run of the same settings on the same host
and code shows a measured rate without timing anything.

Why not timed by every dry run: a dry run must cost about an `import torch` (issue 20.8), and timing real steps
(a model, a warm-up step, then a median of several steps per phase) cost 2-4 times that on 2 cores. Without a kept
rate the plan says its time is the FLOP estimate (matmul peak x MFU, pretrain/plan/plan.py) and how to measure it.
Why measured at all: a matmul peak says little about a whole step on a few cores (loss, optimizer, Python
overhead: a small model's step can be several times slower than its FLOPs).

Who times it: `--probe` (pretrain/plan/probe.py), in its child process: the median of at least CPU_TIMED_STEPS
steps and CPU_MIN_SECONDS of each phase's planned step after a warm-up (one step slowed by another process does not
set it); and the trainer itself, when the launcher's --run ran it: the median tok/s of its train lines per phase
(`run_rates`), which replaces the probe's figure. The launcher keeps what was measured (`keep_rates`), and a later
dry run reads it (`kept_rates`).

Kept where: one small JSON file per phase in plan-rate/ of the planner's cache folder (estimate_cache.cache_root:
$PRETRAIN_CACHE_DIR, else $XDG_CACHE_HOME/pretrain, else ~/.cache/pretrain), keyed by everything the rate depends on:
  * the host (`host`): its name, CPU model and ISA flags, logical CPUs, torch's thread count, torch's full version
    (with its build) and the CPU kernels it dispatches to, the huge-page setting;
  * the code a step runs (RATE_CODE: every .py file under model/ and pretrain/train/, and the files that time it);
  * the step: model, training settings (micro-batch and accumulation included), sequence length, the optimizer's
    optional package.
A rate timed on another host, by other code, with another thread count or for another micro-batch is never used.
A rate timed while the machine was busy (1-minute load average above its logical CPUs: other processes took cores
the steps wanted) is used only while the machine is busy again: a quiet machine shows the estimate until --probe
times its own. A plan uses kept rates only when every phase has one (one total from one kind of figure). The
plan's time line says when and on which host they were timed, and whether the machine was busy. Delete the folder
to forget them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import cache
from typing import Any

import torch

from model import ModelConfig
from pretrain.plan import estimate_cache
from pretrain.plan.memory import _packages
from pretrain.train.config import TrainConfig
from pretrain.train.host_alloc import THP_ENV

FOLDER = "plan-rate"
# The repo code a timed step runs (folders: every .py file in them), and the files that time and key it.
# tests/test_cpu_rate_cache.py checks that a timed step runs no repo file outside these.
RATE_CODE = ("model", "pretrain/train", "pretrain/units.py", "pretrain/plan/probe.py", "pretrain/plan/cpu_rate.py")


@dataclass(frozen=True)
class Rate:
    """A phase's measured tokens per second, when and where it was timed, and whether it came from the cache."""

    tok_s: float
    measured_at: str  # UTC, to the minute
    host: str
    load: float = 0.0  # the 1-minute load average when timing began
    cached: bool = False
    by: str = "--probe"  # what timed it: --probe, or a run of the launcher's --run (`run_rates`)

    @property
    def busy(self) -> bool:
        """Timed while more processes wanted the CPUs than there are (module docstring)."""
        return _busy(self.load)


def _busy(load: float) -> bool:
    return load > (os.cpu_count() or 1)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0


def load_now() -> float:
    """The 1-minute load average (0 where there is none): taken before timing begins, kept with the rate."""
    return _load()


def _cpuinfo() -> tuple[str, str]:
    """(CPU model, ISA flags) from /proc/cpuinfo; ("", "") where there is none (then platform.processor())."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "Processor", "CPU part") and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor(), flags


def host() -> dict[str, str]:
    """What, besides the code and the step, a measured CPU rate depends on (module docstring)."""
    model, flags = _cpuinfo()
    return {"host": platform.node(), "cpu": model, "isa": flags, "logical_cpus": str(os.cpu_count()),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "kernels": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "huge_pages": os.environ.get(THP_ENV, ""), "python": platform.python_version()}


def code_files() -> tuple[str, ...]:
    """RATE_CODE as relative file paths."""
    out: list[str] = []
    for name in RATE_CODE:
        path = estimate_cache.ROOT / name
        out += [str(p.relative_to(estimate_cache.ROOT)) for p in path.rglob("*.py")] if path.is_dir() else [name]
    return tuple(sorted(out))


@cache
def _host_and_code() -> str:
    return json.dumps([host(), estimate_cache.file_hashes(code_files())], sort_keys=True)


def key(*parts: str) -> str:
    """The cache key of a rate whose step is `parts`, on this host and code."""
    return hashlib.sha256(json.dumps([_host_and_code(), *parts]).encode()).hexdigest()


def _step_parts(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int) -> tuple[str, ...]:
    """What a phase's step is, as key parts: `cfg` is the phase's settings (its micro-batch and accumulation); what
    does not change a step (where it writes, which data, how many steps) is left out."""
    step = replace(cfg, steps=1, out_dir="", data="", micro_batch_schedule="")
    cfg_json = json.dumps(step.to_dict(), sort_keys=True)
    return json.dumps(mcfg.to_dict(), sort_keys=True), cfg_json, str(seq_len), _packages(cfg_json)


_kept: dict[str, Rate] = {}  # this process's rates by key (the disk may be unwritable)


def keep_rates(mcfg: ModelConfig, measured: list[tuple[TrainConfig, int, float]], load: float,
               by: str = "--probe") -> None:
    """Keep the tok/s of each (phase settings, seq_len, tok/s) timed now by `by`, `load` the load average when
    timing began, for later dry runs of the same step on this host and code."""
    folder = estimate_cache.cache_root() / FOLDER
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for cfg, seq_len, tok_s in measured:
        parts = _step_parts(mcfg, cfg, seq_len)
        k, rate = key(*parts), Rate(tok_s, when, platform.node(), load, by=by)
        _kept[k] = rate
        estimate_cache.write_entry(folder, k, {"parts": list(parts), "host": host(), "rate": asdict(rate)})


def kept_rates(mcfg: ModelConfig, phases: list[tuple[TrainConfig, int]]) -> list[Rate] | None:
    """The kept rate of each (phase settings, seq_len), from this process or the user's cache; None unless every
    phase has one that holds here and now (module docstring)."""
    folder = estimate_cache.cache_root() / FOLDER
    busy_now = _busy(_load())
    out: list[Rate] = []
    for cfg, seq_len in phases:
        k = key(*_step_parts(mcfg, cfg, seq_len))
        rate = _kept.get(k)
        if rate is None:
            body = estimate_cache.read_entry(folder, k)
            try:
                rate = replace(Rate(**body["rate"]), cached=True)  # type: ignore[index]
            except (TypeError, KeyError):  # absent, or not a Rate's fields: --probe times it again
                return None
        if rate.busy and not busy_now:  # timed on a busy machine: not the figure of a quiet one
            return None
        _kept[k] = rate
        out.append(rate)
    return out


def rate_source(rates: list[Rate]) -> str:
    """What timed kept rates, when and where, and whether the machine was busy then, for the plan's time line."""
    def load(r: Rate) -> str:
        return f"load {r.load:.1f} on {os.cpu_count()} CPUs"

    return "; ".join(f"by {by}: cached from " + ", ".join(sorted({
        f"{r.measured_at} on {r.host}" + (f" (timed while busy: {load(r)})" if r.busy else "")
        for r in rates if r.by == by})) for by in sorted({r.by for r in rates}))


def run_rates(events: list[dict[str, Any]], phases: list[tuple[int, int, int]]) -> list[float | None]:
    """The trainer's own tok/s of each (start step, end step, seq_len) phase, from a run's train.jsonl events:
    the median of its train lines (evals and checkpoints are not in them: pretrain/train/meter.py) but the first,
    whose window holds the phase's first steps (warm-up, the previous length); None without two lines."""
    out: list[float | None] = []
    for start, end, seq_len in phases:
        lines = [e["tok_s"] for e in events if e.get("type") == "train" and e.get("seq_len") == seq_len
                 and start < e.get("step", 0) <= end and isinstance(e.get("tok_s"), int | float) and e["tok_s"] > 0]
        out.append(statistics.median(lines[1:]) if len(lines) > 1 else None)
    return out
