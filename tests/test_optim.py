"""Optimizers: Lion matches lion-pytorch, bf16 weights keep small updates and decay, on-device step skipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.train.config import TrainConfig
from pretrain.train.optim import AdamWSR, Lion, build_optimizer, param_groups, step_unless_nonfinite, stochastic_round_


def test_lion_matches_lion_pytorch_on_fp32():
    from lion_pytorch import Lion as Reference

    torch.manual_seed(0)
    a = nn.Linear(16, 8)
    b = nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    ours = Lion(a.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref = Reference(b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(4, 16)
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of a bf16 ulp above 1.0
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    # Round-to-nearest would lose the offset entirely.
    assert x.to(torch.bfloat16).float().mean().item() == 1.0


@pytest.mark.parametrize("opt_cls", [AdamWSR, Lion])
def test_bf16_weight_decay_takes_effect(opt_cls):
    """lr * wd = 1e-4 is far below bf16 resolution; plain rounding would leave the weights unchanged."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(100_000).to(torch.bfloat16))
    start = w.detach().float().abs().mean().item()
    opt = opt_cls([{"params": [w], "weight_decay": 0.1}], lr=1e-3)
    for _ in range(50):
        w.grad = torch.zeros_like(w)
        opt.step()
    ratio = w.detach().float().abs().mean().item() / start
    assert ratio == pytest.approx((1 - 1e-4) ** 50, abs=1e-3)
    assert ratio < 0.9975


@pytest.mark.parametrize("name, dtype", [("adamw", torch.float32), ("lion", torch.float32),
                                         ("adamw", torch.bfloat16), ("lion", torch.bfloat16)])
def test_found_inf_skips_the_step_on_device(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(dtype)
    opt = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-2), torch.device("cpu"))
    model(torch.randn(2, 8, dtype=dtype)).sum().backward()
    step_unless_nonfinite(opt, torch.tensor(0.0))
    before = [p.detach().clone() for p in model.parameters()]
    state_before = [v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    model(torch.randn(2, 8, dtype=dtype)).sum().backward()
    step_unless_nonfinite(opt, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state_after = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    assert len(state_before) == len(state_after) > 0
    assert all(torch.equal(a, b) for a, b in zip(state_before, state_after))
    step_unless_nonfinite(opt, torch.tensor(0.0))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_decay_only_on_matrices():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert {p.dim() for p in decay["params"]} == {2} and {p.dim() for p in no_decay["params"]} == {1}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_fp32_adamw_is_fused():
    model = nn.Linear(4, 4)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]


@pytest.mark.parametrize("opt_cls", [AdamWSR, Lion])
def test_sliced_update_equals_whole_tensor_update(opt_cls, monkeypatch):
    """Large tensors are updated in slices to bound temporaries; the result must not depend on the slicing."""
    import pretrain.train.optim as optim_mod

    def run(chunk: int) -> torch.Tensor:
        monkeypatch.setattr(optim_mod, "CHUNK", chunk)
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(1000, 7))
        opt = opt_cls([{"params": [w], "weight_decay": 0.1}], lr=1e-2)
        for i in range(3):
            w.grad = torch.randn_like(w) * (i + 1)
            opt.step()
        return w.detach().clone()

    assert torch.equal(run(64), run(1 << 22))
