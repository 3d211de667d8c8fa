"""The planner's execution choices through the launcher: every GPU tier's default 1b plan fits, checkpointing only
when needed, the largest micro-batch per phase, Lion on 16 GB and per-size LRs with their sources, and `--run`
refusing a plan estimated not to fit unless --force."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from model import ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.errors import run_cli
from pretrain.plan import launch
from pretrain.plan.fit import FITS, choose_execution, step_peak_bytes, with_micro
from pretrain.plan.tiers import GLOBAL_BATCH
from pretrain.train.config import TrainConfig, parse_config
from pretrain.train.optim import PEAK_LR, peak_lr

VARIANTS = tuple(ATTENTION_VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tier", ["80", "48", "40", "24", "16"])
def test_every_gpu_tiers_default_1b_plan_fits_every_variant(tier, variant, tmp_path, capsys):
    # One plan per test: a 24 GB plan takes minutes on a loaded 2-core box (pytest-timeout is 600 s per test).
    assert launch.main(["--vram", tier, "--variant", variant, "--json", "--run-root", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    verdicts = [(ph["seq_len"], ph["micro_batch"], round(ph["peak_memory_bytes"] / 2**30, 1), ph["verdict"])
                for ph in out["phases"]]
    assert out["fits"] and all(v[-1] == "fits" for v in verdicts), (tier, variant, verdicts)
    phases = out["phases"]
    for ph in phases:  # same tokens per step on every tier; accumulation makes up the micro-batch
        assert ph["micro_batch"] * ph["grad_accum"] == GLOBAL_BATCH
        assert ph["tokens_per_step"] == GLOBAL_BATCH * ph["seq_len"]
    micro = [ph["micro_batch"] for ph in phases]
    assert micro == sorted(micro, reverse=True)  # shorter sequences never get a smaller micro-batch
    for ph in phases:  # the eval and the diagnostics (on by default) never need more than the step beside them
        assert ph["peak_of"] == "training step" and set(ph["peaks"]) == {"training step", "eval", "diagnostics"}, \
            (tier, variant, ph["peaks"])
    s = out["settings"]
    opt = "adamw8bit" if tier == "16" else "adamw"  # 16 GB: the first that fits of adamw, adamw8bit, lion
    assert s["optimizer"]["value"] == opt and s["lr"]["value"] == PEAK_LR[("1b", opt)][0]
    assert PEAK_LR[("1b", opt)][1] in s["lr"]["source"]
    if tier == "16":
        assert "took adamw8bit" in s["optimizer"]["source"] and "adamw does not" in s["optimizer"]["source"]
    assert s["grad_checkpoint"]["source"].startswith("derived: o")
    assert "PaLM" in out["estimate"]["mfu_source"] and out["estimate"]["assumed_mfu"] == 0.4
    cfg = parse_config(out["command"][2:])  # the trainer runs the planned split
    assert cfg.micro_batch_schedule == ("" if len(set(micro)) == 1 else cfg.micro_batch_schedule)
    assert peak_lr(cfg) == PEAK_LR[("1b", opt)][0]


def _fit_model() -> tuple[ModelConfig, TrainConfig]:
    mcfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=64, n_head=4, n_layer=2, d_ff=128, block_size=256)
    return mcfg, TrainConfig(size="tiny", batch_size=1, grad_accum=16, device="cpu", amp=False)


def _peak(mcfg, cfg, micro, seq, ckpt=False):
    return step_peak_bytes(mcfg, with_micro(replace(cfg, grad_checkpoint=ckpt), micro, 16), seq, 1)[0]


def test_largest_micro_batch_per_phase_and_checkpointing_only_when_needed():
    mcfg, cfg = _fit_model()
    # A device where micro-batch 4 fits at seq 256 without checkpointing but 8 does not.
    cap = int((_peak(mcfg, cfg, 4, 256) + _peak(mcfg, cfg, 8, 256)) / 2 / FITS)
    choice = choose_execution(mcfg, cfg, [64, 128, 256], cap, 1, 16, guess=1, checkpoint=None, micro=None)
    assert choice is not None and not choice.grad_checkpoint and choice.why_checkpoint.startswith("derived: off")
    assert choice.micro[256] == 4
    for seq in (64, 128):  # shorter phases: larger micro-batches, each the largest that fits
        b = choice.micro[seq]
        assert b > 4 and _peak(mcfg, cfg, b, seq) <= FITS * cap
        assert b == 16 or _peak(mcfg, cfg, 2 * b, seq) > FITS * cap
    # A device where even micro-batch 1 needs checkpointing at seq 256.
    cap = int((_peak(mcfg, cfg, 1, 256) + _peak(mcfg, cfg, 1, 256, ckpt=True)) / 2 / FITS)
    choice = choose_execution(mcfg, cfg, [128, 256], cap, 1, 16, guess=4, checkpoint=None, micro=None)
    assert choice is not None and choice.grad_checkpoint and choice.why_checkpoint.startswith("derived: on")
    # Checkpointing given: honoured; nothing fits: None (the plan then shows "won't fit" and a fix).
    assert choose_execution(mcfg, cfg, [256], cap, 1, 16, 4, checkpoint=False, micro=None) is None


BIG = ["--vram", "16", "--size", "tiny", "--d-model", "4096", "--n-head", "32", "--d-ff", "16384",
       "--block-size", "1024", "--steps", "5", "--seq-schedule", "1024@0", "--param-dtype", "fp32",
       "--no-grad-checkpoint", "--batch-size", "32", "--val-frac", "0.05", "--optimizer", "adamw"]


def test_run_refuses_a_plan_that_does_not_fit_unless_force(tmp_path, byte_data, capsys, monkeypatch):
    ran: list[list[str]] = []
    monkeypatch.setattr(launch, "run_trainer", lambda command: ran.append(command) or 0)
    argv = [*BIG, "--data", str(byte_data), "--run-root", str(tmp_path / "runs"), "--run"]
    assert run_cli(launch.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the plan does not fit") and "--force" in err[0]
    fix = re.search(r"apply the fix it shows \(--batch-size (\d+) --grad-accum (\d+)", err[0])
    assert fix and int(fix[1]) * int(fix[2]) == GLOBAL_BATCH, err[0]  # the plan's fix: a smaller micro-batch
    assert not ran and not (tmp_path / "runs").exists()
    assert run_cli(launch.main, [*argv, "--force"]) == 0
    assert len(ran) == 1 and "--batch-size" in ran[0]


def test_ddp_gradient_buckets_are_counted_where_they_add_memory():
    """DDP allocates its gradient buckets when it wraps the model and keeps them (the gradients are views into
    them): without accumulation that is a gradient's worth more than a single process holds during the forward;
    with accumulation the gradients were held anyway; FSDP has no such buckets."""
    mcfg, cfg = _fit_model()
    no_accum, accum = with_micro(cfg, 16, 16), with_micro(cfg, 8, 16)
    single, est = step_peak_bytes(mcfg, no_accum, 256, 1)
    ddp, ddp_est = step_peak_bytes(mcfg, no_accum, 256, 2)
    assert ddp_est.breakdown.get("grads") == est.grad_bytes and ddp > single
    assert step_peak_bytes(mcfg, accum, 256, 2)[0] == step_peak_bytes(mcfg, accum, 256, 1)[0]  # cpu: no NCCL
    assert step_peak_bytes(mcfg, replace(no_accum, fsdp=True), 256, 2)[0] == single


def test_ddp_plan_without_accumulation_shows_the_buckets(tmp_path, capsys):
    # 8 processes on the 80 GB tier: 32 sequences each, one micro-batch, no accumulation in any phase.
    assert launch.main(["--vram", "80", "--nproc", "8", "--size", "tiny", "--json", "--run-root", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [ph["grad_accum"] for ph in out["phases"]] == [1, 1, 1]
    for ph in out["phases"]:
        assert ph["breakdown"]["grads"] == 4 * out["params"], ph["breakdown"]  # fp32 buckets, before the forward


def test_plan_peak_is_the_largest_pass_and_names_it(tmp_path, capsys):
    # A narrow model on long sequences with many heads: the diagnostics' explicit-softmax pass ((rows, heads, T, T)
    # fp32 scores) outweighs the training step; the plan's peak and verdict are theirs, and it says so.
    argv = ["--vram", "cpu", "--size", "tiny", "--d-model", "128", "--n-head", "16", "--n-layer", "2", "--d-ff", "256",
            "--block-size", "1024", "--seq-schedule", "1024@0", "--batch-size", "2", "--grad-accum", "8",
            "--steps", "5", "--no-amp", "--vocab-size", "256", "--run-root", str(tmp_path)]
    assert launch.main([*argv, "--analysis-every", "5", "--json"]) == 0
    phase = json.loads(capsys.readouterr().out)["phases"][0]
    assert phase["peak_of"] == "diagnostics" and set(phase["peaks"]) == {"training step", "eval", "diagnostics"}
    assert phase["peak_memory_bytes"] == phase["peaks"]["diagnostics"] > phase["peaks"]["training step"]
    assert launch.main([*argv, "--analysis-every", "5"]) == 0
    assert "memory: estimated peak of the diagnostics pass" in capsys.readouterr().out
    assert launch.main([*argv, "--analysis-every", "0", "--json"]) == 0
    phase = json.loads(capsys.readouterr().out)["phases"][0]
    assert phase["peak_of"] == "training step" and set(phase["peaks"]) == {"training step", "eval"}
