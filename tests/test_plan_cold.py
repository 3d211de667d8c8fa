"""The cold plan's shortcuts (issue 20.8: a first dry run takes seconds), each held equal to what it replaces:
a deep model rebuilt from runs with 1 and 2 blocks equals tracking every block, and AdamW8bit's fake state made
without its first update equals the state a real first step leaves."""

from __future__ import annotations

import pytest

from model import ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.plan import memory, step_trace
from pretrain.train.config import TrainConfig

# (checkpointing, policy, optimizer, weights, accumulation): every variant meets every checkpointing choice, with
# the optimizers, dtypes and held gradients spread over them (the suite stays short).
SETTINGS = [(False, "full", "adamw", "fp32", 1), (True, "full", "lion", "bf16", 2),
            (True, "selective", "adamw8bit", "bf16", 2)]


def tiny(attn: str, n_layer: int) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=256, attn=attn, n_layer=n_layer, null_attn=attn == "gqa")


@pytest.mark.parametrize("ckpt,policy,optimizer,dtype,accum", SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("attn", list(ATTENTION_VARIANTS))
def test_depth_rebuilt_from_one_and_two_blocks_equals_tracking_every_block(attn, ckpt, policy, optimizer, dtype,
                                                                           accum):
    assert memory.EXTRAPOLATE_FROM == 1
    mcfg = tiny(attn, 3)  # block 0 once, block 1 of the 2-block run twice
    cfg = TrainConfig(batch_size=2, grad_accum=accum, grad_checkpoint=ckpt, checkpoint_policy=policy,
                      optimizer=optimizer, param_dtype=dtype)
    rebuilt = memory._estimate(mcfg, cfg, 32)
    full = memory._estimate(mcfg, cfg, 32, extrapolate=False)
    assert rebuilt.extrapolated and not full.extrapolated
    assert rebuilt.tensor_peak_bytes == full.tensor_peak_bytes
    assert (rebuilt.param_bytes, rebuilt.grad_bytes, rebuilt.optimizer_bytes) == (
        full.param_bytes, full.grad_bytes, full.optimizer_bytes)

def _state(optimizer) -> list[tuple]:
    """Every tensor of the optimizer (its state per parameter and its cached lookup tables) by shape and dtype."""
    per_param = [(k, tuple(v.shape), v.dtype) for st in optimizer.state.values() for k, v in sorted(st.items())]
    tables = [(f"qmap signed={signed}", tuple(v.shape), v.dtype)
              for (_, signed), v in sorted(getattr(optimizer, "_qmaps", {}).items(), key=str)]
    return per_param + tables


@pytest.mark.parametrize("ckpt", [False, True])
def test_8bit_fake_state_without_the_first_update_equals_a_real_first_step(ckpt, monkeypatch, no_gc):
    mcfg = tiny("baseline", 2)
    cfg = TrainConfig(batch_size=2, grad_accum=2, optimizer="adamw8bit", param_dtype="bf16", grad_checkpoint=ckpt)

    def measured() -> tuple:
        step_trace._fake_state.cache_clear()
        step_trace._update_ops.cache_clear()
        _, _, opt = step_trace._fake_state(*step_trace._state_key(mcfg, cfg))
        step_trace._measure(mcfg, cfg, 32, fake=True, record=True)  # one-off lazy setup at a new shape
        run = step_trace._measure(mcfg, cfg, 32, fake=True, record=True)
        return _state(opt), run.level0, run.ops, run.peak, run.optimizer_bytes

    fast = measured()
    assert {k for k, _, _ in fast[0]} >= {"exp_avg_codes", "exp_avg_sq_scale", "exp_avg", "qmap signed=True",
                                       "qmap signed=False"}
    monkeypatch.setattr(step_trace, "_first_step_state", lambda optimizer: optimizer.step())
    stepped = measured()
    assert fast == stepped
