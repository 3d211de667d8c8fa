"""Peak-memory estimate: fake tensors vs real tensors, the deep-model rebuild vs full tracking, sanity trends."""

from __future__ import annotations

import pytest

from model import ModelConfig
from pretrain.plan.fit import step_peak_bytes
from pretrain.plan.instrument_memory import (
    DiagnosticsPass,
    DownstreamPass,
    EvalPass,
    LengthsPass,
    SamplesPass,
    pass_peak_bytes,
    run_passes,
)
from pretrain.plan.memory import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    GiB,
    allowance,
    estimate_pass_memory,
    estimate_step_memory,
)
from pretrain.plan.tiers import TIERS
from pretrain.train.config import TrainConfig

TINY = dict(vocab_size=256)


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **(TINY | kw))


@pytest.mark.parametrize("settings", [
    {},
    {"grad_checkpoint": True},
    {"param_dtype": "bf16", "grad_accum": 2},
    {"amp_dtype": "fp16", "optimizer": "lion"},
])
def test_fake_estimate_within_10_percent_of_real_tensors(settings):
    mcfg, cfg = tiny(), TrainConfig(batch_size=2, **settings)
    fake = estimate_step_memory(mcfg, cfg, 64)
    real = estimate_step_memory(mcfg, cfg, 64, fake=False)
    assert real.tensor_peak_bytes > 0
    assert abs(fake.tensor_peak_bytes - real.tensor_peak_bytes) <= 0.10 * real.tensor_peak_bytes
    assert fake.param_bytes == real.param_bytes and fake.optimizer_bytes == real.optimizer_bytes


@pytest.mark.parametrize("attn,settings", [
    ("baseline", {}),
    ("gqa", {"grad_accum": 2}),
    ("decoupled", {"grad_checkpoint": True}),  # autocast's weight-cast cache grows with depth here
    ("bottleneck", {"param_dtype": "bf16", "grad_checkpoint": True, "grad_accum": 2}),
])
def test_deep_model_rebuilt_from_short_ones_equals_full_tracking(attn, settings):
    mcfg, cfg = tiny(attn=attn, n_layer=6, null_attn=attn == "gqa"), TrainConfig(batch_size=2, **settings)
    rebuilt = estimate_step_memory(mcfg, cfg, 32)
    full = estimate_step_memory(mcfg, cfg, 32, extrapolate=False)
    assert rebuilt.extrapolated and not full.extrapolated
    assert rebuilt.tensor_peak_bytes == full.tensor_peak_bytes
    assert (rebuilt.param_bytes, rebuilt.optimizer_bytes) == (full.param_bytes, full.optimizer_bytes)


def test_memory_grows_with_batch_and_sequence_and_shrinks_with_checkpointing():
    mcfg = tiny()
    base = TrainConfig(batch_size=4)

    def peak(cfg: TrainConfig, seq: int = 128) -> int:
        return estimate_step_memory(mcfg, cfg, seq).tensor_peak_bytes

    def activations(cfg: TrainConfig) -> int:
        est = estimate_step_memory(mcfg, cfg, 128)
        return est.tensor_peak_bytes - est.param_bytes - est.optimizer_bytes

    assert peak(TrainConfig(batch_size=8)) > peak(base)
    assert peak(base, 256) > peak(base, 128)
    assert activations(TrainConfig(batch_size=4, grad_checkpoint=True)) < 0.8 * activations(base)
    # accumulation holds a full set of gradients during the forward pass
    assert peak(TrainConfig(batch_size=4, grad_accum=2)) > peak(base)


def test_1b_estimate_respects_dtype_and_optimizer_and_is_cached():
    mcfg = ModelConfig.from_preset("1b", vocab_size=50257)
    n = mcfg.num_params()
    fp32 = estimate_step_memory(mcfg, TrainConfig(batch_size=1, grad_accum=2), 2048)
    assert fp32.param_bytes == 4 * n and fp32.grad_bytes == 4 * n
    assert 8 * n <= fp32.optimizer_bytes <= 8 * n + 4096  # exp_avg + exp_avg_sq (+ step counters)
    lion = estimate_step_memory(mcfg, TrainConfig(batch_size=1, grad_accum=2, param_dtype="bf16",
                                                  optimizer="lion"), 2048)
    assert lion.param_bytes == 2 * n and 4 * n <= lion.optimizer_bytes < 5 * n  # Lion state stays fp32
    # weights + grads + AdamW state alone are 16 bytes/param; activations of 2048 tokens come on top
    assert 16 * n < fp32.tensor_peak_bytes < 16 * n + 20 * 1024**3
    again = estimate_step_memory(mcfg, TrainConfig(batch_size=1, grad_accum=8), 2048)
    assert again is fp32  # same memory-relevant settings (accumulation only matters as > 1): cached


def test_allowance_is_context_plus_fragmentation():
    assert allowance(10 * 1024**3) == CUDA_CONTEXT_BYTES + int(FRAGMENTATION * 10 * 1024**3)
    assert allowance(0, "cpu") < CUDA_CONTEXT_BYTES


# ------------------------------------------------------------------------------------------------------------
# What the trainer runs beside the step (pretrain/plan/instrument_memory.py), estimated by running its own code.

PASSES = [EvalPass(2, 32), LengthsPass(((16, 4), (32, 2), (128, 1))), DiagnosticsPass(2, 32), SamplesPass(0.8),
          DownstreamPass()]


@pytest.mark.parametrize("work", PASSES, ids=lambda w: type(w).__name__)
def test_pass_estimates_match_real_tensors_and_full_tracking(work):
    cfg = TrainConfig(grad_checkpoint=True)
    mcfg = tiny(n_layer=5, attn="decoupled", null_attn=True, block_size=64)
    fake = estimate_pass_memory(mcfg, cfg, work)
    full = estimate_pass_memory(mcfg, cfg, work, extrapolate=False)
    assert fake.extrapolated and fake.tensor_peak_bytes == full.tensor_peak_bytes
    real = estimate_pass_memory(mcfg, cfg, work, fake=False)
    assert abs(fake.tensor_peak_bytes - real.tensor_peak_bytes) <= 0.10 * real.tensor_peak_bytes
    # a pass starts between steps: weights and optimizer state, no gradients
    assert fake.tensor_peak_bytes > fake.param_bytes + fake.optimizer_bytes


def test_every_pass_of_the_16gb_tier_1b_run_fits_under_its_training_step():
    """The 16 GB tier's planned 1b run (docs/tiers.md: Lion, bf16 weights, checkpointing, micro-batch 2 x 128 at
    seq 2048) with every instrument on: none may need more than the step the plan fits to the card."""
    tier = TIERS["16"]
    mcfg = ModelConfig.from_preset("1b", vocab_size=50257)
    cfg = TrainConfig(size="1b", device="cuda", batch_size=2, grad_accum=128, param_dtype=tier.param_dtype,
                      optimizer=tier.optimizer, grad_checkpoint=tier.grad_checkpoint, analysis_every=200,
                      eval_seq_lens="512,1024,2048,4096", sample_every=200, hellaswag="hf")
    step, _ = step_peak_bytes(mcfg, cfg, 2048, 1)
    passes = run_passes(mcfg, cfg, 2048, 2048)
    assert set(passes) == {"eval", "eval_lengths", "diagnostics", "samples", "downstream"}
    peaks = {name: pass_peak_bytes(mcfg, cfg, work, 1)[0] for name, work in passes.items()}
    assert all(peak <= step for peak in peaks.values()), (step / GiB, {k: v / GiB for k, v in peaks.items()})
    # the diagnostics' gradient pass is the heaviest: a real forward + backward, not a no_grad eval
    assert max(peaks, key=peaks.get) == "diagnostics" and peaks["diagnostics"] > peaks["eval"]
