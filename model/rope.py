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
    """Rotate x (..., T, dim) by the fp32 angles; the arithmetic is fp32, the result has x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x.float().split(half, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
