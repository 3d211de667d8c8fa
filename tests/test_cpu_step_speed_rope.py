"""RoPE as one autograd node (model/rope.py `_Rotate`, issue 23.1): its gradient is the written-out rotation's, it
runs without temporaries or concatenation, and a model's training step gives the written-out RoPE's gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, ModelConfig, cpu_kernels
from model import rope as rope_mod
from model.rope import RotaryEmbedding, apply_rotary


def written_out(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as autograd records it op by op (what model/rope.py did before), fp32 arithmetic."""
    x1, x2 = x.float().split(x.shape[-1] // 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_and_gradient_equal_the_written_out_rotation(dtype):
    cos, sin = RotaryEmbedding(16, base=100.0)(torch.arange(40))
    x = torch.randn(2, 3, 40, 16).to(dtype).requires_grad_()
    g = torch.randn(2, 3, 40, 16).to(dtype)
    got = apply_rotary(x, cos, sin)
    (gx,) = torch.autograd.grad(got, x, g)
    want = written_out(x, cos, sin)
    (wx,) = torch.autograd.grad(want, x, g)
    assert got.dtype == gx.dtype == dtype
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(gx, wx, **tol)
    assert gx.abs().max() > 0.5  # a real gradient, not zeros


def test_no_temporaries_and_no_concatenation(monkeypatch):
    """Forward + backward write each half in place into one fp32 output (mul out=, addcmul_): no full-size product
    temporaries and no cat (the op-by-op form ran 4 muls, a sub, an add and a cat per direction). Torch's ops, as
    without model/cpu_kernels.py's library (with it each direction is one kernel call: tests/test_cpu_kernels.py)."""
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    cos, sin = RotaryEmbedding(16)(torch.arange(32))
    x = torch.randn(2, 3, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    ops: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        y = apply_rotary(x, cos, sin)
        y.backward(torch.ones_like(y))
    assert not [o for o in ops if o.startswith(("cat", "sub", "add.", "mul.Tensor"))], ops
    assert ops.count("addcmul_.default") == 4 and ops.count("mul.out") == 4


def test_model_gradients_equal_the_written_out_rope(monkeypatch):
    """A bf16-autocast forward and backward of a small model: the same loss and weight gradients (within bf16
    rounding of q/k) as with the op-by-op rotation."""
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32, d_ff=48, rope_base=100.0)
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = GPT(cfg).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, got = grads()
    monkeypatch.setattr("model.attention.apply_rotary", written_out)
    assert rope_mod.apply_rotary is not written_out
    want_loss, want = grads()
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=0.05, atol=2e-3 * want[name].abs().max().item())
