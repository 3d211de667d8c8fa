"""The CPU kernels' GEMMs: in bf16 (model/csrc/bf16_gemm.h, built where the compiler targets AVX-512-BF16) causal
attention in one call each way (csrc/cpu_attention.cpp, for model/cpu_attention.py) and the LM head's weight gradient
from the row-major logit gradient (csrc/cpu_lm_head.cpp, for model/loss_eager.py); in fp32 causal attention
(csrc/cpu_attention_f32.cpp, built for AVX2 + FMA without AVX-512). The library, its build and the rules for when a
kernel may run are model/cpu_kernels.py's."""

from __future__ import annotations

import torch

from .cpu_kernels import WIDTH, _fn, built, enabled_for


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Causal self-attention the library computes: q (B, H, T, hd), k (B, Hkv, T, hd), v (B, Hkv, T, hdv) with
    contiguous rows, H a multiple of Hkv, T a multiple of the 64-query block (or one block of a multiple of WIDTH),
    hd and hdv multiples of WIDTH, and a library built with the kernel for their dtype (bf16: AVX-512-BF16,
    csrc/cpu_attention.cpp; fp32: AVX2 without AVX-512, csrc/cpu_attention_f32.cpp)."""
    if q.dim() != 4 or k.shape[2] != q.shape[2] or not enabled_for(q, k, v):
        return False
    T, hd, hdv = q.shape[2], q.shape[3], v.shape[3]
    return (built("attn_fwd", q.dtype) and q.shape[1] % k.shape[1] == 0 and hd % WIDTH == 0
            and hdv % WIDTH == 0 and (T % 64 == 0 or (T < 64 and T % WIDTH == 0))
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def _sizes_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, ...]:
    B, H, T, hd = q.shape
    sizes = torch.tensor([B, H, k.shape[1], T, hd, v.shape[3]], dtype=torch.int64)
    strides = torch.tensor([s for t in (q, k, v, *more) for s in t.stride()[:3]], dtype=torch.int64)
    return sizes, strides


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T, causal) v as (B, H, T, hdv), laid out (B, T, H, hdv) in memory (as SDPA's CPU output:
    a caller's transpose(1, 2).reshape is a view)."""
    B, H, T, _ = q.shape
    out = torch.empty(B, T, H, v.shape[3], dtype=q.dtype)
    sizes, strides = _sizes_strides(q, k, v)
    _fn("attn_fwd", q.dtype)(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), sizes.data_ptr(),
                             strides.data_ptr(), scale, torch.get_num_threads())
    return out.transpose(1, 2)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_forward given its output's gradient `grad` (rows contiguous), each (B, heads, T,
    dim) laid out (B, T, heads, dim) in memory: the layout of the projection outputs q, k and v are head views of."""
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    dq, dk, dv = (torch.empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3], dtype=t.dtype).transpose(1, 2)
                  for t in (q, k, v))
    sizes, strides = _sizes_strides(q, k, v, grad)
    _fn("attn_bwd", q.dtype)(q.data_ptr(), k.data_ptr(), v.data_ptr(), grad.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                             dv.data_ptr(), sizes.data_ptr(), strides.data_ptr(), scale, torch.get_num_threads())
    return dq, dk, dv


def lm_head_grad_applies(g: torch.Tensor, h: torch.Tensor) -> bool:
    """g (rows, V) and h (rows, d) bf16, rows contiguous, V and d multiples of WIDTH, a library built with
    AVX-512-BF16 (csrc/cpu_lm_head.cpp)."""
    return (g.dim() == h.dim() == 2 and g.shape[0] == h.shape[0] and g.dtype == torch.bfloat16 and g.stride(1) == 1
            and h.stride(1) == 1 and g.shape[1] % WIDTH == 0 and h.shape[1] % WIDTH == 0 and enabled_for(g, h)
            and built("lm_head_dw", g.dtype))


def lm_head_weight_grad(g: torch.Tensor, h: torch.Tensor, valid: torch.Tensor, out: torch.Tensor | None = None,
                        *, accumulate: bool = False, scale: float = 1.0) -> torch.Tensor:
    """g^T h * scale in fp32 (V, d) over the rows that are `valid`, or with `accumulate` (out + g^T h) * scale (the sum
    rounded, then the product): into `out` (contiguous fp32 (V, d)) or a new tensor. The products are exact and
    summed in fp32."""
    (rows, V), d = g.shape, h.shape[1]
    assert out is not None or not accumulate
    dst = torch.empty((V, d), dtype=torch.float32) if out is None else out
    assert dst.is_contiguous() and dst.shape == (V, d) and dst.dtype == torch.float32
    valid8 = valid.to(torch.uint8).contiguous()
    _fn("lm_head_dw", g.dtype)(g.data_ptr(), g.stride(0), h.data_ptr(), h.stride(0), valid8.data_ptr(),
                               dst.data_ptr(), rows, V, d, int(accumulate), scale, torch.get_num_threads())
    return dst
