"""ModelConfig: defaults, presets, validation, and the analytic params / FLOPs / KV-cache formulas
checked against the real model."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, PRESETS, ModelConfig
from model.variants import ATTENTION_VARIANTS

VARIANTS = list(ATTENTION_VARIANTS)
OPTION_SETS = [{}, {"null_attn": True}, {"tie_qk": True}, {"learned_temp": True},
               {"tie_embeddings": False}, {"null_attn": True, "tie_qk": True, "learned_temp": True}]


def small_config(attn: str, **options) -> ModelConfig:
    kw = dict(vocab_size=1000, block_size=64, n_layer=2, n_head=4, d_model=64, d_ff=96, attn=attn,
              sem_dim=16, geo_dim=32, attn_dim=48)
    if attn == "gqa":
        kw["n_kv_head"] = 4 if options.get("tie_qk") else 2
    return ModelConfig(**(kw | options))


@pytest.mark.parametrize("attn,options", [  # tie_qk only where the variant can give k the shape of q
    pytest.param(v, o, id=f"{'+'.join(o) or 'plain'}-{v}") for v in VARIANTS for o in OPTION_SETS
    if ATTENTION_VARIANTS[v].ties_qk or not o.get("tie_qk")])
def test_num_params_matches_model(attn, options):
    cfg = small_config(attn, **options)
    model = GPT(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters()) == model.num_params()
    embedding = model.wte.weight.numel() * (1 if cfg.tie_embeddings else 2)
    assert cfg.num_params(non_embedding=True) == cfg.num_params() - embedding


def counted_flops_per_token(cfg: ModelConfig, T: int, B: int = 2) -> float:
    """Training FLOPs per token as torch's FlopCounterMode sees them (logits + full CE + backward)."""
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    # The math SDPA backend runs attention as matmuls, which FlopCounterMode counts (full T x T).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(idx)
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), idx.reshape(-1)).backward()
    return counter.get_total_flops() / (B * T)


@pytest.mark.parametrize("attn,options", [(v, {}) for v in VARIANTS] + [("decoupled", {"null_attn": True})])
def test_flops_per_token_matches_flop_counter(attn, options):
    # Small vocab and T = 4 d_model: attention is ~half the FLOPs, so an attention term off by 2x
    # (e.g. causal halving) would fail even the 10% bound the issue asks for.
    cfg = small_config(attn, vocab_size=64, block_size=256, **options)
    T = 256
    measured = counted_flops_per_token(cfg, T)
    assert abs(cfg.flops_per_token(T) / measured - 1) < 0.10
    hd_qk, hd_v, _ = cfg.head_dims
    assert 6 * cfg.n_layer * T * cfg.n_head * (hd_qk + hd_v) > 0.3 * measured
    # Matmul FLOPs are all the counter sees and all the formula counts: they agree exactly.
    assert cfg.flops_per_token(T) == pytest.approx(measured, rel=1e-9)


def test_flops_null_attn_adds_one_key():
    plain, null = small_config("gqa", vocab_size=64), small_config("gqa", vocab_size=64, null_attn=True)
    extra = counted_flops_per_token(null, 16) - counted_flops_per_token(plain, 16)
    assert extra > 0
    assert null.flops_per_token(16) - plain.flops_per_token(16) == pytest.approx(extra, rel=1e-9)


@pytest.mark.parametrize("attn", VARIANTS)
def test_kv_cache_bytes_match_allocated_cache(attn):
    cfg = small_config(attn, null_attn=True)
    model = GPT(cfg).to(torch.bfloat16)
    caches = model.new_caches(batch=1, max_len=10)
    allocated = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in caches)
    assert allocated / 10 == cfg.kv_cache_bytes_per_token(2)
    assert cfg.kv_cache_bytes_per_token(4) == 2 * cfg.kv_cache_bytes_per_token(2)


def test_kv_cache_bytes_formulas():
    d, L = 64, 2
    assert small_config("baseline").kv_cache_bytes_per_token(2) == L * 2 * d * 2
    assert small_config("gqa").kv_cache_bytes_per_token(2) == L * 2 * (2 * 16) * 2  # 2 of 4 heads
    assert small_config("bottleneck").kv_cache_bytes_per_token(1) == L * 2 * 48
    assert small_config("decoupled").kv_cache_bytes_per_token(1) == L * (16 + 32 + 48)  # k_s, k_g, v


def test_defaults_resolved_to_numbers():
    cfg = ModelConfig(d_model=256, n_head=4, attn="decoupled")
    assert (cfg.sem_dim, cfg.geo_dim, cfg.attn_dim, cfg.n_kv_head) == (16, 32, 48, 4)
    assert ModelConfig(d_model=256, n_head=8, attn="gqa").n_kv_head == 2
    assert ModelConfig(d_model=240, n_head=6, attn="gqa").n_kv_head == 1  # MQA when 4 does not divide
    assert all(v is not None for v in cfg.to_dict().values())
    assert cfg.padded_vocab_size == 50304 and cfg.padded_vocab_size % 64 == 0


def test_dict_round_trip_is_json():
    cfg = ModelConfig.from_preset("small", attn="decoupled", null_attn=True, learned_temp=True)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg


def test_presets():
    assert set(PRESETS) == {"tiny", "small", "1b"}
    assert 2e6 < ModelConfig.from_preset("tiny").num_params() < 10e6
    assert 120e6 < ModelConfig.from_preset("small").num_params() < 130e6
    big = ModelConfig.from_preset("1b")
    assert (big.d_model, big.n_layer, big.n_head, big.d_ff) == (2048, 22, 32, 5632)
    assert 1.0e9 < big.num_params() < 1.3e9
    for name in ("small", "1b"):
        for attn in ("bottleneck", "decoupled"):
            cfg = ModelConfig.from_preset(name, attn=attn)
            assert all(hd % 8 == 0 for hd in cfg.head_dims), (name, attn, cfg.head_dims)
            assert (cfg.sem_dim // cfg.n_head) % 8 == 0
    # overriding sem/geo re-derives attn_dim; overriding d_model falls back to d/16, d/8
    assert ModelConfig.from_preset("small", attn="decoupled", sem_dim=192).attn_dim == 192 + 192
    assert ModelConfig.from_preset("small", d_model=1024, n_head=16).sem_dim == 64


BAD = [
    (dict(attn="mla"), "unknown attn"),
    (dict(d_model=30), "d_model=30 must be a positive multiple of n_head=4"),
    (dict(d_model=36), "RoPE needs an even head dim"),
    (dict(attn="bottleneck", attn_dim=26), "attn_dim=26 must be a positive multiple"),
    (dict(attn="bottleneck", attn_dim=12), "RoPE needs an even head dim"),
    (dict(attn="decoupled", geo_dim=12), "RoPE needs an even head dim"),
    (dict(attn="decoupled", sem_dim=10), "sem_dim=10 must be a positive multiple"),
    (dict(attn="gqa", n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(attn="gqa", n_kv_head=2, tie_qk=True), "set n_kv_head=4 or drop tie_qk"),
    (dict(attn="baseline", n_kv_head=2), "only applies to attn='gqa'"),
    (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
    (dict(rope_base=0.0), "rope_base"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_validation_errors_name_the_fix(kwargs, message):
    base = dict(vocab_size=100, n_layer=1, n_head=4, d_model=32, d_ff=32, sem_dim=8, geo_dim=16)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        ModelConfig(**(base | kwargs))
    suggestion = re.search(r"use e\.g\. (\w+)=(\d+)", str(err.value))
    if suggestion:  # the suggested value is itself accepted
        ModelConfig(**(base | kwargs | {suggestion[1]: int(suggestion[2])}))


def test_semantic_heads_need_not_be_even():
    # q_s/k_s get no RoPE, so odd semantic head dims are fine.
    assert ModelConfig(n_head=4, d_model=32, attn="decoupled", sem_dim=12, geo_dim=16).head_dims[0] == 7


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="use one of tiny, small, 1b"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"d_modle": 3})


def test_model_package_imports_only_torch_and_stdlib():
    allowed = {"torch"} | set(sys.stdlib_module_names)
    for path in Path(__file__).resolve().parents[1].joinpath("model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, (path.name, names)
