"""bench/train_step.py --floor (issue 23.1): the step against its own GEMMs, each timed alone at its shape.

The GEMM list must be the step's: its FLOPs equal ModelConfig.flops_per_token (6N + attention, no causal
halving) for every variant it covers, and the bench prints the floor ratio per precision with the host's ISA.
"""

from __future__ import annotations

import pytest

from bench import train_step
from bench.gemm_floor import native_bf16, step_gemms
from model import ModelConfig


@pytest.mark.parametrize("fields", [dict(attn="baseline"), dict(attn="gqa", n_kv_head=2),
                                    dict(attn="bottleneck", attn_dim=64), dict(attn="baseline", null_attn=True),
                                    dict(attn="baseline", tie_qk=True)])
def test_gemm_list_flops_are_the_model_flops_of_a_step(fields):
    cfg = ModelConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, d_model=128, d_ff=256, **fields)
    batch, seq_len = 3, 64
    listed = sum(g.flops for g in step_gemms(cfg, batch, seq_len))
    assert listed == pytest.approx(cfg.flops_per_token(seq_len) * batch * seq_len, rel=1e-12)


def test_floor_mode_prints_the_ratio_per_precision_with_the_isa(capsys):
    assert train_step.main(["--presets", "tiny", "--floor", "--iters", "1", "--tiny-batch", "1",
                            "--seq-len", "32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "host ISA:" in out
    precisions = ("fp32", "bf16") if native_bf16() else ("fp32",)
    for p in precisions:
        assert f"  {p}: step " in out and "of its GEMM floor by CPU time" in out
    assert out.count("lm_head dW") == len(precisions)
