"""The trainer's speed decisions per device, each a small function so a CPU-only test can check the CUDA answer.

On CUDA every fast path is on: fused AdamW (fp32 weights), SDPA without an explicit mask (flash / cuDNN eligible;
null-attn uses FlexAttention inside compiled graphs, model/attention.py), per-block compile with static shapes,
pinned-memory prefetch, expandable allocator segments. CPU answers keep the CPU path as it was.

Compile covers the training step only: `build_model` (the trainer's and the probe's one way to build the model)
compiles each block for the training shapes, one static graph per (micro-batch, sequence length) of the schedule,
and everything else that runs the model (evals at other lengths, diagnostics, sampling with its KV cache,
downstream scoring) goes through `eagerly`: the same modules and parameters, uncompiled. Otherwise each of those
shapes and grad modes is one more graph of the same frame, dynamo's recompile limit (8) is soon reached, and from
then on every new shape, the longest training phase included, silently runs eagerly. `compile_counts` reads back
what dynamo did (the trainer's `end` event).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from model import GPT, ModelConfig
from pretrain.schedule import micro_batch_at, seq_len_at
from pretrain.train.config import TrainConfig
from pretrain.train.float8 import float8_linears
from pretrain.units import torch_dtype

F = TypeVar("F", bound=Callable[..., Any])

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def compile_blocks(model: nn.Module, mode: str = "default") -> None:
    """Compile each block in place (parameter names keep no `_orig_mod.`; one block shape compiles once).

    Static shapes: with dynamic shapes dynamo would make T symbolic after the second sequence length and every
    shape-dependent branch a guard or a graph break; a seq schedule has a few lengths, far below the
    recompile limit, and each static graph is the faster kernel.
    """
    for block in model.blocks:
        block.compile(mode=None if mode == "default" else mode, dynamic=False)


def training_shapes(seq_points: list[tuple[int, int]], micro_points: list[tuple[int, int]], cfg: TrainConfig) -> int:
    """How many (micro-batch, sequence length) pairs the training steps of `cfg` run: one compiled graph each."""
    starts = {0} | {s for s, _ in seq_points} | {s for s, _ in micro_points}
    return len({(micro_batch_at(micro_points, s, cfg.batch_size, cfg.grad_accum)[0], seq_len_at(seq_points, s))
                for s in starts if s < max(cfg.steps, 1)})


def build_model(mcfg: ModelConfig, cfg: TrainConfig, device: torch.device, shapes: int = 1) -> GPT:
    """The model as the trainer steps it: parameter dtype, activation checkpointing, per-block compile for `shapes`
    training shapes (see training_shapes). The trainer and `--probe` both build it here, so the probe times what the
    trainer runs. Seed the RNG before calling it: the weights are initialised here."""
    model = GPT(mcfg)
    model.to(device=device, dtype=torch_dtype(cfg.param_dtype))
    model.grad_checkpoint = cfg.grad_checkpoint
    model.checkpoint_policy = cfg.checkpoint_policy
    if cfg.float8:  # before compile, so inductor fuses the float8 casts with their neighbours
        float8_linears(model, emulate=device.type != "cuda")
    if cfg.compile:
        # A card or driver that inductor cannot compile for should cost speed, not the run: dynamo then
        # logs the failure once and runs that code eagerly (compile_counts counts it).
        torch._dynamo.config.suppress_errors = True
        # Every block is the same frame (Block.forward), and each training shape is one more static graph of it,
        # counted against the recompile limit (8): a schedule with more shapes than that would run its last
        # phases eagerly, so the limit covers them. Raising it keeps every phase's graph and the process's
        # counters whole; resetting dynamo at each phase change instead would clear the recompile count the end
        # event reports and recompile a phase seen before. Instruments never add graphs (`eagerly`).
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), shapes))
        compile_blocks(model, cfg.compile_mode)  # per block, in place, static shapes
        model.compile_loss = True  # and each chunk of the loss: one graph per chunk shape (model/gpt.py)
    return model


def eagerly(fn: F) -> F:
    """Run `fn` with torch.compile switched off (torch.compiler.set_stance "force_eager"): the same modules and
    parameters, uncompiled. For everything that runs the model outside the training step, whose shapes and grad
    modes would each add a graph to the training frame."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def compile_counts() -> dict[str, int]:
    """What dynamo did in this process (torch._dynamo.utils.counters): `frames` graphs compiled, `recompiles`
    compiles of a frame that already had code (a guard failed: new shape, grad mode...), and `eager_fallbacks`
    frames dynamo gave up on and ran eagerly (recompile limit hit, or a compile error under suppress_errors)."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    # Compile attempts per frame id (the N of dynamo's [frame/N] log prefix): all but each frame's first recompile.
    attempts = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})
    return {"frames": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(max(n - 1, 0) for n in attempts.values())),
            "eager_fallbacks": int(counters["frames"]["total"] - counters["frames"]["ok"])}


def cuda_alloc_conf(current: str | None) -> str:
    """PYTORCH_CUDA_ALLOC_CONF with expandable_segments on unless the user chose otherwise: three sequence
    lengths in one run otherwise fragment the caching allocator into blocks of the wrong sizes."""
    if current and "expandable_segments" in current:
        return current
    return f"{current},expandable_segments:True" if current else "expandable_segments:True"


def configure_cuda_allocator() -> None:
    """Apply cuda_alloc_conf to this process; must run before the first CUDA allocation (trainer start)."""
    os.environ[ALLOC_CONF] = cuda_alloc_conf(os.environ.get(ALLOC_CONF))
