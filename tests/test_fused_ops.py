"""RMSNorm and SwiGLU as single autograd nodes (model/fused.py): the same values and gradients as op by op."""

from __future__ import annotations

import pytest
import torch

import model.fused as fused
from model import GPT, ModelConfig, cpu_kernels
from model.fused import rms_norm, rms_norm_reference, swiglu, swiglu_reference
from model.gpt import RMSNorm


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 1) -> tuple[torch.Tensor, ...]:
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, dy)


def test_rms_norm_equals_op_by_op(monkeypatch):
    """Torch's ops, as without model/cpu_kernels.py's library (its kernel: tests/test_cpu_kernels.py)."""
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    torch.manual_seed(0)
    x = (3 * torch.randn(4, 10, 48)).requires_grad_()
    w = (1 + 0.3 * torch.randn(48)).requires_grad_()
    got, want = rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    assert torch.equal(got, want)  # the same expression: bit-identical
    for g, r in zip(_grads(got, (x, w)), _grads(want, (x, w)), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_rms_norm_bf16_weights_as_close_to_the_true_gradient(seed):
    """bf16 input and weight (a bf16 model): the same forward; the backward, in fp32, at least as close to the
    float64 gradient as op by op's (which multiplies by the weight in bf16)."""
    torch.manual_seed(seed)
    x = (3 * torch.randn(4, 10, 48)).bfloat16().requires_grad_()
    w = (1 + 0.3 * torch.randn(48)).bfloat16().requires_grad_()
    got, want = rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    true = _grads(x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64, (x64, w64))
    for g, r, t in zip(_grads(got, (x, w)), _grads(want, (x, w)), true, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.double() - t).abs().max() <= (r.double() - t).abs().max()


def test_rms_norm_backward_is_the_true_gradient():
    """Against autograd in float64 through the norm's formula: the analytic backward (computed in fp32)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # rms_norm's math, without the fp32 statistics
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    dy = torch.randn(3, 8, dtype=torch.float64)
    want = torch.autograd.grad(f(x, w), (x, w), dy)
    rstd = torch.rsqrt(x.detach().float().pow(2).mean(-1, keepdim=True) + 1e-5)  # as forward saves it: fp32
    got = fused._RMSNorm.backward(_Ctx(x.detach(), w.detach(), rstd), dy)[:2]
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


class _Ctx:
    """A stand-in for autograd's ctx, to call the backward on float64 tensors directly."""

    def __init__(self, *saved: torch.Tensor) -> None:
        self.saved_tensors = saved
        self.needs_input_grad = (True, True, False, False)
        self.fused = False  # the forward took torch's ops (model/cpu_kernels.py's kernel is tested on its own)


def test_block_norm_writes_the_autocast_dtype_and_norm_f_does_not():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    feeds, plain = RMSNorm(16, feeds_matmul=True), RMSNorm(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = feeds(x)
        assert y.dtype == torch.bfloat16 and plain(x).dtype == torch.float32
        assert torch.equal(y, rms_norm_reference(x, feeds.weight, feeds.eps).to(torch.bfloat16))
    assert feeds(x).dtype == torch.float32  # no autocast: no cast


def test_swiglu_equals_op_by_op_bit_for_bit(monkeypatch):
    """Torch's ops, as without model/cpu_kernels.py's library (its kernel: tests/test_cpu_kernels.py)."""
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    torch.manual_seed(0)
    gu = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    got, want = swiglu(gu), swiglu_reference(gu)
    assert torch.equal(got, want)
    assert torch.equal(_grads(got, (gu,))[0], _grads(want, (gu,))[0])


@pytest.mark.parametrize("amp", [False, True])
def test_gpt_grads_equal_the_op_by_op_model(monkeypatch, amp):
    """Through the model: the loss and every gradient with the fused nodes match the op-by-op forms. Torch's ops
    inside the nodes, as without model/cpu_kernels.py's library (with it, the model's values are held to these forms
    within a rounding: tests/test_cpu_kernels.py; its exp is not Sleef's, so a forward is not bit-identical)."""
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    cfg = ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=48)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms' weights away from 1
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(idx, targets)
        loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), out

    loss, got = run()
    assert any(type(n).__name__ == "_RMSNormBackward" for n in _nodes(model, idx, targets, amp))
    monkeypatch.setattr("model.gpt.rms_norm", lambda x, w, eps, dt: rms_norm_reference(x, w, eps).to(dt or x.dtype))
    monkeypatch.setattr("model.gpt.swiglu", swiglu_reference)
    ref_loss, want = run()
    assert torch.equal(loss, ref_loss)  # forwards are bit-identical
    tol = {"atol": 1e-6, "rtol": 1e-5} if not amp else {"atol": 1e-4, "rtol": 2e-2}
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=name)


def _nodes(model: GPT, idx: torch.Tensor, targets: torch.Tensor, amp: bool) -> list[object]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(idx, targets)
    seen, todo = [], [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.append(node)
            todo += [n for n, _ in node.next_functions]
    return seen
