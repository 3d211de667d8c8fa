"""The tied embedding's gradient added into the chunked loss's (model/tied_grad.py) and the loss's ignored rows
masked on rows x d (model/loss_chunk.py backprop_chunk): the same gradients as autograd's own path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, ModelConfig
from model.tied_grad import TiedGrad

CFG = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=48)  # padded vocab 128


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**(CFG | overrides)))
    model.loss_chunk_rows = 7  # several chunks, the last partial
    return model


def _batch(ignored: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 100, (3, 20), generator=g), torch.randint(0, 100, (3, 20), generator=g)
    if ignored:
        targets[0, :6] = -100
        targets[2, 15:] = -100
    return idx, targets


def _step(model: GPT, amp: bool, micro_batches: int = 1) -> dict[str, torch.Tensor]:
    for i in range(micro_batches):
        idx, targets = _batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(idx.roll(i), targets.roll(i)) / micro_batches
        loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_tied_gradient_equals_autograds(monkeypatch, amp, micro_batches):
    model = _model()
    got = _step(model, amp, micro_batches)
    monkeypatch.setattr(GPT, "_hands_over_tied_grad", lambda self: False)  # autograd's embedding backward
    want = _step(model, amp, micro_batches)
    for name in want:  # rows added one by one instead of summed first: rounding order only
        torch.testing.assert_close(got[name], want[name], atol=1e-7, rtol=1e-5, msg=name)
    assert (got["wte.weight"] != 0).any(dim=1).sum() > 40  # both parts present: looked-up rows and the head's


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.seen.append((str(func), tuple(out.shape)))
        return out


def test_no_vocab_sized_embedding_gradient_or_sum():
    """The backward makes one vocab x d gradient (the loss's), not a second zero-filled one plus their sum."""
    model = _model()
    idx, targets = _batch()
    loss = model(idx, targets)
    with _Ops() as ops:
        loss.backward()
    vocab_sized = [name for name, shape in ops.seen if shape == (128, 32)]
    made_twice = ("aten.embedding_dense_backward", "aten.zeros", "aten.new_zeros", "aten.fill_", "aten.add.",
                  "aten.add_.")
    assert not [n for n in vocab_sized if n.startswith(made_twice)], vocab_sized
    assert "aten.index_add_.default" in vocab_sized


def test_untied_and_logits_only_keep_autograds_path():
    untied = _model(tie_embeddings=False)
    assert not untied._hands_over_tied_grad()
    model = _model()
    idx, _ = _batch()
    logits = model(idx)  # no loss: the head's gradient flows as usual, the embedding's from zeros
    logits.float().square().mean().backward()
    got = model.wte.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert not model._hands_over_tied_grad()
    x = model.hidden_states(idx, tied=TiedGrad())  # nothing handed over: starts from zeros
    model.lm_head(x)[..., :100].float().square().mean().backward()
    torch.testing.assert_close(model.wte.weight.grad, got, atol=1e-7, rtol=1e-5)


def test_ignored_rows_masked_on_rows_not_vocab():
    """All rows ignored in a chunk, the rest not: the chunked loss's gradients equal those of the full logits'
    cross-entropy, with no pass over a rows x vocab tensor multiplying by the row mask."""
    model = _model()
    idx, targets = _batch()
    targets[1, :7] = -100
    loss = model(idx, targets)
    with _Ops() as ops:
        loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    with _Ops() as ops:
        model(idx, targets)
    assert not [s for name, s in ops.seen if "mul" in name and s[-1] == 128], ops.seen
