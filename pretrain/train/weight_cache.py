"""--bf16-weight-cache: each fp32 block weight cast to the autocast dtype once per optimizer step, not per micro-batch.

Under autocast every F.linear casts its fp32 weight (a ToCopy: read 4, write 2 bytes per parameter), and autocast
keeps that cast only until the forward ends: with --grad-accum N the weights are cast N times a step, and N times
more when --grad-checkpoint recomputes each block in backward. A 1b model on an A100 40 GB at micro-batch 1 moves
~19 GB per micro-batch for these casts (issue 23.6).

Why the numbers stay the same: the cast's values do not change between micro-batches (the weights change only in
the update), and its backward (ToCopyBackward0) saves no tensor: it casts the incoming gradient to fp32, which
AccumulateGrad adds into the fp32 .grad. So each use of a cast made once before the step's first micro-batch can
hand back its gradient the same way (`_Cast`): losses and gradients are bit-identical to a cast per micro-batch
(tests/test_bf16_weight_cache.py).

How: for the step's micro-batches (forwards and backwards, so a checkpointed recompute sees it too) every plain
nn.Linear but the LM head runs F.linear with its weight's cast (`weights_cast_once`); autocast then casts only the
input. The Parameters themselves stay in place: optimizer, gradient hooks, DDP and the memory
tracker see the same leaf tensors. The LM head stays: the chunked
loss casts it once per call itself and hands back an fp32 gradient. Before the update the Parameters are put
back and the casts dropped: 2 bytes per cached parameter held through the step's forwards and backwards
(pretrain/plan/memory.py traces it).

On CPU every bf16 autocast step takes its casts this way, flag or not (`kept_casts_dtype`), and from
model/weight_casts.py, which keeps them between steps: the CPU update writes each cast in the pass that writes its
weight (pretrain/train/cpu_adamw.py), so a step makes no casts of its own (~5 ms a step at config S, 2 threads).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model import weight_casts

if TYPE_CHECKING:
    from pretrain.train.config import TrainConfig

SKIP = ("lm_head",)  # the chunked loss casts it itself (model/gpt.py ChunkedLinearCrossEntropy)


def cache_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype the run casts its weights to once per step, or None when --bf16-weight-cache is off (validate()
    refuses it where there is nothing to cache: no autocast, bf16 weights, FSDP2, float8)."""
    if not (cfg.bf16_weight_cache and cfg.amp and cfg.param_dtype == "fp32"):
        return None
    return torch.float16 if cfg.amp_dtype == "fp16" else torch.bfloat16


def kept_casts_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype of the casts a CPU bf16 autocast step takes from model/weight_casts.py (None: not this run): those
    casts are kept between steps and written by the CPU update, so a step makes none while its weights change only
    there. Not with fp16 (GradScaler's path), bf16 weights, FSDP2 or float8 (their linears are not plain)."""
    on = (device.type == "cpu" and cfg.amp and cfg.amp_dtype != "fp16" and cfg.param_dtype == "fp32"
          and not cfg.fsdp and not cfg.float8)
    return torch.bfloat16 if on else None


def cached_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears whose weight the cache casts: plain nn.Linear (not float8's subclass) except the LM head."""
    return [m for name, m in model.named_modules()
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in SKIP]


def cached_params(model: nn.Module) -> int:
    """Parameters the cache holds a copy of (each shared weight once)."""
    return sum(p.numel() for p in {id(m.weight): m.weight for m in cached_linears(model)}.values())


class _Cast(torch.autograd.Function):
    """The weight's cast made before the step, as this use's input. Backward hands the gradient to the fp32 weight
    as autocast's cast would (ToCopyBackward0: grad.to(weight's dtype)), right after its consumer: a cast node made
    once before the forward would run only at the end of each backward (the engine runs older nodes last), holding
    every weight's low-precision gradient until then."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.weight_dtype), None


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward, with the weight's cast while the cache is on (`_weight_cast` set)."""
    cast = module._weight_cast
    weight = module.weight if cast is None else _Cast.apply(module.weight, cast)
    return F.linear(x, weight, module.bias)


@contextlib.contextmanager
def weights_cast_once(model: nn.Module, dtype: torch.dtype | None, kept: bool = False) -> Iterator[int]:
    """Within the block, the cached linears compute with their weight's `dtype` cast, made here once; gradients
    still reach the fp32 Parameters. Yields how many linears use a cast. dtype None: nothing changes. With `kept`
    the casts of CPU weights are those model/weight_casts.py keeps between steps (`kept_casts_dtype`).

    The first use gives each cached linear an instance `forward` (`_forward`), kept for the rest of the run: a
    compiled block guards on the forward object, so one made per step would recompile every step. Outside the
    block its `_weight_cast` is None and it is nn.Linear's forward."""
    if dtype is None:
        yield 0
        return
    patched: list[nn.Module] = []
    casts: dict[int, torch.Tensor] = {}  # a weight shared by two linears is cast once
    try:
        for module in cached_linears(model):
            weight = module.weight
            if weight.dtype == dtype or not weight.is_floating_point():
                continue
            if id(weight) not in casts:
                cast = weight_casts.kept_cast(weight, dtype) if kept else None
                casts[id(weight)] = weight.detach().to(dtype) if cast is None else cast
            if "forward" not in module.__dict__:
                module.forward = types.MethodType(_forward, module)
            module._weight_cast = casts[id(weight)]
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            module._weight_cast = None
