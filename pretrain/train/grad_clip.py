"""Gradient clipping on CPU: the exact norm, and no multiply when nothing is clipped.

torch's clip_grad_norm_ sums the squares of fp32 gradients in fp32. On CPU that sum drifts with the tensor's size:
config S's tied embedding gradient (19M values) came out 7e-4 low, 103M values (a 1b model's embedding) 1.1 % low,
and the logged grad_norm and the clip factor with them (GPU runs keep torch's clip). Here the squares are summed in
fp64 by model/cpu_kernels.py's sum_squares (blocks of a fixed size, so the same bits at any thread count) and the
norm is that sum's root rounded to fp32: the exact norm to fp32's precision, as fast as torch's on one thread and ~0.8
ms faster at config S on two (Zen 5, 2 cores). bf16 gradients (--param-dtype bf16) get the same fp32 norm, where
torch's is rounded to bf16 (548 for 547.7), and with it the clip factor. Where the library is not built, or the
gradients are not plain contiguous fp32 or bf16, torch's norm.

torch also multiplies every gradient by min(max_norm / (norm + 1e-6), 1) on every step, also when that factor is 1:
on a GPU deciding on the host would cost a device sync per step. On CPU the norm is already in host memory, and a
multiply by 1.0 is a pass over all the gradients (read and write: 240 MB at config S) that leaves every value as it
was. So here the factor is computed as torch computes it and the gradients are multiplied only when it is not exactly
1.0: the same gradients bit for bit (x * 1.0 == x for every float, NaN and infinities included), one pass less on
every step whose norm is within max_norm. Clipped steps multiply as torch does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from model import cpu_kernels


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over all of `grads` (CPU tensors) as a 0-dim tensor: exact to fp32 (an fp32 tensor) for contiguous
    fp32 and bf16 gradients where the kernels are built (module docstring), torch's get_total_norm otherwise."""
    if not cpu_kernels.sum_squares_applies(grads):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    return torch.tensor(math.sqrt(cpu_kernels.sum_squares(grads)), dtype=torch.float32)


@torch.no_grad()
def clip_grad_norm_cpu_(params: Iterable[nn.Parameter], max_norm: float,
                        fold: Callable[[float], bool] | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(params, max_norm) for gradients on CPU, with the norm of total_norm; the
    gradients are left untouched when they would be multiplied by 1.0, or when `fold` (the optimizer's
    fold_grad_factor) takes the factor to multiply them by as its next step reads them."""
    params = [p for p in params if p.grad is not None]
    total = total_norm([p.grad for p in params])
    if not params:
        return total
    # As torch.nn.utils.clip_grads_with_norm_ computes the factor (fp32 tensor ops, same roundings).
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()
    if factor != 1.0 and not (fold is not None and fold(factor)):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
