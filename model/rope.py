"""Rotary position embedding (RoPE, Su et al. 2021), always computed in fp32.

The angles are position * base^(-2i/dim). They are recomputed from integer positions on every call
instead of being kept in a buffer: `model.to(torch.bfloat16)` casts floating buffers, and bf16 has an
8-bit mantissa, so a cast table makes positions above ~256 collapse onto each other. Recomputing
costs T * dim/2 multiplies per layer, nothing next to the projections.

The rotation pairs dimension i with i + dim/2 ("rotate half", as in GPT-NeoX and Hugging Face Llama),
so q/k projection weights export to Llama without permutation.
"""

from __future__ import annotations

import torch
from torch import nn

from .cpu_kernels import rotate, rotate_applies


class RotaryEmbedding(nn.Module):
    """Holds no tensors: dim and base only, so no dtype cast can touch the angles."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RoPE needs an even dimension, got {dim}")
        self.dim = dim
        self.base = base

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) integer positions -> (T, dim/2) fp32 angles."""
        exponent = torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim
        inv_freq = 1.0 / (self.base**exponent)
        return positions.to(torch.float32)[:, None] * inv_freq[None, :]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) integer positions -> fp32 cos, sin of shape (T, dim/2)."""
        theta = self.angles(positions)
        return theta.cos(), theta.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, dim) by the fp32 angles; the arithmetic is fp32, the result has x's dtype.

    One autograd node (`_Rotate`): the backward is the rotation by -angle (only the angles are kept for it), and
    both directions write each half in place into one output: no q/k-sized temporaries per product and no
    concatenation, where the op-by-op form allocated six per direction (issue 23.1: RoPE was ~15 % of a CPU step;
    this form takes ~0.6x its CPU time for q and k, forward + backward, config S on AVX-512-BF16). On CPU, where
    model/cpu_kernels.py's library is built, each direction is one pass reading x in its own dtype (~0.35x again).
    """
    return _Rotate.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x rotated by sign * angle, in fp32, returned in x's dtype (rotate half: i pairs with i + dim/2)."""
    if rotate_applies(x, cos):  # one pass, no fp32 copy (model/cpu_kernels.py)
        return rotate(x, cos, sin, sign)
    half = x.shape[-1] // 2
    x1, x2 = x.float().split(half, dim=-1)
    if torch.compiler.is_compiling():  # inductor fuses this into one kernel
        s = sin if sign > 0 else -sin
        return torch.cat((x1 * cos - x2 * s, x2 * cos + x1 * s), dim=-1).to(x.dtype)
    # Eager: each half written in place into one output, no temporaries and no concatenation.
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    o1, o2 = out.split(half, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out.to(x.dtype)


class _Rotate(torch.autograd.Function):
    """x -> x rotated by the angles; d/dx of a rotation is its transpose, the rotation by -angle."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None
