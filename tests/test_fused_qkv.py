"""Fused q/k/v projection (issue 23.5): one GEMM per block for attention's q, k and v, split on export.

Where q, k and v all project the same input through their own weights (baseline, gqa, bottleneck) the module holds
one qkv_proj, rows [q; k; v]; attention equals the three-projection formula, a forward runs two linears fewer per
block, the Llama export writes the thirds as q_proj / k_proj / v_proj and --init-from fuses them back. tie_qk
(k is q) and decoupled keep their own projections.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import GPT, ModelConfig
from model.attention import CausalSelfAttention
from model.rope import apply_rotary
from pretrain.evals.paper_metrics import projection_stable_ranks, stable_rank
from pretrain.export import main as export_main
from pretrain.llama import from_llama, to_llama

BASE = dict(vocab_size=250, block_size=64, n_layer=2, n_head=4, d_model=64, d_ff=96, rope_base=100.0)
# (q, k, v) row widths: gqa's k/v are 2 heads of 16; bottleneck's heads are attn_dim / n_head = 8 wide.
VARIANTS = {"baseline": ({}, (64, 64, 64)), "gqa": ({"n_kv_head": 2}, (64, 32, 32)),
            "bottleneck": ({"attn_dim": 32}, (32, 32, 32))}


@pytest.mark.parametrize("attn", list(VARIANTS))
def test_fused_attention_equals_the_three_projection_formula(attn):
    extra, widths = VARIANTS[attn]
    cfg = ModelConfig(**BASE, attn=attn, **extra)
    torch.manual_seed(0)
    mod = CausalSelfAttention(cfg).double()
    assert not hasattr(mod, "q_proj") and not hasattr(mod, "v_proj")
    assert mod.qkv_proj.weight.shape == (sum(widths), 64)
    with torch.no_grad():
        mod.qkv_proj.weight.normal_(0, 0.3)  # sharp attention, so a mixed-up q/k/v row block shows
    wq, wk, wv = mod.qkv_proj.weight.detach().split(widths)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    B, T, H = 2, 12, cfg.n_head
    kv = widths[1] * H // widths[0]
    heads = lambda t, n: t.view(B, T, n, -1).transpose(1, 2)  # noqa: E731
    cos, sin = mod.rope(torch.arange(T))
    q = apply_rotary(heads(x @ wq.T, H), cos, sin)
    k = apply_rotary(heads(x @ wk.T, kv), cos, sin).repeat_interleave(H // kv, dim=1)
    v = heads(x @ wv.T, kv).repeat_interleave(H // kv, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(mod(x), mod.o_proj(y), rtol=0, atol=1e-10)


def test_tie_qk_and_decoupled_keep_their_own_projections():
    tied = CausalSelfAttention(ModelConfig(**BASE, tie_qk=True))
    assert {n for n, _ in tied.named_children() if n.endswith("_proj")} == {"q_proj", "v_proj", "o_proj"}
    dec = GPT(ModelConfig(**BASE, attn="decoupled")).blocks[0].attn
    assert "qkv_proj" not in dict(dec.named_children()) and hasattr(dec, "v_proj")


def _attention_linear_calls(cfg: ModelConfig) -> int:
    model = GPT(cfg).eval()
    calls = []
    for block in model.blocks:
        for m in block.attn.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randint(0, 250, (2, 16)))
    return len(calls)


def test_a_forward_runs_two_attention_linears_per_block():
    cfg = ModelConfig(**BASE, attn="gqa", n_kv_head=2)
    assert _attention_linear_calls(cfg) == 2 * cfg.n_layer  # qkv, o
    # the unfused layout (tie_qk keeps q and v apart) runs one more per block: the count sees the difference
    assert _attention_linear_calls(ModelConfig(**BASE, tie_qk=True)) == 3 * cfg.n_layer


def test_stable_ranks_report_q_k_v_separately_from_the_fused_weight():
    attn = GPT(ModelConfig(**BASE, attn="gqa", n_kv_head=2)).blocks[1].attn
    ranks = projection_stable_ranks(attn)
    assert set(ranks) == {"stable_rank_q", "stable_rank_k", "stable_rank_v", "stable_rank_o"}
    w = attn.qkv_proj.weight
    for name, rows in (("q", w[:64]), ("k", w[64:96]), ("v", w[96:])):
        torch.testing.assert_close(ranks[f"stable_rank_{name}"], stable_rank(rows))


@pytest.mark.parametrize("extra", [{}, {"attn": "gqa", "n_kv_head": 2}], ids=["baseline", "gqa"])
def test_llama_export_splits_q_k_v_and_init_from_fuses_them_back(tmp_path, extra):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = ModelConfig(**BASE, **extra)
    torch.manual_seed(0)
    model = GPT(cfg)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "model_config": cfg.to_dict(), "train_config": {}, "step": 1},
               run / "last.pt")
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    tensors = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        tensors |= load_file(str(f))
    fused = model.state_dict()["blocks.1.attn.qkv_proj.weight"]
    kv = 64 * cfg.n_kv_head // cfg.n_head
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.weight"], fused[:64])
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], fused[64:64 + kv])
    assert torch.equal(tensors["model.layers.1.self_attn.v_proj.weight"], fused[64 + kv:])
    assert not any("qkv" in name for name in tensors)
    back = from_llama(to_llama(model.state_dict(), cfg), cfg, model.state_dict(), "test")
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
