"""The planner chooses selective activation checkpointing where a tier needs checkpointing and selective fits (the
fitting execution with the lowest estimated step time), full where selective does not fit; the optimizer pick
assumes the execution that will be used; --checkpoint-policy without --grad-checkpoint is refused in one line.

Cold 1b plans cost 10-30 s each: one plan per tier (module-scoped), read by every assertion on it."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from model import ModelConfig
from pretrain.errors import run_cli
from pretrain.plan import launch
from pretrain.plan.fit import with_micro
from pretrain.plan.memory import estimate_step_memory
from pretrain.plan.view import render_plan
from pretrain.train.config import TrainConfig, parse_config
from pretrain.train.loop import main as train_main

RULE = "derived: the fitting execution with the lowest estimated step time"


def _launch(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = launch.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, dict]:
    """The 1b plan of the 24 and 16 GB tiers (no GPU present), planned once each: what --json prints (launch.main
    prints plan.to_json()) and the text a user reads (render_plan)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for tier in ("24", "16"):
        _, plan = launch.plan_from_argv(["--vram", tier, "--target-tokens", "10B", "--run-root", str(root)])
        shown = io.StringIO()
        render_plan(plan, file=shown)
        out[tier] = {"json": json.loads(json.dumps(plan.to_json(), default=str)), "text": shown.getvalue()}
    return out


@pytest.mark.parametrize("tier", ["24", "16"])
def test_tier_plan_chooses_selective_and_says_why(plans, tier):
    plan = plans[tier]["json"]
    settings = plan["settings"]
    assert settings["grad_checkpoint"]["value"] is True
    assert settings["checkpoint_policy"] == {"value": "selective", "source": settings["checkpoint_policy"]["source"]}
    assert settings["checkpoint_policy"]["source"].startswith(RULE)
    assert plan["estimate"]["checkpoint_policy"] == "selective" and plan["estimate"]["grad_checkpoint_factor"] == 1.0
    assert plan["fits"] and all(p["verdict"] == "fits" for p in plan["phases"])
    assert plan["phases"][-1]["tokens_per_step"] == 256 * 2048  # the same training run as every tier
    cmd = plan["command"]
    assert "--grad-checkpoint" in cmd and cmd[cmd.index("--checkpoint-policy") + 1] == "selective"
    trainer = parse_config(cmd[2:])  # the trainer accepts the command and runs the chosen policy
    assert trainer.grad_checkpoint and trainer.checkpoint_policy == "selective"
    text = plans[tier]["text"]
    assert "checkpoint_policy" in text and RULE in text
    assert "x 1 (selective checkpointing recomputes only elementwise ops)" in text


def test_plan_memory_is_the_fake_tensor_trace_of_the_chosen_policy(plans):
    """The plan's peak is the estimate traced with selective (more than full at the same micro-batch)."""
    plan = plans["24"]["json"]
    cfg = TrainConfig.from_dict({k: v["value"] for k, v in plan["settings"].items()})
    mcfg = ModelConfig.from_dict(plan["model"])
    last = plan["phases"][-1]
    assert last["peak_of"] == "training step"
    step = with_micro(cfg, last["micro_batch"], cfg.batch_size * cfg.grad_accum)
    selective = estimate_step_memory(mcfg, step, last["seq_len"])
    full = estimate_step_memory(mcfg, replace(step, checkpoint_policy="full"), last["seq_len"])
    assert last["tensor_peak_bytes"] == selective.tensor_peak_bytes
    assert selective.tensor_peak_bytes > full.tensor_peak_bytes


def test_full_checkpointing_where_selective_does_not_fit(tmp_path):
    """Lion keeps 4 bytes of state per parameter (AdamW 8-bit ~2): on 16 GB the 1b step then fits at seq 2048 with
    full checkpointing but not with selective, even at micro-batch 1."""
    code, text = _launch(["--vram", "16", "--optimizer", "lion", "--seq-schedule", "2048@0", "--steps", "10",
                          "--run-root", str(tmp_path), "--json"])
    assert code == 0
    plan = json.loads(text)
    settings = plan["settings"]
    assert settings["grad_checkpoint"]["value"] is True and settings["checkpoint_policy"]["value"] == "full"
    assert settings["checkpoint_policy"]["source"].startswith("derived: selective does not fit (seq 2048, even at "
                                                              "micro-batch 1)")
    assert plan["estimate"]["checkpoint_policy"] == "full" and plan["estimate"]["grad_checkpoint_factor"] == 0.75
    assert plan["fits"] and "--checkpoint-policy" not in plan["command"]


def test_optimizer_pick_assumes_the_execution_that_will_be_used(tmp_path):
    """--no-grad-checkpoint on 16 GB: AdamW fits only with checkpointing, so the pick is AdamW 8-bit (which fits
    without), not AdamW planned as "won't fit"."""
    code, text = _launch(["--vram", "16", "--n-layer", "16", "--no-grad-checkpoint", "--seq-schedule", "2048@0",
                          "--steps", "10", "--run-root", str(tmp_path), "--json"])
    assert code == 0
    plan = json.loads(text)
    optimizer = plan["settings"]["optimizer"]
    assert optimizer["value"] == "adamw8bit", optimizer
    assert "at micro-batch 1 with no checkpointing" in optimizer["source"] and "adamw does not" in optimizer["source"]
    assert plan["fits"] and plan["settings"]["grad_checkpoint"]["value"] is False


POLICY_ERROR = ("error: --checkpoint-policy selective needs --grad-checkpoint (it says what checkpointing "
                "recomputes): add --grad-checkpoint, or drop --checkpoint-policy")


def test_trainer_refuses_policy_without_checkpointing(byte_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli(train_main, ["--data", str(byte_data), "--out-dir", str(out), "--size", "tiny", "--steps", "1",
                                "--device", "cpu", "--val-frac", "0.05", "--checkpoint-policy", "selective"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [POLICY_ERROR]
    assert not out.exists()


@pytest.mark.parametrize("vram", ["80", "24"])  # 24: the tier's checkpointing is the planner's, it may turn it off
def test_launcher_refuses_policy_without_checkpointing(vram, tmp_path, capsys, untraced_plan_memory):
    argv = ["--vram", vram, "--size", "tiny", "--steps", "2", "--run-root", str(tmp_path / "runs"),
            "--checkpoint-policy", "selective"]
    assert run_cli(launch.main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [POLICY_ERROR]
    assert not Path(tmp_path / "runs").exists()
    assert run_cli(launch.main, [*argv, "--grad-checkpoint", "--json"]) == 0  # with it: honoured
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["checkpoint_policy"] == {"value": "selective", "source": "flag"}
