"""Peak GPU memory of one training step, estimated without a GPU.

How: build the planned model and the trainer's own optimizer inside `FakeTensorMode` on device cpu (fake
tensors carry shapes and dtypes but allocate nothing), then run one real training step as the trainer does it
(autocast forward with the chunked loss, backward, grad clipping, optimizer step) under
torch's MemTracker (pretrain/plan/peak_tracker.py), which follows every tensor storage as it is created and freed
and records the highest total. Fake cuda tensors abort on backward in a CPU-only torch, so the tensors are cpu
ones; CPU scaled_dot_product_attention runs a flash kernel whose saved tensors (output + logsumexp) match CUDA
flash attention, and bf16/fp16 autocast casts the same matmuls on both devices.

Steady state. The tracked step is a later one, not the first: the optimizer state (created lazily by the first
`step()`) exists before it, and with `grad_accum > 1` the gradients of the earlier micro-batches are held
throughout (the last micro-batch of a step is the fullest one).

Speed: a 22-layer model is not tracked block by block. Blocks are identical, so models with 3 and 4 blocks
are tracked op by op and the 22-block timeline is rebuilt from them (see `_extrapolate`). This is exact, not a
fit: tests/test_memory.py compares it byte for byte with full runs; a timeline of unexpected shape falls back
to tracking the full model. The 1b preset takes ~2 s instead of ~5 s per estimate (most of it fake-tensor and
tracker dispatch, ~0.3 ms per op whatever the model's width). The update after the backward (unscale, clip,
optimizer step: about half of a step's ops) allocates the same whatever the micro-batch, sequence length or
checkpointing, so it is tracked once per model and optimizer settings and its timeline appended to each step's
forward and backward (`_update_ops`; tests/test_plan_fast.py holds it equal op for op). Estimates are kept on disk
(pretrain/plan/estimate_cache.py, keyed by their arguments and the code), and the tracker
(pretrain/plan/peak_tracker.py, ~1.5 s of imports) is imported only when one is computed: a dry run that was
made before costs about an `import torch`.

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

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from model import GPT, ModelConfig
from pretrain.plan import estimate_cache
from pretrain.train.config import TrainConfig
from pretrain.train.optim import build_optimizer, step_unless_nonfinite
from pretrain.train.weight_cache import cache_dtype, weights_cast_once
from pretrain.units import torch_dtype

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
FRAGMENTATION = 0.10
# NCCL per rank: channel buffers (NCCL_BUFFSIZE 4 MiB x up to 32 channels x send/recv) plus the communicator and
# proxy state; a few hundred MiB on one node, so 0.5 GiB is a stated, rounded-up allowance.
NCCL_BYTES = int(0.5 * GiB)
# A CPU run has no CUDA context, but the Python process with torch loaded holds ~0.5 GiB resident.
CPU_PROCESS_BYTES = int(0.5 * GiB)

EXTRAPOLATE_FROM = 3  # deeper models are rebuilt from runs with 3 and 4 blocks
# A pass the trainer runs beside the training step: called with the model (in training mode, no gradients) and
# the autocast context of the run, inside the tracker; hashable (a frozen dataclass), so estimates are cached.
Pass = Callable[[GPT, contextlib.AbstractContextManager], None]
# TrainConfig fields that change what one training step allocates (everything else is irrelevant to memory).
MEMORY_FIELDS = ("batch_size", "grad_accum", "param_dtype", "amp", "amp_dtype", "grad_checkpoint", "optimizer",
                 "checkpoint_policy",
                 "opt_fused", "bf16_weight_cache")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step; `device_bytes()` adds the allowance, to compare with device memory."""

    tensor_peak_bytes: int  # what torch.cuda.max_memory_allocated() should report
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # at the peak: params, grads, optimizer, activations...
    seconds: float = 0.0
    extrapolated: bool = False  # rebuilt from a 3-block timeline (see the module docstring)

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


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Built directly in the parameter dtype: Module.to() cannot swap fake parameters, and the result is the
    # same tensors the trainer gets from GPT(cfg).to(dtype).
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _nbytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of distinct tensors (a tied weight appears once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class _Run:
    """What one tracked step recorded: the level before it, then (segment key, total after each op)."""

    level0: int
    ops: list[tuple[tuple[bool, int | None], int]]
    peak: int
    breakdown: dict[str, int]
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int


def _bytes_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes; gradients have the weights' size and dtype."""
    params = list(model.parameters())
    state = [v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return _nbytes(iter(params)), _nbytes(iter(params)), _nbytes(iter(state))


def _steady_state(mcfg: ModelConfig, cfg: TrainConfig, fake: bool) -> tuple:
    """(tensor mode, model, optimizer) as between two steps after the first: the optimizer state exists (it is
    created lazily by the first step(), so take one on zero gradients), the gradients are freed."""
    param_dtype = torch_dtype(cfg.param_dtype)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        with _default_dtype(param_dtype):
            model = GPT(mcfg)
        model.grad_checkpoint = cfg.grad_checkpoint
        model.checkpoint_policy = cfg.checkpoint_policy
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return mode, model, optimizer


@functools.lru_cache(maxsize=16)
def _fake_state(model_json: str, cfg_json: str) -> tuple:
    """The fake steady state, built once per model and memory-relevant settings: the optimizer's first step on
    fake tensors is a large part of an estimate's time, and a tracked step or pass leaves the state as it found
    it (gradients freed again; each run starts in train mode with the chunked loss's kept buffers dropped, so it
    allocates them under the tracker)."""
    mcfg = ModelConfig.from_dict(json.loads(model_json))
    return _steady_state(mcfg, TrainConfig.from_dict(json.loads(cfg_json)), fake=True)


def _state_key(mcfg: ModelConfig, cfg: TrainConfig) -> tuple[str, str]:
    """The key of `_fake_state` (and of `_update_ops`): the model, and the settings that shape weights and
    optimizer state. Checkpointing is a flag the step reads, set on the shared model before each run."""
    return json.dumps(mcfg.to_dict(), sort_keys=True), _relevant(cfg, batch_size=1, grad_accum=1,
                                                                 grad_checkpoint=False, bf16_weight_cache=False)


def _update(model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: TrainConfig) -> None:
    """The update after the backward (pretrain/train/loop.py): unscale, clip, optimizer step, gradients freed."""
    params = list(model.parameters())
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
    if scaler.is_enabled():
        # What scaler.step() runs for finite gradients; its own found-inf check calls .item(), which fake
        # tensors cannot answer, and scaler.update() only touches two scalars.
        optimizer.step()
    else:
        step_unless_nonfinite(optimizer, (~torch.isfinite(grad_norm)).float())
    del grad_norm
    optimizer.zero_grad(set_to_none=True)


def _scaler(cfg: TrainConfig) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=cfg.amp and cfg.amp_dtype == "fp16")


@functools.lru_cache(maxsize=16)
def _update_ops(model_json: str, cfg_json: str) -> tuple[tuple[tuple[bool, int | None], int], ...]:
    """The update's op timeline as (segment key, bytes above the level it starts from), tracked once per fake
    state. It allocates the same whatever the micro-batch, sequence length or checkpointing (its inputs are the
    weights, their gradients and the optimizer state), and it is about half of a step's ops, so a recorded step
    runs only the forward and backward and appends this (`_measure`); tests/test_plan_fast.py holds the result
    equal to tracking the whole step."""
    mode, model, optimizer = _fake_state(model_json, cfg_json)
    cfg = TrainConfig.from_dict(json.loads(cfg_json))
    with mode:
        for p in model.parameters():  # as the backward leaves them
            p.grad = torch.zeros_like(p)
        scaler = _scaler(cfg)
        if scaler.is_enabled():
            scaler.scale(torch.ones(()))  # the scale tensor the step's scaler.scale(loss) creates
        from pretrain.plan.peak_tracker import PeakTracker

        tracker = PeakTracker(record=True)
        tracker.track_external(model, optimizer)
        with tracker:
            level0 = tracker.total()
            _update(model, optimizer, scaler, cfg)
    return tuple((k, total - level0) for k, total in tracker.ops)


def _measure(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, fake: bool, record: bool = False,
             work: Pass | None = None, reuse_update: bool = True) -> _Run:
    """One steady-state training step of `cfg` at `seq_len` (or the pass `work`, which runs between steps:
    gradients freed), tracked; real tensors when fake=False. A recorded fake step takes its update's timeline from
    `_update_ops` (the peak and breakdown then cover the forward and backward only; `_extrapolate` reads the ops)."""
    amp_dtype = torch_dtype(cfg.amp_dtype)
    reuse_update = reuse_update and fake and record and work is None
    if fake:
        mode, model, optimizer = _fake_state(*_state_key(mcfg, cfg))
        model.grad_checkpoint = cfg.grad_checkpoint
        model.checkpoint_policy = cfg.checkpoint_policy
        update_ops = _update_ops(*_state_key(mcfg, cfg)) if reuse_update else ()  # before this step's tracker
    else:
        mode, model, optimizer = _steady_state(mcfg, cfg, fake)
    with mode:
        held = work is None and cfg.grad_accum > 1
        for p in model.parameters():  # with accumulation the earlier micro-batches' gradients are held throughout
            p.grad = torch.zeros_like(p) if held else None
        model.train()
        model.loss_workspace.clear()
        scaler = _scaler(cfg)
        autocast = torch.autocast("cpu", dtype=amp_dtype) if cfg.amp else contextlib.nullcontext()
        from pretrain.plan.peak_tracker import PeakTracker  # 1.5 s of imports: only when an estimate runs

        tracker = PeakTracker(record)
        tracker.track_external(model, optimizer)
        # Name every module from the root now: passes call parts of the model (hidden_states, lm_head) directly,
        # and a block first met on its own would otherwise be named "Block", not "GPT.blocks.<i>".
        tracker._mod_tracker._get_mod_name(model)
        with tracker:
            level0 = tracker.total()
            if work is not None:
                work(model, autocast)
            else:
                _train_step(model, optimizer, scaler, cfg, autocast, (cfg.batch_size, seq_len),
                            update=not reuse_update)
            if reuse_update:
                level = tracker.total()
                tracker.ops.extend((k, level + rise) for k, rise in update_ops)
        if reuse_update:
            optimizer.zero_grad(set_to_none=True)  # after the tracker: its own ops are in update_ops already
        peak, breakdown = tracker.peak()
        if reuse_update:
            peak = max([peak] + [total for _, total in tracker.ops])
        sizes = _bytes_of(model, optimizer)
    return _Run(level0, tracker.ops, peak, breakdown, *sizes)


def _train_step(model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: TrainConfig,
                autocast: contextlib.AbstractContextManager, shape: tuple[int, int], update: bool = True) -> None:
    """The trainer's step (pretrain/train/loop.py) on one micro-batch of random tokens; update=False stops after
    the backward (the caller appends the update's recorded timeline)."""
    x = torch.randint(0, model.config.vocab_size, shape)
    y = torch.randint(0, model.config.vocab_size, shape)
    with weights_cast_once(model, cache_dtype(cfg)):  # --bf16-weight-cache: held through forward and backward
        with autocast:
            loss = model(x, y) / cfg.grad_accum
        scaler.scale(loss).backward()
        del loss, x, y
    if update:
        _update(model, optimizer, scaler, cfg)


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

    Blocks are identical, so the deep timeline is the shallow one with the middle block's forward and backward
    segments repeated (a pass may run several forwards, each with or without a backward, e.g. no_grad evals).
    Everything else may grow with depth (the level at the start: weights, optimizer state, held gradients; the
    autocast cast cache freed when the forward ends; per-parameter optimizer work), and it grows linearly, so each
    other segment is extrapolated from the two runs. Returns None when the timelines do not have the expected
    shape (the caller then tracks the full model).
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
    for key, rise, change in sa:
        if key[1] is None:
            _, rise, change = next(grown)
        repeat = n_layer - 2 if key[1] == 1 else 1  # block 1 of 0..n_a-1 stands for every middle block
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
    """The fake-tensor estimate, from this process's cache, else the disk's (pretrain/plan/estimate_cache.py),
    else computed and stored there. A pass is a frozen dataclass: its repr names its class and every field."""
    k = estimate_cache.key(model_json, cfg_json, str(seq_len), repr(work))
    hit = estimate_cache.load(k)
    if hit is not None:
        try:
            return MemoryEstimate(**hit)
        except TypeError:  # not a MemoryEstimate's fields: recompute and replace it
            pass
    est = _estimate(ModelConfig.from_dict(json.loads(model_json)), TrainConfig.from_dict(json.loads(cfg_json)),
                    seq_len, work=work)
    estimate_cache.store(k, asdict(est))
    return est


def _relevant(cfg: TrainConfig, **fixed: object) -> str:
    """`cfg` reduced to what changes memory (MEMORY_FIELDS), as a cache key."""
    relevant = {name: getattr(cfg, name) for name in MEMORY_FIELDS} | fixed
    return json.dumps(replace(TrainConfig(), **relevant).to_dict(), sort_keys=True)


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
