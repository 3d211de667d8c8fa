"""--bf16-weight-cache (pretrain/train/weight_cache.py): the block weights cast once per optimizer step give the same
losses and weights as autocast's cast per micro-batch, with and without checkpointing and across a resume; the
casts really happen once; the flag is refused where there is nothing to cache; the memory estimate counts it and
the planner turns it on where a step has several micro-batches and memory allows. Under --compile (one block graph
for every step's micro-batches): tests/test_compiled_loss.py's trainer run; bench/train_step.py --floor --grad-accum
timing it beside plain bf16: tests/test_bench_ref.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, cli_exit
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, ModelConfig
from pretrain.plan.memory import estimate_step_memory
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import TrainConfig, parse_config
from pretrain.train.loop import main as train_main
from pretrain.train.loop import train
from pretrain.train.weight_cache import cached_linears, cached_params, weights_cast_once

FAST = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
        "--batch-size", "2", "--grad-accum", "3", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "1",
        "--log-every", "1", "--warmup-steps", "1", "--lr", "3e-3", "--device", "cpu", "--live", "off",
        "--save-minutes", "0", "--eval-every", "0"]


def run(data: Path, out: Path, *flags: str) -> dict:
    return train(parse_config(["--data", str(data), "--out-dir", str(out), *FAST, *flags]))


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"]


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b) and len(losses(a)) >= 3
    wa, wb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]


@pytest.mark.parametrize("ckpt", [[], ["--grad-checkpoint"], ["--grad-checkpoint", "--checkpoint-policy", "selective"]],
                         ids=["no-ckpt", "full", "selective"])
def test_same_losses_and_weights_as_a_cast_per_micro_batch(byte_data, tmp_path, ckpt):
    """Three steps of three micro-batches: every logged loss and every weight after the last update bit-identical;
    the run's config records the flag."""
    run(byte_data, tmp_path / "plain", "--steps", "3", *ckpt)
    run(byte_data, tmp_path / "cached", "--steps", "3", "--bf16-weight-cache", *ckpt)
    assert_same_run(tmp_path / "plain", tmp_path / "cached")
    assert load_checkpoint(tmp_path / "cached" / "last.pt")["train_config"]["bf16_weight_cache"] is True
    assert "bf16_weight_cache = true" in (tmp_path / "cached" / "config.toml").read_text()


def test_resume_with_the_cache_equals_an_uninterrupted_run(byte_data, tmp_path):
    """Two steps without the cache, resumed for two more with it (the flag may change on resume), equal four
    uninterrupted steps with it."""
    same_lr = ["--lr-schedule", "constant", "--save-every", "2"]  # a longer resumed run keeps the same LRs
    run(byte_data, tmp_path / "straight", "--steps", "4", "--bf16-weight-cache", *same_lr)
    run(byte_data, tmp_path / "resumed", "--steps", "2", *same_lr)
    result = run(byte_data, tmp_path / "resumed", "--steps", "4", "--bf16-weight-cache", *same_lr)
    assert result["status"] == "completed"
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


class WeightCasts(TorchDispatchMode):
    """Counts casts of tensors shaped like one of `shapes` (the block weights) to bf16."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.shapes \
                and kwargs.get("dtype") == torch.bfloat16:
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_block_weight_is_cast_once_per_step(checkpointing):
    """Autocast casts every block weight per micro-batch (and again in a checkpointed recompute); the cache once."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=48)).train()
    model.grad_checkpoint = checkpointing
    linears = cached_linears(model)
    assert len(linears) == 2 * 4 and all("lm_head" not in repr(m) for m in linears)  # qkv, o, gate_up, down
    shapes = {tuple(m.weight.shape) for m in linears}
    x = torch.randint(0, 64, (2, 8))

    def casts(dtype: torch.dtype | None, accum: int = 3) -> int:
        with WeightCasts(shapes) as counter, weights_cast_once(model, dtype):
            for _ in range(accum):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(x, x)
                loss.backward()
        return counter.count

    per_forward = len(linears) * (2 if checkpointing else 1)
    assert casts(None) == 3 * per_forward
    assert casts(torch.bfloat16) == len(linears)
    assert all(p.dtype == torch.float32 and p.is_leaf for p in model.parameters())  # put back after the step


@pytest.mark.parametrize("flags,why", [(["--no-amp"], "no autocast"), (["--param-dtype", "bf16"], "bf16 already")])
def test_flag_refused_where_there_is_nothing_to_cache(byte_data, tmp_path, capsys, flags, why):
    out = tmp_path / "r"
    code = cli_exit(train_main, ["--data", str(byte_data), "--out-dir", str(out), *TINY_TRAIN, "--steps", "1",
                                 "--bf16-weight-cache", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--bf16-weight-cache" in err[0] and why in err[0]
    assert not out.exists()


def test_memory_estimate_counts_the_cast_weights():
    """With checkpointing a block's cast weights are otherwise freed after its forward: the cache holds them all, at
    most 2 bytes per cached parameter more; the fake-tensor estimate equals a real run's."""
    cfg = TrainConfig(size="tiny", batch_size=2, grad_accum=2, grad_checkpoint=True)
    mcfg = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=128, d_ff=256)
    with torch.device("meta"):
        extra = 2 * cached_params(GPT(mcfg))
    plain = estimate_step_memory(mcfg, cfg, 64, extrapolate=False)
    cached = estimate_step_memory(mcfg, TrainConfig(**{**cfg.to_dict(), "bf16_weight_cache": True}), 64,
                                  extrapolate=False)
    assert plain.tensor_peak_bytes < cached.tensor_peak_bytes <= plain.tensor_peak_bytes + extra
    real = estimate_step_memory(mcfg, TrainConfig(**{**cfg.to_dict(), "bf16_weight_cache": True}), 64, fake=False)
    assert real.tensor_peak_bytes == cached.tensor_peak_bytes


def test_planner_turns_it_on_with_accumulation_and_a_flag_keeps_it_off(tmp_path):
    """The A100 40 GB tier (fp32 weights, 1b at micro-batch 1-4 with accumulation) gets it, as a derived setting in
    the trainer command; --no-bf16-weight-cache keeps it off."""
    from pretrain.plan.launch import plan_from_argv

    args = ["--vram", "40", "--target-tokens", "10B", "--run-root", str(tmp_path)]
    _, plan = plan_from_argv(args, gpu=None)
    assert plan.cfg.grad_accum > 1 and plan.cfg.bf16_weight_cache
    assert "--bf16-weight-cache" in plan.command
    assert str(plan.resolved.sources["bf16_weight_cache"]).startswith("derived: on")
    _, plan = plan_from_argv([*args, "--no-bf16-weight-cache"], gpu=None)
    assert not plan.cfg.bf16_weight_cache and "--bf16-weight-cache" not in plan.command
