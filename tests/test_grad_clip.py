"""The trainer's gradient clipping on CPU (pretrain/train/grad_clip.py via distributed.clip_grad_norm): the norm and
gradients torch's clip_grad_norm_ gives, bit for bit, clipped or not, NaN included; and no multiply at all when the
norm is within max_norm."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, ModelConfig
from pretrain.train import distributed as dist_lib


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


@pytest.mark.parametrize("scale", [1e-3, 1e3, float("nan")])
def test_clip_equals_torchs_bit_for_bit(scale):
    ours, theirs = _model_with_grads(scale), _model_with_grads(scale)
    norm = dist_lib.clip_grad_norm(ours, 1.0, dist_lib.Dist())
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    assert torch.equal(norm, want) or (norm.isnan() and want.isnan())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad) or torch.equal(p.grad.isnan(), q.grad.isnan()), name
    if scale == 1e3:
        assert norm > 1.0  # clipped: the gradients were multiplied
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ours.parameters()]))
        assert abs(total.item() - 1.0) < 1e-4


def test_no_multiply_within_max_norm():
    model = _model_with_grads(1e-3)
    with _Muls() as muls:
        norm = dist_lib.clip_grad_norm(model, 1.0, dist_lib.Dist())
    assert norm < 1.0 and muls.seen == []
    model = _model_with_grads(1e3)
    with _Muls() as muls:
        dist_lib.clip_grad_norm(model, 1.0, dist_lib.Dist())
    assert muls.seen  # clipping still multiplies
