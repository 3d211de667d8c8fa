"""GPT: chunked loss vs full cross-entropy, padded vocab, activation checkpointing, bf16, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig

VOCAB = 100  # padded to 128


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=48,
              attn="decoupled", sem_dim=8, geo_dim=16, null_attn=True, learned_temp=True)
    model = GPT(ModelConfig(**(kw | overrides)))
    with torch.no_grad():  # make every parameter matter for the gradient comparisons
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    return model


def grads(model: GPT) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_chunked_loss_and_grads_equal_full_cross_entropy(ignore_index, tie_embeddings):
    model = make_model(tie_embeddings=tie_embeddings)
    model.loss_chunk_rows = 7  # 3 x 20 = 60 rows: 9 chunks, the last one partial
    idx = torch.randint(0, VOCAB, (3, 20))
    targets = torch.randint(0, VOCAB, (3, 20))
    targets[0, :6] = ignore_index
    targets[2, 15:] = ignore_index

    loss = model(idx, targets, ignore_index=ignore_index)
    loss.backward()
    got = grads(model)
    logits = model(idx)
    assert logits.shape == (3, 20, VOCAB)
    want_loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1),
                                ignore_index=ignore_index)
    want_loss.backward()
    want = grads(model)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_loss_all_ignored_is_nan_like_cross_entropy():
    model = make_model()
    idx = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert math.isnan(model(idx, torch.full_like(idx, -100)).item())


def test_padded_vocab_rows_are_never_predicted():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        before = model(idx, idx).item()
        model.wte.weight[VOCAB:] = 50.0  # huge logits for the padding rows (tied head)
        after = model(idx, idx).item()
        logits = model(idx)
    assert model.wte.weight.shape[0] == 128 and logits.shape[-1] == VOCAB
    assert after == pytest.approx(before, abs=1e-6)
    model(idx, idx).backward()
    assert model.wte.weight.grad[VOCAB:].abs().max() == 0


def test_loss_without_grad_and_with_frozen_head():
    model = make_model(tie_embeddings=False)
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        no_grad_loss = model(idx, idx)
    model.lm_head.weight.requires_grad_(False)
    loss = model(idx, idx)
    loss.backward()
    assert loss.item() == pytest.approx(no_grad_loss.item(), abs=1e-6)
    assert model.lm_head.weight.grad is None and model.norm_f.weight.grad is not None


def test_grad_checkpoint_same_grads_and_recomputes():
    model = make_model(attn="gqa", n_kv_head=2, sem_dim=None, geo_dim=None).train()
    idx = torch.randint(0, VOCAB, (2, 16))
    calls = []
    mlp_forward = model.blocks[0].mlp.forward
    model.blocks[0].mlp.forward = lambda x: calls.append(1) or mlp_forward(x)  # (hooks skip recompute)
    model(idx, idx).backward()
    plain = grads(model)
    assert len(calls) == 1
    model.grad_checkpoint = True
    calls.clear()
    model(idx, idx).backward()
    assert len(calls) == 2  # forward, then the recompute in backward
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_and_bf16_params_train():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        fp32 = model(idx, idx).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - fp32) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    model.to(torch.bfloat16)
    loss = model(idx, idx)
    loss.backward()
    assert abs(loss.item() - fp32) < 0.05
    assert model.wte.weight.grad.dtype == torch.bfloat16


def test_init_std_and_residual_scaling():
    cfg = ModelConfig(vocab_size=1000, n_layer=8, n_head=4, d_model=256, d_ff=512)
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    block = model.blocks[0]
    for w in block.attn.qkv_proj.weight.split((256, 256, 256)):  # q, k, v rows each get the plain init
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_int32_tokens_and_targets():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert model(idx.int(), idx.int()).item() == pytest.approx(model(idx, idx).item(), abs=1e-6)


def test_sequence_longer_than_block_size_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="exceeds block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tiny_preset_trains():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=256, attn="decoupled"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(15):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)
    assert losses[-1] < losses[0] - 1.0  # memorises the batch
