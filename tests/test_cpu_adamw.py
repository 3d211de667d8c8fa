"""AdamW on CPU in one kernel with the clip's factor folded in (pretrain/train/cpu_adamw.py): the weights, moments and
step counts of torch's fused AdamW after torch's clip, bit for bit, at 1 and 2 threads and at each ISA torch
dispatches its kernel for; nothing changed on a non-finite step; torch's path wherever the kernel does not apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import cpu_kernels
from pretrain.train import cpu_adamw
from pretrain.train import distributed as dist_lib
from pretrain.train.optim import FusedAdamW, step_unless_nonfinite

ROOT = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="CPU kernels not built here")
SHAPES = ((64, 48), (1000, 32), (16,), (3, 1, 16), (1 << 18,))


class _Net(torch.nn.Module):
    def __init__(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        super().__init__()
        self.ws = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s) * 0.05) for s in shapes)


def _pair(shapes=SHAPES, betas=(0.9, 0.95)) -> tuple[_Net, _Net, FusedAdamW, torch.optim.AdamW]:
    """Our FusedAdamW and torch's fused AdamW on two copies of one set of weights (two groups: decay, none)."""
    torch.manual_seed(0)
    ours = _Net(shapes)
    ref = _Net(shapes)
    ref.load_state_dict(ours.state_dict())

    def groups(net: _Net) -> list[dict]:
        ws = list(net.ws)
        return [{"params": ws[::2], "weight_decay": 0.1}, {"params": ws[1::2], "weight_decay": 0.0}]

    opt = FusedAdamW(groups(ours), lr=3e-3, betas=betas, eps=1e-8, fused=True)
    ref_opt = torch.optim.AdamW(groups(ref), lr=3e-3, betas=betas, eps=1e-8, fused=True)
    return ours, ref, opt, ref_opt


def _grads(nets: tuple[_Net, ...], scale: float) -> None:
    gen = torch.Generator().manual_seed(int(scale * 1000))
    for ws in zip(*(n.ws for n in nets), strict=True):
        g = torch.randn(ws[0].shape, generator=gen) * scale * 10 ** torch.randn(ws[0].shape, generator=gen)
        for w in ws:
            w.grad = g.clone()


def _steps(ours, ref, opt, ref_opt, scales, monkeypatch=None) -> int:
    """Clip (max_norm 1) and step both, `scales` setting each step's gradient size; returns the kernel's calls."""
    calls = []
    if monkeypatch is not None:
        step = cpu_adamw.kernel_step
        monkeypatch.setattr(cpu_adamw, "kernel_step", lambda *a: (calls.append(a[1]), step(*a)))
    for scale in scales:
        _grads((ours, ref), scale)
        norm = dist_lib.clip_grad_norm(ours, 1.0, dist_lib.Dist(), opt.fold_grad_factor)
        ref_norm = dist_lib.clip_grad_norm(ref, 1.0, dist_lib.Dist())
        assert torch.equal(norm, ref_norm)
        step_unless_nonfinite(opt, (~torch.isfinite(norm)).float())
        step_unless_nonfinite(ref_opt, (~torch.isfinite(ref_norm)).float())
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    return len(calls), calls


def _assert_same(ours, ref, opt, ref_opt) -> None:
    for w, r in zip(ours.ws, ref.ws, strict=True):
        assert torch.equal(w, r), (w - r).abs().max()
        s, rs = opt.state[w], ref_opt.state[r]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[key], rs[key]), key


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.3, 0.99)])  # 1 - beta1 >= 0.5: the lerp's other form
def test_the_kernel_gives_torchs_clip_and_fused_adamw_bit_for_bit(threads, betas, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nets = _pair(betas=betas)
        # Step 1 makes the state (torch's); then clipped (0.3, 2.0: norms far above 1) and unclipped (1e-7) steps.
        calls, factors = _steps(*nets, (0.3, 2.0, 1e-7, 0.5), monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert calls == 3 and factors[0] < 1.0 and factors[1] == 1.0 and factors[2] < 1.0
    _assert_same(*nets)


@needs_kernels
def test_a_non_finite_step_changes_nothing_as_torchs_skip(monkeypatch):
    nets = _pair()
    _steps(*nets, (0.3, 0.5))
    ours, ref, opt, ref_opt = nets
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    _grads((ours, ref), 0.5)
    ours.ws[1].grad[3] = float("nan")
    ref.ws[1].grad[3] = float("nan")
    calls = []
    step = cpu_adamw.kernel_step
    monkeypatch.setattr(cpu_adamw, "kernel_step", lambda *a: (calls.append(1), step(*a)))
    for net, o in ((ours, opt), (ref, ref_opt)):
        norm = dist_lib.clip_grad_norm(net, 1.0, dist_lib.Dist(), getattr(o, "fold_grad_factor", None))
        step_unless_nonfinite(o, (~torch.isfinite(norm)).float())
    assert calls == [1]
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    _assert_same(*nets)


@needs_kernels
def test_tensors_the_kernel_cannot_take_keep_torchs_path(monkeypatch):
    """A size not a multiple of 16 (torch's scalar tail), and the first step (no state yet): torch's clip and step."""
    nets = _pair(shapes=((64, 48), (7, 3)))
    calls, _ = _steps(*nets, (0.3, 2.0, 0.5), monkeypatch)
    assert calls == 0
    _assert_same(*nets)
    fresh = _pair(shapes=((64, 48),))
    _grads(fresh[:2], 0.3)
    assert not cpu_adamw.applies(fresh[2])  # before its first step


def test_without_the_kernels_the_step_is_torchs(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    nets = _pair()
    calls, _ = _steps(*nets, (0.3, 2.0, 0.5), monkeypatch)
    assert calls == 0
    _assert_same(*nets)


def test_a_step_off_the_cpu_never_builds_the_cpu_kernels(monkeypatch):
    """A GPU run's optimizer asks `applies` every step: weights off the CPU answer no before the library is looked
    up (meta tensors stand in for a GPU's here)."""
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: pytest.fail("the CPU kernels were looked up"))
    w = torch.nn.Parameter(torch.empty(64, 16, device="meta"))
    w.grad = torch.empty_like(w)
    opt = FusedAdamW([w], lr=1e-3, fused=True)
    opt.state[w] = {"step": torch.zeros(()), "exp_avg": torch.empty_like(w), "exp_avg_sq": torch.empty_like(w)}
    assert not cpu_adamw.applies(opt) and not opt.fold_grad_factor(0.5)


_ISA_PROBE = """
import json, pytest, torch
import tests.test_cpu_adamw as t
nets = t._pair()
with pytest.MonkeyPatch.context() as mp:
    calls, _ = t._steps(*nets, (0.3, 2.0, 1e-7), mp)
t._assert_same(*nets)
print(json.dumps({"calls": calls, "isa": torch.backends.cpu.get_cpu_capability()}))
"""


@needs_kernels
@pytest.mark.parametrize("cap", ["avx2", "default"])
def test_torchs_bits_at_each_isa_it_dispatches_for(cap, tmp_path):
    """torch compiles its fused AdamW for AVX2 (FMA: the second moment contracted) and DEFAULT (no FMA); our library
    is built capped alike (model/cpu_kernels.py), and must match each."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "PRETRAIN_KERNELS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _ISA_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["calls"] == 2 and got["isa"].lower() == {"avx2": "avx2", "default": "default"}[cap]
