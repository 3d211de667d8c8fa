"""Measured instead of estimated: a few real optimizer steps of the planned config, on the actual device.

Used two ways:
  * `run_1b_launch.py ... --probe`: for each phase of the sequence schedule, real steps at the planned micro-batch
    measure peak memory (`torch.cuda.max_memory_allocated()` on a GPU; on CPU the MemTracker figure of the same
    step on real tensors) and tok/s. When the measured peak does not fit (<= FITS of the device), the micro-batch
    halves until it does; when it fits and the doubled micro-batch is predicted to fit too, that is tried (an
    out-of-memory error counts as "does not fit"), like a batch-size finder. The probe runs in a child process
    (`python -m pretrain.plan.probe`, request on stdin, JSON on stdout) on every device, as the trainer does: its
    CUDA context and cached memory are gone before the trainer starts, an out-of-memory crash cannot take the
    launcher with it, and it starts from the trainer's process state (allocator setting, no compiled graphs).
  * on CPU the launcher keeps the probe's tok/s per phase (pretrain/plan/cpu_rate.py): later dry runs of the same
    settings on this host show it instead of the FLOP estimate.

A probed step runs at most 2 micro-batches: memory depends only on whether earlier gradients are held, and the
rate then slightly overweights the optimizer step (a conservative figure). Nothing is written to disk here.
The model is built by the trainer's own `speed.build_model` (dtype, checkpointing, per-block static-shape compile,
compile errors run eagerly), each measurement from a fresh dynamo state; what dynamo did is in `Measured.compile`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import ModelConfig
from pretrain.plan.fit import FITS, PREDICTION_SLACK, micro_options, with_micro
from pretrain.plan.memory import allowance, estimate_step_memory
from pretrain.train import device as dev
from pretrain.train import speed
from pretrain.train.config import TrainConfig
from pretrain.train.host_alloc import configure_host_memory
from pretrain.train.host_process import with_host_settings
from pretrain.train.optim import build_optimizer, step_unless_nonfinite

WARMUP_STEPS, TIMED_STEPS = 1, 2
# On CPU a phase's rate is the median of at least CPU_TIMED_STEPS steps and CPU_MIN_SECONDS of them (at most
# MAX_TIMED_STEPS): a millisecond step timed twice is at the mercy of one scheduler time slice, and the launcher keeps
# this figure for later dry runs (pretrain/plan/cpu_rate.py).
CPU_TIMED_STEPS, CPU_MIN_SECONDS = 3, 0.5
MAX_PROBED_ACCUM = 2
# The directory holding the `pretrain` package: the child process imports it from there whatever the launcher's cwd.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
MAX_TIMED_STEPS = 200  # a timed measurement with a minimum duration stops here whatever the step takes


@dataclass
class Measured:
    """One probed micro-batch at one sequence length."""

    micro_batch: int
    tok_s: float | None = None
    step_seconds: float | None = None
    peak_bytes: int | None = None  # tensors: what max_memory_allocated() reports
    device_bytes: int | None = None  # + the planner's allowance, compared with the device
    error: str | None = None  # "out of memory" when the step did not run
    fixed_bytes: int = 0  # weights + optimizer state + held gradients: what does not grow with the micro-batch
    compile: dict[str, int] | None = None  # --compile: speed.compile_counts() of this measurement, else None


@dataclass
class PhaseProbe:
    """The probe of one phase: every micro-batch tried, and the one it picked (None: none fitted)."""

    seq_len: int
    planned_micro_batch: int
    picked_micro_batch: int | None
    memory_how: str
    tried: list[Measured] = field(default_factory=list)

    @property
    def picked(self) -> Measured | None:
        return next((m for m in self.tried if m.micro_batch == self.picked_micro_batch), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseProbe:
        return cls(**(d | {"tried": [Measured(**m) for m in d["tried"]]}))


def _fresh_compile_state() -> None:
    """Dynamo as a trainer process starts with it. The blocks of every model built here are one frame (Block.forward),
    so earlier measurements' shapes would otherwise count against the recompile limit and their counters add up."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


class Stepper:
    """The trainer's model, optimizer and step for `cfg` on `device` (built by speed.build_model), stepped at any
    micro-batch and sequence length (--probe times one shape per model)."""

    def __init__(self, mcfg: ModelConfig, cfg: TrainConfig, device: torch.device) -> None:
        if cfg.compile:
            _fresh_compile_state()
        torch.manual_seed(0)
        self.mcfg, self.cfg, self.device = mcfg, cfg, device
        self.fp16 = cfg.amp and cfg.amp_dtype == "fp16"
        self.model = speed.build_model(mcfg, cfg, device)  # one compiled shape: each probed step has a model
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        self.autocast = dev.autocast(device, cfg.amp, dev.amp_dtype(cfg.amp_dtype))

    def step(self, micro: int, seq_len: int, accum: int) -> None:
        """One optimizer step of `accum` micro-batches of `micro` random sequences of `seq_len` tokens."""
        model, optimizer, scaler, device = self.model, self.optimizer, self.scaler, self.device
        for _ in range(accum):
            x = torch.randint(0, self.mcfg.vocab_size, (micro, seq_len), device=device)
            y = torch.randint(0, self.mcfg.vocab_size, (micro, seq_len), device=device)
            with self.autocast:
                loss = model(x, y) / accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip or math.inf)
        if self.fp16:
            scaler.step(optimizer)
            scaler.update()
        else:
            step_unless_nonfinite(optimizer, (~torch.isfinite(norm)).float())
        optimizer.zero_grad(set_to_none=True)

    def timed(self, micro: int, seq_len: int, accum: int, steps: int, min_seconds: float = 0.0) -> list[float]:
        """Seconds of each of at least `steps` steps (and `min_seconds` of them, at most MAX_TIMED_STEPS)."""
        dev.synchronize(self.device)
        times: list[float] = []
        while len(times) < steps or (sum(times) < min_seconds and len(times) < MAX_TIMED_STEPS):
            t0 = time.perf_counter()
            self.step(micro, seq_len, accum)
            dev.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return times


def _train_steps(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, device: torch.device, steps: int,
                 min_seconds: float = 0.0) -> tuple[float, int | None, int, dict[str, int] | None]:
    """Median seconds per step of at least `steps` real optimizer steps (and `min_seconds` of them) after a
    warm-up, the CUDA peak (None on CPU), the bytes of weights + optimizer state + gradients held between
    micro-batches, and with --compile what dynamo did."""
    stepper = Stepper(mcfg, cfg, device)  # one training shape here: this seq_len at this micro-batch
    accum = min(cfg.grad_accum, MAX_PROBED_ACCUM)
    for _ in range(WARMUP_STEPS):  # compiles, creates the optimizer state
        stepper.step(cfg.batch_size, seq_len, accum)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # The median: one step slowed by another process on the host does not set the rate.
    seconds = statistics.median(stepper.timed(cfg.batch_size, seq_len, accum, steps, min_seconds))
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    params = {id(p): p for p in stepper.model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(t.numel() * t.element_size() for s in stepper.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    compiled = speed.compile_counts() if cfg.compile else None
    return seconds, peak, weights + state + (weights if accum > 1 else 0), compiled


def measure(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, device: torch.device,
            with_memory: bool = True, steps: int = TIMED_STEPS, min_seconds: float = 0.0) -> Measured:
    """Time (and measure the memory of) real steps of `cfg` at `seq_len`; out of memory is a result, not a crash."""
    accum = min(cfg.grad_accum, MAX_PROBED_ACCUM)
    out = Measured(cfg.batch_size)
    try:
        seconds, peak, out.fixed_bytes, out.compile = _train_steps(mcfg, cfg, seq_len, device, steps, min_seconds)
    except torch.OutOfMemoryError:
        out.error = "out of memory"
        return out
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.step_seconds, out.tok_s = seconds, accum * cfg.batch_size * seq_len / seconds
    if with_memory:
        if peak is None:  # CPU: the MemTracker figure of the same step on real tensors
            peak = estimate_step_memory(mcfg, cfg, seq_len, fake=False, extrapolate=False).tensor_peak_bytes
        out.peak_bytes = peak
        out.device_bytes = peak + allowance(peak, device.type)
    return out


def probe_phase(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, device: torch.device, capacity: int,
                sequences_per_proc: int) -> PhaseProbe:
    """Measure the planned micro-batch; halve while it does not fit, double while the doubled one fits."""
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "MemTracker on real tensors (cpu)"
    result = PhaseProbe(seq_len, cfg.batch_size, None, how)
    opts = micro_options(sequences_per_proc)
    i = opts.index(cfg.batch_size) if cfg.batch_size in opts else 0

    steps, min_seconds = (CPU_TIMED_STEPS, CPU_MIN_SECONDS) if device.type == "cpu" else (TIMED_STEPS, 0.0)

    def run(k: int) -> Measured:
        m = measure(mcfg, with_micro(cfg, opts[k], sequences_per_proc), seq_len, device, steps=steps,
                    min_seconds=min_seconds)
        result.tried.append(m)
        return m

    def fits(m: Measured) -> bool:
        return m.device_bytes is not None and m.device_bytes <= FITS * capacity

    m = run(i)
    while not fits(m) and i > 0:
        i -= 1
        m = run(i)
    if not fits(m):
        return result
    result.picked_micro_batch = opts[i]
    while i + 1 < len(opts):
        # Predict the doubled step from this one: what is not weights, optimizer state or held gradients grows
        # in proportion (an overstatement when part of it is constant, hence the slack).
        tensors = m.fixed_bytes + (m.peak_bytes - m.fixed_bytes) * opts[i + 1] // opts[i]
        if tensors + allowance(tensors, device.type) > PREDICTION_SLACK * FITS * capacity:
            break
        bigger = run(i + 1)
        if not fits(bigger):
            break
        i, m = i + 1, bigger
        result.picked_micro_batch = opts[i]
    return result


def probe_plan(mcfg: ModelConfig, cfg: TrainConfig, phases: list[tuple[int, int]], capacity: int,
               sequences_per_proc: int) -> list[PhaseProbe]:
    """Probe each (seq_len, planned micro-batch) on cfg.device, in a child process (module docstring)."""
    request = {"model": mcfg.to_dict(), "cfg": cfg.to_dict(), "phases": phases, "capacity": capacity,
               "sequences_per_proc": sequences_per_proc}
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = with_host_settings({**os.environ, "PYTHONPATH": path})
    done = subprocess.run([sys.executable, "-m", "pretrain.plan.probe"], input=json.dumps(request),
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        from pretrain.errors import UserError

        check = "" if cfg.device == "cpu" else ", or check the GPU with nvidia-smi"
        raise UserError(f"--probe failed on {cfg.device} ({tail}); plan without --probe{check}")
    return [PhaseProbe.from_dict(d) for d in json.loads(done.stdout)]


def _child() -> int:
    """`python -m pretrain.plan.probe`: the GPU probe, request (JSON) on stdin, results (JSON) on stdout."""
    configure_host_memory()  # as the trainer's entry (huge pages come with the environment, set before torch)
    req = json.loads(sys.stdin.read())
    mcfg, cfg = ModelConfig.from_dict(req["model"]), TrainConfig.from_dict(req["cfg"])
    if cfg.device != "cpu":
        speed.configure_cuda_allocator()  # as the trainer (loop.train): before the first CUDA allocation
    device = dev.resolve_device(cfg.device)
    dev.setup_device(device)
    per_proc = req["sequences_per_proc"]
    with contextlib.redirect_stdout(sys.stderr):  # compile / library chatter must not corrupt the JSON
        out = [probe_phase(mcfg, with_micro(cfg, b, per_proc), t, device, req["capacity"], per_proc).to_dict()
               for t, b in req["phases"]]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
