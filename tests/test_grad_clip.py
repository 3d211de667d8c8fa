"""The trainer's gradient clipping on CPU (pretrain/train/grad_clip.py via distributed.clip_grad_norm): the exact
2-norm rounded to fp32 (fp64 sums, the same at any thread count; torch's own norm where the kernels are not built),
the gradients torch's clip gives for that norm, bit for bit, clipped or not, NaN included; and no multiply at all when
the norm is within max_norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, ModelConfig, cpu_kernels
from pretrain.train import distributed as dist_lib
from pretrain.train import grad_clip


def _model_with_grads(scale: float) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, d_model=16, d_ff=32))
    idx = torch.randint(0, 100, (2, 16))
    (model(idx, idx.roll(1)) * scale).backward()
    return model


class _Muls(TorchDispatchMode):
    """Multiplies of tensors (not of the 0-dim norm and factor)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0][0] if isinstance(args[0], list | tuple) else args[0]
        if "mul" in func.__name__ and isinstance(first, torch.Tensor) and first.dim() > 0:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _exact_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor(math.sqrt(sum(t.double().square().sum().item() for t in tensors)), dtype=torch.float32)


@pytest.mark.parametrize("scale", [1e-3, 1e3, float("nan")])
def test_clip_is_torchs_clip_with_the_exact_norm(scale):
    ours, theirs = _model_with_grads(scale), _model_with_grads(scale)
    norm = dist_lib.clip_grad_norm(ours, 1.0, dist_lib.Dist())
    want = _exact_norm([p.grad for p in theirs.parameters()])
    assert torch.equal(norm, want) or (norm.isnan() and want.isnan())
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 1.0, want)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad) or torch.equal(p.grad.isnan(), q.grad.isnan()), name
    if scale == 1e3:
        assert norm > 1.0  # clipped: the gradients were multiplied
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ours.parameters()]))
        assert abs(total.item() - 1.0) < 1e-4


def test_a_large_gradients_norm_is_exact_at_any_thread_count():
    """4M values, as an embedding gradient: summed in fp32 (torch's CPU norm here) the norm comes out 9e-5 low; the
    clip's norm is the exact one rounded to fp32, and the same bits on one thread and on two."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4_000_000, generator=gen) * 1e-2, torch.zeros(0), torch.randn(1000, 7, generator=gen)]
    want = _exact_norm(grads)
    threads = torch.get_num_threads()
    try:
        norms = []
        for n in (1, 2):
            torch.set_num_threads(n)
            norms.append(grad_clip.total_norm(grads))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(norms[0], want) and torch.equal(norms[1], want)


def test_bf16_gradients_get_the_exact_norm_in_fp32_and_are_clipped_by_it():
    """--param-dtype bf16: torch's norm of bf16 gradients is itself rounded to bf16 (3 significant digits)."""
    model = _model_with_grads(1e3).bfloat16()
    for p in model.parameters():
        p.grad = p.grad.bfloat16()
    grads = [p.grad.clone() for p in model.parameters()]
    mixed = grads[:2] + [g.float() for g in grads[2:]]  # fp32 and bf16 together: each summed, in fp64
    want = _exact_norm(grads)
    assert torch.equal(grad_clip.total_norm(mixed), want)
    norm = dist_lib.clip_grad_norm(model, 1.0, dist_lib.Dist())
    assert norm.dtype == torch.float32 and torch.equal(norm, want)
    theirs = [torch.nn.Parameter(g.clone()) for g in grads]
    for t, g in zip(theirs, grads, strict=True):
        t.grad = g.clone()
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, want)
    for p, t in zip(model.parameters(), theirs, strict=True):
        assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, t.grad)


def test_torchs_norm_where_the_kernels_are_not_built(monkeypatch):
    model = _model_with_grads(1e3)
    grads = [p.grad for p in model.parameters()]
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    assert torch.equal(grad_clip.total_norm(grads), torch.nn.utils.get_total_norm(grads, 2.0))
    monkeypatch.undo()
    strided = [next(g for g in grads if g.dim() == 2).t()]  # not contiguous: torch's norm too
    assert torch.equal(grad_clip.total_norm(strided), torch.nn.utils.get_total_norm(strided, 2.0))


def test_no_multiply_within_max_norm():
    model = _model_with_grads(1e-3)
    with _Muls() as muls:
        norm = dist_lib.clip_grad_norm(model, 1.0, dist_lib.Dist())
    assert norm < 1.0 and muls.seen == []
    model = _model_with_grads(1e3)
    with _Muls() as muls:
        dist_lib.clip_grad_norm(model, 1.0, dist_lib.Dist())
    assert muls.seen  # clipping still multiplies
