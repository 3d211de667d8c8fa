"""Peak GPU memory of one training step (and of the passes the trainer runs beside it), estimated without a GPU.

The step is run on fake tensors under the memory tracker (pretrain/plan/step_trace.py: how, and why it is the
steady state); this module turns the recorded timelines into the estimate, with the allowance for what tensors do
not show, and keeps estimates on disk.

Depth: a 22-layer model is not tracked block by block. Blocks are identical, so models with a few blocks are
tracked op by op and the 22-block timeline is rebuilt from them (see `_extrapolate`). This is exact, not a
fit: tests/test_memory.py and tests/test_plan_cold.py compare it byte for byte with full runs; a timeline of
unexpected shape falls back to tracking the full model. Estimates are kept on disk, and those of every GPU tier's
default dry run with each --variant ship in the repo (both: pretrain/plan/estimate_cache.py, keyed by their
arguments, torch and the code an estimate runs; an edited model or optimizer, or another torch, falls back to
tracing: correct, slower). The tracker (pretrain/plan/peak_tracker.py, ~1.5 s of imports) is imported only when one
is traced: a dry run of a shipped tier, or one made before, costs about an `import torch`.

What the figure is. `tensor_peak` is what `torch.cuda.max_memory_allocated()` should report for the step.
The device needs more than that; `allowance` adds a stated amount for what tensors do not show:
  * CUDA context, cuBLAS/cuDNN workspaces and kernels loaded: CUDA_CONTEXT_BYTES (0.75 GiB; CUDA 12 with lazy
    module loading takes ~0.3-0.6 GiB for the context, cuBLAS up to a few hundred MiB of workspaces);
  * caching-allocator rounding and fragmentation: FRAGMENTATION (10 %) of the tensor peak (reserved memory
    usually runs 3-15 % above allocated in steady training; expandable_segments lowers it).
Not modelled: torch.compile (usually lowers activation memory by fusing pointwise ops, so eager is the safer
figure) and FSDP sharding (the estimate is per unsharded replica, an upper bound). Under torchrun on CUDA the
planner adds `comm_bytes`: NCCL's communicator buffers, and DDP's gradient buckets (pretrain/plan/fit.py).

What the trainer runs beside the step (evaluation, diagnostics, samples, downstream) is estimated the same way by
`estimate_pass_memory`: the pass (pretrain/plan/instrument_memory.py) runs the trainer's own code on the fake
model, in the steady state the trainer calls it in (optimizer state present, gradients freed).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field

from model import ModelConfig
from pretrain.plan import estimate_cache

# Re-exported: tests and bench/optim_state.py reach the step tracing through this module.
from pretrain.plan.step_trace import (  # noqa: F401
    MEMORY_FIELDS,
    Pass,
    _fake_state,
    _measure,
    _relevant,
    _Run,
    _steady_state,
    _update_ops,
)
from pretrain.train.config import TrainConfig

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
FRAGMENTATION = 0.10
# NCCL per rank: channel buffers (NCCL_BUFFSIZE 4 MiB x up to 32 channels x send/recv) plus the communicator and
# proxy state; a few hundred MiB on one node, so 0.5 GiB is a stated, rounded-up allowance.
NCCL_BYTES = int(0.5 * GiB)
# A CPU run has no CUDA context, but the Python process with torch loaded holds ~0.5 GiB resident.
CPU_PROCESS_BYTES = int(0.5 * GiB)

EXTRAPOLATE_FROM = 1  # deeper models are rebuilt from runs with 1 and 2 blocks (see `_extrapolate`)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step; `device_bytes()` adds the allowance, to compare with device memory."""

    tensor_peak_bytes: int  # what torch.cuda.max_memory_allocated() should report
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # at the peak: params, grads, optimizer, activations...
    seconds: float = 0.0
    extrapolated: bool = False  # rebuilt from 1- and 2-block timelines (see the module docstring)

    @property
    def state_bytes(self) -> int:
        """Model weights + optimizer state: what a checkpoint holds (a few KB of counters aside)."""
        return self.param_bytes + self.optimizer_bytes

    def device_bytes(self, device: str = "cuda") -> int:
        return self.tensor_peak_bytes + allowance(self.tensor_peak_bytes, device)


def allowance(tensor_peak_bytes: int, device: str = "cuda") -> int:
    """Bytes the device needs beyond live tensors (see the module docstring for the numbers)."""
    base = CUDA_CONTEXT_BYTES if device == "cuda" else CPU_PROCESS_BYTES
    return base + int(FRAGMENTATION * tensor_peak_bytes)


def comm_bytes(nproc: int, device: str = "cuda") -> int:
    """Device bytes the collective library holds per rank: NCCL under torchrun on CUDA, nothing otherwise."""
    return NCCL_BYTES if nproc > 1 and device == "cuda" else 0


Segment = tuple[tuple[bool, int | None], int, int]  # (in backward?, block or None), highest rise, net change


def _segments(run: _Run) -> list[Segment]:
    """The op timeline cut where the (phase, block) key changes."""
    out: list[Segment] = []
    start = level = high = run.level0
    prev = None
    for key, total in run.ops:
        if prev is not None and key != prev:
            out.append((prev, high - start, level - start))
            start = high = level
        level, high, prev = total, max(high, total), key
    if prev is not None:
        out.append((prev, high - start, level - start))
    return out


def _extrapolate(a: _Run, b: _Run, n_a: int, n_layer: int) -> int | None:
    """Peak of the step with `n_layer` blocks from the timelines of runs with n_a and n_a + 1 blocks.

    Blocks are identical, so the deep timeline is the deeper run's with its last block's forward and backward
    segments repeated for every block after the first n_a (a pass may run several forwards, each with or without
    a backward, e.g. no_grad evals). Only the first block differs from the others (its input is the embedding's
    output), so runs with 1 and 2 blocks suffice: tests/test_plan_cold.py holds the result equal, byte for byte, to
    tracking every block (repeating the first block instead is not exact). Everything else may grow with
    depth (the level at the start: weights, optimizer state, held gradients; the autocast cast cache freed when
    the forward ends; per-parameter optimizer work), and it grows linearly, so each other segment is extrapolated
    from the two runs. Returns None when the timelines do not have the expected shape (the caller then tracks the
    full model).
    """
    sa, sb = _segments(a), _segments(b)

    def shape(segs: list[Segment], n: int) -> bool:
        blocks = [k for k, _, _ in segs if k[1] is not None]
        forward, backward = [(False, i) for i in range(n)], [(True, i) for i in range(n - 1, -1, -1)]
        i = 0
        while i < len(blocks):
            if blocks[i:i + n] != forward:
                return False
            i += n
            if blocks[i:i + n] == backward:
                i += n
        return bool(blocks)

    others_a = [s for s in sa if s[0][1] is None]
    others_b = [s for s in sb if s[0][1] is None]
    if not (shape(sa, n_a) and shape(sb, n_a + 1)) or [s[0] for s in others_a] != [s[0] for s in others_b]:
        return None
    extra = n_layer - n_a
    grown = iter([(k, ra + extra * (rb - ra), ca + extra * (cb - ca))
                  for (k, ra, ca), (_, rb, cb) in zip(others_a, others_b)])
    level = a.level0 + extra * (b.level0 - a.level0)
    peak = level
    for key, rise, change in sb:
        if key[1] is None:
            _, rise, change = next(grown)
        repeat = extra if key[1] == n_a else 1  # the last block of b stands for the rest
        for _ in range(repeat):
            peak = max(peak, level + rise)
            level += change
    return peak


def _estimate(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, fake: bool = True,
              extrapolate: bool = True, work: Pass | None = None) -> MemoryEstimate:
    t0 = time.perf_counter()
    n = EXTRAPOLATE_FROM
    if extrapolate and mcfg.n_layer > n + 1:
        a, b = (_measure(ModelConfig.from_dict(mcfg.to_dict() | {"n_layer": k}), cfg, seq_len, fake, record=True,
                         work=work) for k in (n, n + 1))
        peak = _extrapolate(a, b, n, mcfg.n_layer)
        if peak is not None:
            extra = mcfg.n_layer - n
            pb, gb, ob = (x + extra * (y - x) for x, y in zip((a.param_bytes, a.grad_bytes, a.optimizer_bytes),
                                                                (b.param_bytes, b.grad_bytes, b.optimizer_bytes)))
            held = gb if cfg.grad_accum > 1 and work is None else 0
            breakdown = {"params": pb, "optimizer": ob, "grads": held,
                         "activations_and_temporaries": peak - pb - ob - held}
            return MemoryEstimate(peak, pb, gb, ob, {k: v for k, v in breakdown.items() if v},
                                  time.perf_counter() - t0, extrapolated=True)
    run = _measure(mcfg, cfg, seq_len, fake, work=work)
    return MemoryEstimate(run.peak, run.param_bytes, run.grad_bytes, run.optimizer_bytes,
                          {k: v for k, v in run.breakdown.items() if v}, time.perf_counter() - t0)


@functools.lru_cache(maxsize=256)
def _cached(model_json: str, cfg_json: str, seq_len: int, work: Pass | None = None) -> MemoryEstimate:
    """The fake-tensor estimate, from this process's cache, else the user's disk cache, else the estimates shipped
    with the repo (both: pretrain/plan/estimate_cache.py), else traced and stored on disk. A pass is a frozen
    dataclass: its repr names its class and every field."""
    parts = (model_json, cfg_json, str(seq_len), repr(work), _packages(cfg_json))
    hit = estimate_cache.load(parts)
    if hit is not None:
        try:
            return MemoryEstimate(**hit)
        except TypeError:  # not a MemoryEstimate's fields: recompute and replace it
            pass
    est = _trace(model_json, cfg_json, seq_len, work)
    estimate_cache.store(parts, asdict(est))
    return est


def _trace(model_json: str, cfg_json: str, seq_len: int, work: Pass | None) -> MemoryEstimate:
    """The estimate of these key parts, traced on fake tensors (pretrain/plan/ship_estimates.py watches this call to
    find the files an estimate executes)."""
    return _estimate(ModelConfig.from_dict(json.loads(model_json)), TrainConfig.from_dict(json.loads(cfg_json)),
                     seq_len, work=work)


def _packages(cfg_json: str) -> str:
    """The optional package the settings' optimizer runs (torchao for adamw8bit) with its installed version: a
    key part, so an estimate is not reused under another version of code that is neither torch nor the repo's."""
    from pretrain.train.optim_registry import OPTIMIZERS

    spec = OPTIMIZERS.get(json.loads(cfg_json).get("optimizer"))
    if spec is None or not spec.requires:
        return "{}"
    from importlib import metadata

    try:
        version: str | None = metadata.version(spec.requires)
    except metadata.PackageNotFoundError:
        version = None
    return json.dumps({spec.requires: version}, sort_keys=True)


def estimate_step_memory(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, fake: bool = True,
                         extrapolate: bool = True) -> MemoryEstimate:
    """Peak memory of one training step of `mcfg` under `cfg` (micro-batch, accumulation, dtypes, checkpointing,
    optimizer) at `seq_len`. fake=False runs real tensors (tests); extrapolate=False tracks every block.
    Fake-tensor results are cached per (model, memory-relevant settings, seq_len)."""
    if not fake or not extrapolate:
        return _estimate(mcfg, cfg, seq_len, fake, extrapolate)
    # Only whether accumulation happens matters (gradients held during the forward), not how many micro-batches.
    return _cached(json.dumps(mcfg.to_dict(), sort_keys=True), _relevant(cfg, grad_accum=min(cfg.grad_accum, 2)),
                   seq_len)


def estimate_pass_memory(mcfg: ModelConfig, cfg: TrainConfig, work: Pass, fake: bool = True,
                         extrapolate: bool = True) -> MemoryEstimate:
    """Peak memory while the trainer runs `work` (an eval, the diagnostics...: pretrain/plan/instrument_memory.py)
    between steps: weights and optimizer state of `cfg`'s run, no gradients, plus what the pass allocates. The
    pass carries its own shapes; from `cfg` only dtypes, checkpointing and the optimizer matter. Cached like
    `estimate_step_memory`; `grads` in the figures are the weights' size (what a pass's backward produces)."""
    if not fake or not extrapolate:
        return _estimate(mcfg, cfg, 0, fake, extrapolate, work)
    return _cached(json.dumps(mcfg.to_dict(), sort_keys=True), _relevant(cfg, batch_size=1, grad_accum=1), 0, work)


def __getattr__(name: str) -> object:
    # The tracker moved to pretrain/plan/peak_tracker.py (imported only when an estimate runs); the old name stays.
    if name == "_PeakTracker":
        from pretrain.plan.peak_tracker import PeakTracker

        return PeakTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
