"""The block's elementwise ops as single autograd nodes for the eager path: RMSNorm, SwiGLU's gate and (on CPU) the
residual add of a bf16 branch.

Op by op, autograd runs each norm and gate as a chain of small kernels, each allocating its own (rows x width)
temporary and saving its own inputs: on CPU a fresh multi-MB block is page-faulted in on every use, so these
ops cost far more than their arithmetic (issue 23.1: ~0.2 CPU-s of a ~1.6 CPU-s bf16 step on config S). Here each
is one node with its backward written out: fewer passes, fewer and reused temporaries, nothing saved that can be
recomputed from what is kept anyway. Under torch.compile the op-by-op forms are traced instead (model/gpt.py):
inductor fuses those itself.

rms_norm's forward computes the same expression as the op-by-op form (bit-identical); its backward is the
analytic gradient (equal to autograd's within fp32 rounding). swiglu's forward and backward run the same kernels as
autograd's, writing the gate's and the up projection's gradients into one buffer instead of concatenating them
(bit-identical). On CPU, where model/cpu_kernels.py's library is built, each direction of either is one fused pass
instead (the same arithmetic, within one rounding of these forms; swiglu then keeps only gate_up, not silu(gate)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernels import (
    residual_add_applies,
    residual_add_forward,
    rms_norm_applies,
    rms_norm_backward,
    rms_norm_forward,
    swiglu_applies,
    swiglu_backward,
    swiglu_forward,
)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The op-by-op RMSNorm (statistics in fp32, result in x's dtype): what torch.compile traces, and the
    definition rms_norm is held to."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """rms_norm_reference(x, weight, eps), cast to out_dtype when given (the dtype the consuming matmul runs in
    under autocast, which would otherwise cast it as a separate node), as one autograd node."""
    return _RMSNorm.apply(x, weight, eps, out_dtype)


class _RMSNorm(torch.autograd.Function):
    """y = n * w with n = x * r, r = rsqrt(mean(x^2) + eps) per row. Saves x, w and r (not n, which autograd's
    op-by-op form keeps: one rows x d fp32 tensor per norm less). Backward, with g = dy in fp32 and P = g * x:
        dw = sum_rows(g * n) = P^T r                    (a matrix-vector product)
        dx = r * (g * w - n * mean(g * w * n)) = r * g * w - x * r^3 * (P @ w) / d
    two rows x d fp32 temporaries (g when dy is not fp32, and P, which then holds dx) and five passes over them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype | None) -> torch.Tensor:
        ctx.fused = rms_norm_applies(x, out_dtype or x.dtype)
        if ctx.fused:  # one pass each way (model/cpu_kernels.py)
            y, rstd = rms_norm_forward(x, weight, eps, out_dtype or x.dtype)
            ctx.save_for_backward(x, weight, rstd)
            return y
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = (x32 * rstd).to(x.dtype).mul_(weight.to(x.dtype))  # x32 * rstd is a new tensor: in place is safe
        ctx.save_for_backward(x, weight, rstd)
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        if ctx.fused and dy.is_contiguous() and rms_norm_applies(x, dy.dtype):
            dx, dw = rms_norm_backward(x, weight, rstd, dy)
            return dx, dw if ctx.needs_input_grad[1] else None, None, None
        with torch.autocast(x.device.type, enabled=False):  # the matrix-vector products stay fp32
            x32, w32, g = x.float(), weight.float(), dy.float()  # g may be dy itself: never written to
            p = g * x32
            flat, r = p.reshape(-1, p.shape[-1]), rstd.reshape(-1)
            dw = (flat.t() @ r).to(weight.dtype) if ctx.needs_input_grad[1] else None
            dx = None
            if ctx.needs_input_grad[0]:
                c = (flat @ w32).mul_(r.pow(3)).div_(-x.shape[-1]).reshape(rstd.shape)
                dx = torch.mul(g, w32, out=p).mul_(rstd).addcmul_(x32, c).to(x.dtype)  # P is spent: reuse it
        return dx, dw, None, None


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused (..., 2 d_ff) projection, op by op."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """swiglu_reference(gate_up) as one autograd node whose backward writes d gate and d up into one tensor."""
    return _SwiGLU.apply(gate_up)


class _SwiGLU(torch.autograd.Function):
    """Saves what autograd's form saves (gate_up and silu(gate)); backward runs the same kernels (mul,
    silu_backward), writing into the two halves of one (..., 2 d_ff) gradient instead of concatenating two. With the
    CPU kernels: gate_up alone, each direction one pass (silu(gate) recomputed if the backward falls back)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.fused = swiglu_applies(gate_up)
        if ctx.fused:  # one pass each way, only gate_up kept (model/cpu_kernels.py)
            ctx.save_for_backward(gate_up)
            return swiglu_forward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> torch.Tensor:
        saved = ctx.saved_tensors  # once: checkpointing's recompute unpacks each saved tensor once
        if ctx.fused and swiglu_applies(saved[0]) and dh.dtype == saved[0].dtype:
            return swiglu_backward(saved[0], dh.contiguous())
        gate_up, act = saved if not ctx.fused else (saved[0], F.silu(saved[0].chunk(2, dim=-1)[0]))
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty_like(gate_up)
        d_gate, d_up = grad.chunk(2, dim=-1)
        torch.mul(dh, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(dh * up, gate, grad_input=d_gate)
        return grad


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y: a block's residual stream x plus its branch's output y (the autocast dtype under autocast). Where the
    CPU kernels take fp32 + bf16, one pass and one autograd node with autograd's gradients (x's gradient as it is,
    y's converted to y's dtype); torch's add otherwise."""
    if residual_add_applies(x, y):
        return _ResidualAdd.apply(x, y)
    return x + y


class _ResidualAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.y_dtype = y.dtype
        return residual_add_forward(x, y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.to(ctx.y_dtype)
