"""bf16 casts of fp32 weights kept with the weights on CPU, made again only when a weight has changed (issue 23.1).

Under bf16 autocast every step casts each weight matrix to bf16 (read 4, write 2 bytes per parameter): at config
S the block linears' and the tied LM head's 30M parameters, ~5 ms a step at 2 threads (Zen 5). The weights change
only in the update, and pretrain/train/cpu_adamw.py's kernel writes each kept cast in the pass that writes its
weight, so the next forward finds it made. A kept cast is used only when that update wrote it and the weight's
version counter has not moved since (an in-place edit, load_state_dict); otherwise it is made again here, by torch's
cast, on every call. The version counter alone cannot say: torch's fused AdamW (the first step, and wherever the
kernel does not apply) writes the weights without moving it, as does any edit through `.data`. The values are
torch's cast (round to nearest even) bit for bit; the kernel's NaN is torch's vectorized one.

Only for plain contiguous fp32 CPU weights where the CPU kernels are enabled (`applies`); elsewhere (GPU, fake
tensors, the planner's trace) the callers cast as before. A kept cast lives as long as its weight: 2 bytes per
parameter of CPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .cpu_kernels import WIDTH, enabled_for


@dataclass
class _Kept:
    cast: torch.Tensor
    version: int  # the weight's version when the update wrote the cast; -1: not written by the update


_KEPT = WeakIdKeyDictionary()  # weight -> _Kept, by identity (a tensor's == is elementwise)


def applies(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `weight`'s `dtype` cast is kept here: bf16 casts of contiguous fp32 CPU weights, kernels enabled."""
    return (dtype == torch.bfloat16 and weight.dtype == torch.float32 and weight.is_contiguous()
            and weight.numel() % WIDTH == 0 and enabled_for(weight.detach()))


def kept_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`cast_of(weight, dtype)` where the cast is kept here (`applies`), else None: the caller casts."""
    return cast_of(weight, dtype) if weight.dtype != dtype and applies(weight, dtype) else None


def cast_of(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.detach().to(dtype)`'s values: the kept cast when the update wrote it from the current weight, else
    made now into the kept buffer (where the next update writes it)."""
    kept = _KEPT.get(weight)
    if kept is None or kept.cast.shape != weight.shape:
        kept = _KEPT[weight] = _Kept(torch.empty(weight.shape, dtype=dtype), -1)
    if kept.version != weight._version:
        kept.cast.copy_(weight.detach())
        kept.version = -1
    return kept.cast


def kept_casts(weights: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each weight's kept bf16 cast (None: none kept), for an update that writes them with the weights."""
    out: list[torch.Tensor | None] = []
    for w in weights:
        kept = _KEPT.get(w)
        out.append(kept.cast if kept is not None and kept.cast.shape == w.shape else None)
    return out


def written(weights: list[torch.Tensor]) -> None:
    """The kept casts of `weights` were just written from their current values (after their version moved)."""
    for w in weights:
        kept = _KEPT.get(w)
        if kept is not None:
            kept.version = w._version


def stale(weights: list[torch.Tensor]) -> None:
    """`weights` are about to change without their version moving (torch's fused AdamW): their casts are made again."""
    for w in weights:
        kept = _KEPT.get(w)
        if kept is not None:
            kept.version = -1
