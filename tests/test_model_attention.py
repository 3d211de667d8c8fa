"""Attention variants: causality, SDPA vs a naive float64 reference, KV cache, GQA == MHA, bf16 RoPE."""

from __future__ import annotations

import math

import pytest
import torch

from model import GPT, ModelConfig
from model.rope import apply_rotary
from model.variants import ATTENTION_VARIANTS

VARIANTS = list(ATTENTION_VARIANTS)
OPTIONS = {
    "plain": {},
    "null": {"null_attn": True},
    "tieqk": {"tie_qk": True},
    "temp": {"learned_temp": True},
    "all": {"null_attn": True, "tie_qk": True, "learned_temp": True},
}
# tie_qk only where the variant can give k the shape of q (not one shared k/v head).
CASES = [(v, o) for v in VARIANTS for o in OPTIONS if ATTENTION_VARIANTS[v].ties_qk or not OPTIONS[o].get("tie_qk")]


def make_config(attn: str, **options) -> ModelConfig:
    # Unequal per-head sizes (decoupled: hd_s 2, hd_g 4, hd_v 6) so a wrong scale or split shows.
    # A small rope_base makes the rotation matter within a 24-token test sequence.
    kw = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=48, attn=attn,
              sem_dim=8, geo_dim=16, attn_dim=24, rope_base=100.0)
    if attn == "gqa":
        kw["n_kv_head"] = 4 if options.get("tie_qk") else 2
    kw.update(options)
    return ModelConfig(**kw)


def make_model(attn: str, option: str, seed: int = 0) -> GPT:
    """A model with large random weights (std 0.2) so attention is sharp and every parameter,
    including the null value and temperatures, influences the output."""
    torch.manual_seed(seed)
    model = GPT(make_config(attn, **OPTIONS[option]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_temp"):
                p.uniform_(-0.5, 0.5)
            elif "norm" not in name:
                p.normal_(0.0, 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------ reference
def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    B, T, _ = t.shape
    return t.view(B, T, n, -1).transpose(1, 2)


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE in float64 from scratch."""
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat((x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()), dim=-1)


def split_projections(attn, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The q/k/v weights by name: rows [q; k; v] of a fused qkv_proj, cut at widths computed here from cfg (not
    the module's), else the separate q_proj (k is q under tie_qk; decoupled has none) and v_proj."""
    if not hasattr(attn, "qkv_proj"):
        return {name: getattr(attn, f"{name}_proj").weight for name in "qv" if hasattr(attn, f"{name}_proj")}
    qk_hd, v_hd, _ = cfg.head_dims
    widths = (cfg.n_head * qk_hd, cfg.n_kv_head * qk_hd, cfg.n_kv_head * v_hd)
    assert attn.qkv_proj.weight.shape[0] == sum(widths)
    return dict(zip("qkv", attn.qkv_proj.weight.split(widths), strict=True))


def reference_attention(attn, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Explicit einsum/softmax attention in float64 from the module's own weights."""
    return reference_parts(attn, cfg, x)["y"]


def reference_parts(attn, cfg: ModelConfig, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """reference_attention's output y plus its probabilities and (decoupled) semantic / geometric scores,
    columns laid out as the model's trace: null slot first when null_attn."""
    x = x.double()
    H, KV, tie = cfg.n_head, cfg.n_kv_head, cfg.tie_qk
    lin = lambda m: x @ m.weight.double().t()
    w = split_projections(attn, cfg)
    proj = lambda name: x @ w[name].double().t()
    rep = lambda t: t.repeat_interleave(H // KV, dim=1)  # the reference may copy K/V per query head
    null_k = attn.null_k.double()[None] if cfg.null_attn else None
    if cfg.attn == "decoupled":
        hd_s, hd_g = cfg.sem_dim // H, cfg.geo_dim // H
        q_s, q_g = _heads(lin(attn.q_sem_proj), H), _rope(_heads(lin(attn.q_geo_proj), H), cfg.rope_base)
        k_s = q_s if tie else _heads(lin(attn.k_sem_proj), KV)
        k_g = q_g if tie else _rope(_heads(lin(attn.k_geo_proj), KV), cfg.rope_base)
        # The two score terms, each scaled once by its own head dim.
        sem = torch.einsum("bhtd,bhsd->bhts", q_s, rep(k_s)) / math.sqrt(hd_s)
        geo = torch.einsum("bhtd,bhsd->bhts", q_g, rep(k_g)) / math.sqrt(hd_g)
        if null_k is not None:
            nk = rep(null_k)
            sem = torch.cat((torch.einsum("bhtd,bhsd->bhts", q_s, nk[..., :hd_s]) / math.sqrt(hd_s), sem), -1)
            geo = torch.cat((torch.einsum("bhtd,bhsd->bhts", q_g, nk[..., hd_s:]) / math.sqrt(hd_g), geo), -1)
            null_scores, scores = (sem + geo)[..., :1], (sem + geo)[..., 1:]
        else:
            scores = sem + geo
    else:
        q = _rope(_heads(proj("q"), H), cfg.rope_base)
        k = q if tie else _rope(_heads(proj("k"), KV), cfg.rope_base)
        scale = 1 / math.sqrt(q.shape[-1])
        scores = torch.einsum("bhtd,bhsd->bhts", q, rep(k)) * scale
        if null_k is not None:
            null_scores = torch.einsum("bhtd,bhsd->bhts", q, rep(null_k)) * scale
        sem = geo = None
    v = rep(_heads(proj("v"), KV))
    T = x.shape[1]
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    if null_k is not None:
        scores = torch.cat((null_scores, scores), dim=-1)
        v = torch.cat((rep(attn.null_v.double()[None]).expand(x.shape[0], -1, -1, -1), v), dim=2)
    if cfg.learned_temp:
        temp = attn.log_temp.double().exp().view(1, H, 1, 1)
        scores = scores * temp
        sem, geo = (None, None) if sem is None else (sem * temp, geo * temp)
    probs = scores.softmax(dim=-1)
    y = torch.einsum("bhts,bhsd->bhtd", probs, v)
    y = y.transpose(1, 2).reshape(x.shape[0], T, -1) @ attn.o_proj.weight.double().t()
    return {"y": y, "probs": probs, "sem": sem, "geo": geo}


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("attn,option", CASES)
def test_sdpa_matches_naive_reference(attn, option):
    model = make_model(attn, option)
    block = model.blocks[0].attn
    x = torch.randn(2, 24, model.config.d_model)
    with torch.no_grad():
        got = block(x)
        want = reference_attention(block, model.config, x).float()
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn,option", CASES)
def test_reference_path_probabilities_match_float64(attn, option):
    """The reference path (explicit softmax after the model's own projections) gives the probabilities and
    semantic/geometric score parts of an independent float64 computation, and the same output as SDPA."""
    model = make_model(attn, option).double()
    block = model.blocks[0].attn
    x = torch.randn(2, 24, model.config.d_model, dtype=torch.float64)
    traces = []
    with torch.no_grad():
        traced = block(x, on_trace=traces.append)
        fast = block(x)
        want = reference_parts(block, model.config, x)
    trace = traces[0]
    # RoPE angles are always fp32 (model/rope.py), so a float64 model agrees with the reference to ~1e-7.
    torch.testing.assert_close(traced, want["y"], atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, traced, atol=1e-10, rtol=0)
    torch.testing.assert_close(trace.probs, want["probs"], atol=1e-6, rtol=0)
    assert trace.probs.sum(-1).sub(1).abs().max() < 1e-12
    if attn == "decoupled":
        visible = trace.mask
        for got, ref in ((trace.sem_scores, want["sem"]), (trace.geo_scores, want["geo"])):
            torch.testing.assert_close(got.masked_fill(~visible, 0), ref.masked_fill(~visible, 0),
                                       atol=1e-6, rtol=1e-5)
    else:
        assert trace.sem_scores is None and trace.geo_scores is None


@pytest.mark.parametrize("attn,option", CASES)
def test_causal(attn, option):
    model = make_model(attn, option)
    torch.manual_seed(1)
    idx = torch.randint(0, 101, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint(0, 99, (2, 20 - t - 1))) % 101
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3  # later positions do see the change


@pytest.mark.parametrize("attn,option", CASES)
def test_kv_cache_attention_matches_full(attn, option):
    """Prefill, then single tokens, then a multi-token chunk (the masked cache path)."""
    model = make_model(attn, option)
    block = model.blocks[0].attn
    x = torch.randn(2, 12, model.config.d_model)
    with torch.no_grad():
        full = block(x)
        cache = block.new_cache(2, 16, x.device, x.dtype)
        parts = [block(x[:, :5], cache), block(x[:, 5:6], cache), block(x[:, 6:7], cache),
                 block(x[:, 7:12], cache)]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def _greedy_full_recompute(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        with torch.no_grad():
            logits = model(idx[:, -model.config.block_size:])[:, -1]
        idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("attn,option", [(v, o) for v, o in CASES if o in ("plain", "null", "all")])
def test_generate_kv_cache_equals_full_recompute(attn, option):
    model = make_model(attn, option)
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(2))
    # 5 + 40 tokens > block_size 32: also covers the cache rebuild once the context is cropped.
    got = model.generate(prompt, 40, temperature=0.0)
    want = _greedy_full_recompute(model, prompt, 40)
    assert got.shape == (2, 45)
    assert torch.equal(got, want)
    assert len(set(got[:, 5:].flatten().tolist())) > 1  # not one token repeated throughout


def test_generate_sampling_shapes_and_top_k():
    model = make_model("decoupled", "plain")
    torch.manual_seed(0)
    out = model.generate(torch.zeros(3, 1, dtype=torch.long), 6, temperature=0.8, top_k=5)
    assert out.shape == (3, 7) and int(out.max()) < 101
    # top_k=1 is greedy whatever the temperature
    prompt = torch.ones(1, 3, dtype=torch.long)
    assert torch.equal(model.generate(prompt, 5, temperature=1.5, top_k=1),
                       model.generate(prompt, 5, temperature=0.0))


@pytest.mark.parametrize("option", ["plain", "all"])
def test_gqa_with_all_kv_heads_equals_baseline(option):
    baseline = make_model("baseline", option)
    cfg = make_config("gqa", **OPTIONS[option]).to_dict() | {"n_kv_head": 4}
    gqa = GPT(ModelConfig.from_dict(cfg)).eval()
    gqa.load_state_dict(baseline.state_dict())
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), baseline(idx), atol=1e-6, rtol=0)


def test_bf16_model_rope_angles_distinct_and_fp32():
    cfg = ModelConfig(vocab_size=101, block_size=4096, n_layer=1, n_head=4, d_model=64, d_ff=64)
    model = GPT(cfg).to(torch.bfloat16)
    assert not [n for n, b in model.named_buffers() if b.is_floating_point()]  # nothing for .to() to cast
    rope = model.blocks[0].attn.rope
    pos = torch.arange(4096)
    # Why this matters: bf16 positions collapse (e.g. 4093..4095 all round to 4096).
    assert pos.to(torch.bfloat16).unique().numel() < 4096
    theta = rope.angles(pos)
    assert theta.dtype == torch.float32
    inv_freq = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(theta.double(), pos.double()[:, None] * inv_freq, rtol=1e-6, atol=1e-6)
    cos, sin = rope(pos)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.cat((cos, sin), dim=1).unique(dim=0).shape[0] == 4096
    # Rotating a bf16 tensor matches the fp32 rotation within bf16 rounding of the result.
    x = torch.randn(1, 1, 4096, 16)
    got = apply_rotary(x.to(torch.bfloat16), cos, sin)
    want = apply_rotary(x.to(torch.bfloat16).float(), cos, sin)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-6)
    # and the bf16 model still distinguishes far positions: q at 4000 and 4001 rotate differently
    assert not torch.equal(got[..., 4000, :], got[..., 4001, :])
