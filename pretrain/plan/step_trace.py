"""One training step (or a pass beside it) run on fake tensors under the memory tracker: the op timeline a memory
estimate is made from (pretrain/plan/memory.py turns timelines into the estimate, extrapolates depth and caches).

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

Speed: fake-tensor and tracker dispatch cost ~0.3 ms per op whatever the model's width. The update after the
backward (unscale, clip, optimizer step: about half of a step's ops) allocates the same whatever the micro-batch,
sequence length or checkpointing, so it is tracked once per model and optimizer settings and its timeline appended
to each step's forward and backward (`_update_ops`; tests/test_plan_fast.py holds it equal op for op). The tracker
(~1.5 s of imports) is imported only when a step is tracked.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from model import GPT, ModelConfig
from pretrain.train.config import TrainConfig
from pretrain.train.optim import AdamW8bit, build_optimizer, step_unless_nonfinite
from pretrain.train.weight_cache import cache_dtype, weights_cast_once
from pretrain.units import torch_dtype

# A pass the trainer runs beside the training step: called with the model (in training mode, no gradients) and
# the autocast context of the run, inside the tracker; hashable (a frozen dataclass), so estimates are cached.
Pass = Callable[[GPT, contextlib.AbstractContextManager], None]
# TrainConfig fields that change what one training step allocates (everything else is irrelevant to memory).
MEMORY_FIELDS = ("batch_size", "grad_accum", "param_dtype", "amp", "amp_dtype", "grad_checkpoint", "optimizer",
                 "checkpoint_policy",
                 "opt_fused", "bf16_weight_cache")


def _relevant(cfg: TrainConfig, **fixed: object) -> str:
    """`cfg` reduced to what changes memory (MEMORY_FIELDS), as a cache key."""
    relevant = {name: getattr(cfg, name) for name in MEMORY_FIELDS} | fixed
    return json.dumps(replace(TrainConfig(), **relevant).to_dict(), sort_keys=True)


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
        if fake:
            _first_step_state(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return mode, model, optimizer


def _first_step_state(optimizer: torch.optim.Optimizer) -> None:
    """What the optimizer's first step() leaves behind (its state) on fake tensors. For AdamW8bit the state is
    made without the update: quantizing the new moments (a binary search of 8 ops per value) is ~70 % of building
    its fake state, and the update changes values, never which tensors exist. tests/test_plan_cold.py holds the
    steady state and a step tracked from it equal to those after a real first step."""
    if not isinstance(optimizer, AdamW8bit):
        optimizer.step()
        return
    quantized = False
    for _, p, state in optimizer._params_with_grad():
        if not state:
            optimizer._init_state(p, state)
        quantized = quantized or optimizer.quantized(p)
    if quantized:  # the step's lookup tables, created by its first quantized update
        for signed in (True, False):
            optimizer._qmap(torch.device("cpu"), signed)


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
    optimizer state. Checkpointing (on or off, and its policy) is a flag the step reads, set on the shared model
    before each run, and the update after the backward does not read it."""
    return json.dumps(mcfg.to_dict(), sort_keys=True), _relevant(cfg, batch_size=1, grad_accum=1, grad_checkpoint=False,
                                                                 checkpoint_policy="full", bf16_weight_cache=False)


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
