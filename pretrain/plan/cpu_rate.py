"""The time estimate of a CPU plan: tokens per second of real training steps of each phase, timed on this CPU, and
kept in the user's cache so that the next dry run on the same host, code and settings does not time them again.

Why measured: a matmul peak says little about a whole step on a few cores (loss, optimizer, Python overhead).

What is timed (`measured_rates`): the trainer's model and optimizer (pretrain/plan/probe.py's Stepper), built once
for every phase of the plan. The step is timed on the planned micro-batch when the matmul peak says it takes at most
RATE_STEP_SECONDS (a small model's step is dominated by per-step overhead, so a smaller micro-batch would understate
tok/s several-fold), else on one step of at most 2 sequences (a big CPU step is compute-bound, and the optimizer's
share is then overweighted: a slower, safer figure); not at all when even that would take MAX_CPU_STEP_SECONDS
(the plan then uses the matmul peak and says so). One warm-up step at the phase with the most tokens per step
creates the optimizer state and the heap the largest step needs (host memory is kept between steps:
pretrain/train/host_alloc.py), so the smaller phases reuse it; under --compile each shape is warmed up (compiled)
first, as the trainer's first step of a phase compiles it. A phase's rate is the median of at least RATE_TIMED_STEPS
steps and RATE_MIN_SECONDS (one step slowed by another process does not set it).

Kept where: one small JSON file per phase in plan-rate/ of the planner's cache folder (estimate_cache.cache_root:
$PRETRAIN_CACHE_DIR, else $XDG_CACHE_HOME/pretrain, else ~/.cache/pretrain), keyed by everything the rate depends on:
  * the host (`host`): its name, CPU model and ISA flags, logical CPUs, torch's thread count, torch's full version
    (with its build) and the CPU kernels it dispatches to, the huge-page setting;
  * the code a step runs (RATE_CODE: every .py file under model/ and pretrain/train/, and the files that time it);
  * the step: model, training settings, sequence length, micro-batch, timed steps, the optimizer's optional package.
A rate timed on another host, by other code or with another thread count is never used. A rate timed while the
machine was busy (1-minute load average above its logical CPUs: other processes took cores the steps wanted) is
reused only while the machine is busy again, so a quiet machine times its own. The plan's time line says which
rates were timed by this dry run and which come from the cache (when, on which host, busy or not). Delete the folder
to time again.
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

import torch

from model import ModelConfig
from pretrain.plan import estimate_cache
from pretrain.plan.memory import _packages
from pretrain.plan.probe import Stepper
from pretrain.train.config import TrainConfig
from pretrain.train.host_alloc import THP_ENV

# A CPU plan does not time a step the matmul peak says would take longer than this (e.g. --vram cpu --size 1b).
MAX_CPU_STEP_SECONDS = 20.0
# Steps predicted to take at most this long are timed on the planned micro-batch (module docstring).
RATE_STEP_SECONDS = 0.5
# Per phase: the median of at least RATE_TIMED_STEPS steps and RATE_MIN_SECONDS of them (at most MAX_TIMED_STEPS):
# a millisecond step timed 3 times is at the mercy of one scheduler time slice.
RATE_TIMED_STEPS = 3
RATE_MIN_SECONDS = 0.5
FOLDER = "plan-rate"
# The repo code a timed step runs (folders: every .py file in them). tests/test_cpu_rate_cache.py checks that a
# timed step runs no repo file outside these.
RATE_CODE = ("model", "pretrain/train", "pretrain/units.py", "pretrain/plan/probe.py", "pretrain/plan/cpu_rate.py")


@dataclass(frozen=True)
class Rate:
    """A phase's measured tokens per second, when and where it was timed, and whether it came from the cache."""

    tok_s: float
    measured_at: str  # UTC, to the minute
    host: str
    load: float = 0.0  # the 1-minute load average when it was timed
    cached: bool = False

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


@dataclass(frozen=True)
class _Spec:
    """One phase's timed step: the settings it runs (micro-batch included), its length and how many steps."""

    cfg: TrainConfig
    seq_len: int
    steps: int

    def parts(self, mcfg: ModelConfig) -> tuple[str, ...]:
        cfg_json = json.dumps(self.cfg.to_dict(), sort_keys=True)
        return (json.dumps(mcfg.to_dict(), sort_keys=True), cfg_json, str(self.seq_len), str(self.steps),
                _packages(cfg_json))


def _candidates(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, matmul_flops: float) -> list[_Spec]:
    """The steps a phase's rate may come from, best first: the planned micro-batch, then one step of at most 2
    sequences; [] when even that would take too long. The matmul peak picks which one is timed (module docstring),
    but a cached rate of the planned micro-batch is taken whatever this run's peak says: the peak is timed in 0.1 s
    on a busy machine, and would otherwise flip between the two from one dry run to the next."""
    def predicted(micro: int) -> float:
        return micro * seq_len * mcfg.flops_per_token(seq_len) / matmul_flops

    def spec(micro: int, steps: int) -> _Spec:
        return _Spec(replace(cfg, batch_size=micro, grad_accum=1, steps=1, out_dir="", data="",
                             micro_batch_schedule=""), seq_len, steps)

    if predicted(min(cfg.batch_size, 2)) > MAX_CPU_STEP_SECONDS:
        return []
    planned, small = spec(cfg.batch_size, RATE_TIMED_STEPS), spec(min(cfg.batch_size, 2), 1)
    return [planned, small] if predicted(cfg.batch_size) <= RATE_STEP_SECONDS else [small, planned]


_timed: dict[str, Rate] = {}  # this process's rates by key (the disk may be unwritable)


def _time(mcfg: ModelConfig, specs: list[_Spec]) -> list[Rate]:
    """Time `specs` (the same settings but for the micro-batch) on one model, largest step first."""
    when, load = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), _load()
    order = sorted(range(len(specs)), key=lambda i: -specs[i].cfg.batch_size * specs[i].seq_len)
    first = specs[order[0]]
    stepper = Stepper(mcfg, first.cfg, torch.device("cpu"), shapes=len(specs))
    warm = {(s.cfg.batch_size, s.seq_len) for s in specs} if first.cfg.compile else {(first.cfg.batch_size,
                                                                                      first.seq_len)}
    for micro, seq_len in sorted(warm, key=lambda shape: -shape[0] * shape[1]):
        stepper.step(micro, seq_len, 1)  # creates the optimizer state (and, compiled, this shape's graph)
    out: dict[int, Rate] = {}
    for i in order:
        s = specs[i]
        seconds = statistics.median(stepper.timed(s.cfg.batch_size, s.seq_len, 1, s.steps,
                                                  RATE_MIN_SECONDS if s.steps > 1 else 0.0))
        out[i] = Rate(s.cfg.batch_size * s.seq_len / seconds, when, platform.node(), load)
    return [out[i] for i in range(len(specs))]


def measured_rates(mcfg: ModelConfig, phases: list[tuple[TrainConfig, int]], matmul_flops: float) -> list[Rate | None]:
    """Tokens per second of whole real CPU steps of each (settings, seq_len) phase (module docstring): from this
    process, else the user's cache, else timed now (and kept); None for a phase whose step would take too long."""
    folder = estimate_cache.cache_root() / FOLDER

    busy_now = _busy(_load())

    def cached(k: str) -> bool:
        if k not in _timed:
            body = estimate_cache.read_entry(folder, k)
            try:
                rate = replace(Rate(**body["rate"]), cached=True)  # type: ignore[index]
            except (TypeError, KeyError):  # absent, or not a Rate's fields: timed again and replaced
                return False
            if rate.busy and not busy_now:  # timed on a busy machine: not the figure of a quiet one
                return False
            _timed[k] = rate
        return True

    specs: list[_Spec | None] = []
    keys: list[str | None] = []
    for cfg, seq_len in phases:
        options = {key(*s.parts(mcfg)): s for s in _candidates(mcfg, cfg, seq_len, matmul_flops)}
        ranked = sorted(options, key=lambda k: (options[k].cfg.batch_size, options[k].steps) !=
                        (cfg.batch_size, RATE_TIMED_STEPS))  # the planned micro-batch first
        k = next((k for k in ranked if cached(k)), next(iter(options), None))  # else the one to time
        keys.append(k)
        specs.append(None if k is None else options[k])
    missing = {k: s for k, s in zip(keys, specs) if k is not None and s is not None and k not in _timed}
    groups: dict[str, dict[str, _Spec]] = {}
    for k, s in missing.items():  # phases differing only in their micro-batch share one model
        groups.setdefault(json.dumps(replace(s.cfg, batch_size=1).to_dict(), sort_keys=True), {})[k] = s
    for group in groups.values():
        for k, rate in zip(group, _time(mcfg, list(group.values()))):
            _timed[k] = rate
            estimate_cache.write_entry(folder, k, {"parts": list(group[k].parts(mcfg)), "host": host(),
                                                   "rate": asdict(rate)})
    return [None if k is None else _timed[k] for k in keys]


def rate_source(rates: list[Rate]) -> str:
    """Where a plan's measured rates come from, for its time line: timed by this dry run, or cached (when, where),
    and whether the machine was busy then."""
    def load(r: Rate) -> str:
        return f"load {r.load:.1f} on {os.cpu_count()} CPUs"

    parts = []
    now = [r for r in rates if not r.cached]
    if now and now[0].busy:
        parts.append(f"timed by this dry run while the machine was busy ({load(now[0])}; kept for later dry runs "
                     "while it stays busy)")
    elif now:
        parts.append("timed by this dry run (kept: later dry runs of these settings on this host read it)")
    cached = sorted({f"{r.measured_at} on {r.host}" + (f" (timed while busy: {load(r)})" if r.busy else "")
                     for r in rates if r.cached})
    if cached:
        parts.append(f"cached from {', '.join(cached)}")
    return "; ".join(parts)
