"""The plan's fast memory estimate (issue 20.8): a recorded step reuses its update's timeline, tracked once per
model and optimizer settings (pretrain/plan/memory.py `_update_ops`), and must equal tracking the whole step."""

from __future__ import annotations

import pytest

from model import ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.plan import memory
from pretrain.train.config import TrainConfig


def tiny(attn: str, n_layer: int) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=256, attn=attn, n_layer=n_layer)


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("attn", list(ATTENTION_VARIANTS))
def test_step_with_reused_update_records_the_same_timeline_as_the_whole_step(attn, ckpt, optimizer, no_gc):
    mcfg = tiny(attn, 1)
    # Two micro-batches and two lengths per variant and checkpointing, one per optimizer (the suite stays short).
    for micro, accum, seq_len in [(1, 1, 16)] if optimizer == "adamw" else [(2, 2, 32)]:
        cfg = TrainConfig(batch_size=micro, grad_accum=accum, grad_checkpoint=ckpt, optimizer=optimizer)
        # A step at a shape the fake state has not run yet also records one-off lazy setup: compare later ones.
        memory._measure(mcfg, cfg, seq_len, fake=True, record=True, reuse_update=False)
        fast = memory._measure(mcfg, cfg, seq_len, fake=True, record=True)
        whole = memory._measure(mcfg, cfg, seq_len, fake=True, record=True, reuse_update=False)
        assert fast.ops == whole.ops and fast.level0 == whole.level0
        assert fast.peak == whole.peak
        assert (fast.param_bytes, fast.optimizer_bytes) == (whole.param_bytes, whole.optimizer_bytes)


def test_fast_deep_estimate_equals_tracking_every_block_of_the_whole_step():
    mcfg = tiny("bottleneck", 6)
    cfg = TrainConfig(optimizer="lion", grad_checkpoint=True, batch_size=2, param_dtype="bf16", grad_accum=2)
    fast = memory.estimate_step_memory(mcfg, cfg, 32)
    full = memory.estimate_step_memory(mcfg, cfg, 32, extrapolate=False)
    assert fast.extrapolated and fast.tensor_peak_bytes == full.tensor_peak_bytes


def test_search_gives_up_after_the_smallest_micro_batch_fails_and_finds_the_same_one_otherwise(monkeypatch):
    """A tier that needs checkpointing first tries without it: when the guess does not fit, the smallest
    micro-batch is estimated before the ones in between, and when it does not fit either the search stops
    (memory grows with the micro-batch). Where something fits, the answer is the linear walk's."""
    from pretrain.plan import fit

    def search(limit: int) -> tuple[int | None, list[int]]:
        seen: list[int] = []

        def peak(mcfg, cfg, seq_len, nproc):  # monotone in the micro-batch, as real estimates are
            seen.append(cfg.batch_size)
            return cfg.batch_size * fit.GiB, None

        monkeypatch.setattr(fit, "step_peak_bytes", peak)
        capacity = int((limit + 0.5) * fit.GiB / fit.FITS)  # fits: micro-batches up to `limit`
        got = fit.largest_fitting(tiny("baseline", 1), TrainConfig(), 64, capacity, 1, 32, guess=16)
        return got, seen

    assert search(0) == (None, [16, 8, 1])  # the walk estimated 16, 8, 4, 2, 1
    for limit, want in [(12, 8), (6, 4), (3, 2), (1, 1)]:
        got, seen = search(limit)
        assert got == want and len(set(seen)) == len(seen)
