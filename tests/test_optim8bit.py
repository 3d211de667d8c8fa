"""--optimizer adamw8bit (issue 22.6): 8-bit AdamW state resumes bit-identical, the planner counts its state bytes
as the real optimizer holds them, a missing torchao is refused in one line, and the 16 GB tier picks its
optimizer by what fits and says why."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from test_chaos import assert_same
from test_track_trust import FAST, events, sigterm_at_batch, trainer

import pretrain.plan.launch as launch
from model import ModelConfig
from pretrain.errors import EXIT_STOPPED, run_cli
from pretrain.plan.memory import estimate_step_memory
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import model_config_from, parse_config
from pretrain.train.loop import main

pytest.importorskip("torchao")
EIGHT_BIT = ["--optimizer", "adamw8bit", "--eval-every", "0", "--save-every", "3"]


def state_bytes(optimizer_state: dict) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer_state["state"].values() for t in st.values()
               if torch.is_tensor(t))


def test_adamw8bit_with_bf16_weights_stops_and_resumes_bit_identical(byte_data, tmp_path, monkeypatch):
    """Stopped inside step 5 (saved at step 4), resumed to step 8: weights, 8-bit moments and their scales,
    and the stochastic-rounding generator equal an uninterrupted run's, bit for bit."""
    flags = [*EIGHT_BIT, "--param-dtype", "bf16", "--steps", "8"]
    assert trainer(byte_data, tmp_path / "straight", *flags) == 0
    out = tmp_path / "stopped"
    sigterm_at_batch(monkeypatch, 5)
    assert trainer(byte_data, out, *flags) == EXIT_STOPPED
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["step"] < 8
    assert trainer(byte_data, out, *flags) == 0
    assert events(out, "resume")
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(out / "last.pt")
    for key in ("model", "optimizer", "rounding_rng"):
        assert_same(a[key], b[key], key)
    dtypes = {k: t.dtype for st in b["optimizer"]["state"].values() for k, t in st.items()}
    assert dtypes["exp_avg_codes"] == dtypes["exp_avg_sq_codes"] == torch.uint8  # the state really is 8-bit
    assert {e["step"]: e["last_loss"] for e in events(out, "train")} == {
        e["step"]: e["last_loss"] for e in events(tmp_path / "straight", "train")}


def test_plan_counts_the_state_bytes_the_real_adamw8bit_holds(byte_data, tmp_path):
    """The planner's fake-tensor estimate builds the trainer's optimizer: its state bytes equal what a real
    run's checkpoint holds, and are about a quarter of AdamW's (1 byte per moment + a scale per 256 values)."""
    from torchao.optim import subclass_8bit

    # The planner may be the first to build the optimizer in a process (its quantization maps not cached yet).
    subclass_8bit.get_qmap_signed.cache_clear()
    subclass_8bit.get_qmap_unsigned.cache_clear()
    cfg = parse_config(["--data", str(byte_data), *FAST, "--optimizer", "adamw8bit"])
    mcfg = model_config_from(cfg, 256)
    est = estimate_step_memory(mcfg, cfg, 32)
    out = tmp_path / "r"
    assert trainer(byte_data, out, *EIGHT_BIT, "--steps", "1") == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ModelConfig.from_dict(ckpt["model_config"]) == mcfg
    real = state_bytes(ckpt["optimizer"])
    n_params = mcfg.num_params()
    assert est.optimizer_bytes == real
    adamw = estimate_step_memory(mcfg, parse_config(["--data", str(byte_data), *FAST, "--optimizer", "adamw"]), 32)
    assert adamw.optimizer_bytes > 3 * real
    assert real < 2.5 * n_params  # ~2 bytes per parameter (small tensors keep fp32 moments)


def test_adamw8bit_without_torchao_is_refused_in_one_line(byte_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # importlib finds no torchao
    out = tmp_path / "r"
    assert run_cli(main, ["--data", str(byte_data), "--out-dir", str(out), *FAST, *EIGHT_BIT, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install torchao" in err[0] and "adamw8bit" in err[0]
    assert not Path(out / "last.pt").exists()


PLAN_16 = ["--vram", "16", "--batch-size", "1", "--grad-accum", "1", "--train-seq-len", "64", "--steps", "1"]


def test_16gb_tier_takes_the_first_optimizer_that_fits_and_says_why(tmp_path, capsys):
    """1b on 16 GB: AdamW's 12 bytes per parameter do not fit, 8-bit AdamW does: the plan takes it, with AdamW's
    LR, and its settings line names what fits and what it took. A 124M model fits with AdamW: AdamW. A flag wins."""
    assert launch.main([*PLAN_16, "--run-root", str(tmp_path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    settings = plan["settings"]
    assert settings["optimizer"]["value"] == "adamw8bit" and plan["fits"]
    # The source is the settings table's line for the optimizer (view.py prints the same string).
    assert re.fullmatch(r"tier 16: fits [\d.]+ GiB at micro-batch 1 with full checkpointing: adamw8bit, lion; adamw "
                        r"does not \(est\. [\d.]+ GiB\); took adamw8bit \(order: adamw, adamw8bit, lion\)",
                        settings["optimizer"]["source"]), settings["optimizer"]["source"]
    assert settings["lr"]["value"] == 3e-4 and settings["beta2"]["value"] == 0.95
    assert plan["command"][plan["command"].index("--optimizer") + 1] == "adamw8bit"

    assert launch.main([*PLAN_16, "--size", "small", "--run-root", str(tmp_path), "--json"]) == 0
    small = json.loads(capsys.readouterr().out)["settings"]
    assert small["optimizer"]["value"] == "adamw"
    assert "adamw, adamw8bit, lion; took adamw" in small["optimizer"]["source"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torchao", None)  # not installed: the 8-bit entry is skipped, and the line says so
        assert launch.main([*PLAN_16, "--size", "small", "--run-root", str(tmp_path), "--json"]) == 0
    assert "adamw8bit needs torchao (not installed)" in json.loads(capsys.readouterr().out)["settings"][
        "optimizer"]["source"]

    assert launch.main([*PLAN_16, "--size", "small", "--optimizer", "lion", "--run-root", str(tmp_path), "--json"]) == 0
    given = json.loads(capsys.readouterr().out)["settings"]["optimizer"]
    assert given == {"value": "lion", "source": "flag"}
