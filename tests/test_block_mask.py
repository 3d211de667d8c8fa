"""Null-attn's FlexAttention block mask is built once per forward and shared by every layer (issue 23.5), not
rebuilt inside each layer: equal outputs, one create_block_mask call per forward, through the trainer with
activation checkpointing too, and one compiled graph for all forwards however many masks they build.

FlexAttention runs forward on CPU here but has no CPU backward, and the trainer picks it only on CUDA. The tests
make attention_backend answer "flex" on CPU; where a backward runs, a dense SDPA stand-in of the kernel evaluates
the same mask function. What only a card confirms (the real kernel's backward and speed): docs/tiers.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex

import model.attention as attention
import model.gpt as gpt
from model import GPT, ModelConfig
from pretrain.track.runlog import read_jsonl
from train_v29 import main as train_main

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TINY = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "3", "--d-ff", "64", "--block-size", "64",
        "--batch-size", "2", "--train-seq-len", "16", "--val-frac", "0.05", "--eval-iters", "1", "--log-every", "1",
        "--device", "cpu", "--live", "off", "--save-every", "0", "--save-minutes", "0", "--null-attn"]


def null_attn_model(n_layer: int = 3) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=2, d_model=32, d_ff=64,
                            null_attn=True))
    for p in model.parameters():  # away from the init's zero null value, so the null slot matters
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.fixture
def mask_builds(monkeypatch) -> list[int]:
    """Sequence lengths of every create_block_mask call the model makes."""
    calls: list[int] = []
    real = flex.create_block_mask

    def counting(mask_mod, B, H, Q_LEN, KV_LEN, *args, **kwargs):
        calls.append(Q_LEN)
        return real(mask_mod, B, H, Q_LEN, KV_LEN, *args, **kwargs)

    monkeypatch.setattr(flex, "create_block_mask", counting)
    return calls


def flex_on_cpu(monkeypatch, compiled_only: bool = False) -> None:
    """attention_backend as on CUDA (flex for null-attn, inside compiled graphs when compiled_only)."""
    def backend(device_type: str, null_attn: bool, compiling: bool) -> str:
        return "flex" if null_attn and (compiling or not compiled_only) else "sdpa"

    monkeypatch.setattr(attention, "attention_backend", backend)


def test_one_mask_per_forward_equals_a_mask_per_layer_and_sdpa(monkeypatch, mask_builds):
    model = null_attn_model().eval()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        sdpa = model(idx)
        flex_on_cpu(monkeypatch)
        shared = model(idx)  # the real FlexAttention kernel (eager, forward only on CPU)
        assert mask_builds == [24]  # once, not once per layer
        monkeypatch.setattr(gpt, "shared_block_mask", lambda *a: None)  # each layer builds its own, as before
        per_layer = model(idx)
        assert mask_builds == [24] + [24] * 3
    torch.testing.assert_close(shared, per_layer, atol=0, rtol=0)
    torch.testing.assert_close(shared, sdpa, atol=1e-5, rtol=1e-5)


def test_compiled_blocks_take_the_forward_mask_without_recompiling(monkeypatch, mask_builds):
    """A fresh mask each forward is an input of the compiled block, not a guard failure: one graph for every
    forward; under force_eager (evals, samples) no mask is built and SDPA runs."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = null_attn_model(n_layer=2).eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(idx)
        flex_on_cpu(monkeypatch, compiled_only=True)
        counter = CompileCounter()
        for block in model.blocks:  # as speed.compile_blocks does, traced by dynamo without inductor (fast)
            block.compile(backend=counter, dynamic=False)
        outs = [model(idx) for _ in range(3)]
        assert mask_builds == [16] * 3  # built eagerly once per forward, never traced into a layer's graph
        assert counter.frame_count == 1  # both blocks, all three forwards: one graph
        with torch.compiler.set_stance("force_eager"):
            eager = model(idx)
        assert mask_builds == [16] * 3
    torch._dynamo.reset()
    for out in (*outs, eager):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def dense_flex(q, k, v, block_mask, scale=None, enable_gqa=False):
    """FlexAttention's result through SDPA with the block mask's mask function evaluated densely (CPU backward)."""
    mask = flex.create_mask(block_mask.mask_mod, None, None, q.shape[2], k.shape[2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def test_trainer_builds_one_mask_per_forward_through_checkpointing(monkeypatch, byte_data, tmp_path, mask_builds):
    argv = [*TINY, "--data", str(byte_data), "--steps", "2", "--grad-accum", "2", "--grad-checkpoint",
            "--eval-every", "0"]
    assert train_main([*argv, "--out-dir", str(tmp_path / "sdpa")]) == 0
    assert mask_builds == []  # CPU: SDPA with the explicit null-slot mask
    forwards = []
    real_hidden = GPT.hidden_states
    monkeypatch.setattr(GPT, "hidden_states", lambda self, idx, *a, **kw: forwards.append(idx.shape[1])
                        or real_hidden(self, idx, *a, **kw))
    flex_on_cpu(monkeypatch)
    monkeypatch.setattr(flex, "flex_attention", dense_flex)
    assert train_main([*argv, "--out-dir", str(tmp_path / "flex")]) == 0
    # 2 steps x 2 micro-batches, plus the evals at start and end; checkpointing's recompute reuses the forward's mask.
    assert len(forwards) >= 4 and mask_builds == forwards
    losses = {name: [e["loss"] for e in read_jsonl(tmp_path / name / "train.jsonl") if e["type"] == "train"]
              for name in ("sdpa", "flex")}
    assert len(losses["flex"]) == 2
    torch.testing.assert_close(losses["flex"], losses["sdpa"], atol=1e-5, rtol=1e-5)
