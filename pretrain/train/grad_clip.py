"""Gradient clipping that skips the multiply when nothing is clipped, where reading the norm costs nothing (CPU).

torch's clip_grad_norm_ multiplies every gradient by min(max_norm / (norm + 1e-6), 1) on every step, also when
that factor is 1: on a GPU deciding on the host would cost a device sync per step. On CPU the norm is already in
host memory, and a multiply by 1.0 is a pass over all the gradients (read and write: 240 MB at config S) that leaves
every value as it was. So here the factor is computed as torch computes it and the gradients are multiplied only
when it is not exactly 1.0: the same gradients bit for bit (x * 1.0 == x for every float, NaN and infinities
included), one pass less on every step whose norm is within max_norm. Clipped steps multiply as torch does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def clip_grad_norm_cpu_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(params, max_norm) for gradients on CPU (the 2-norm over all of them); the
    gradients are left untouched when they would be multiplied by 1.0."""
    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if not params:
        return total
    # As torch.nn.utils.clip_grads_with_norm_ computes the factor (fp32 tensor ops, same roundings).
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if factor.item() != 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
