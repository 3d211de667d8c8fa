"""--optimizer adamw8bit (issue 22.6): 8-bit AdamW state resumes bit-identical, the planner counts its state bytes
as the real optimizer holds them, and a missing torchao is refused in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_chaos import assert_same
from test_track_trust import FAST, events, sigterm_at_batch, trainer

from model import ModelConfig
from pretrain.cli import EXIT_STOPPED, run_cli
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
    n_params = sum(t.numel() for t in ckpt["model"].values())
    assert est.optimizer_bytes == real
    adamw = estimate_step_memory(mcfg, parse_config(["--data", str(byte_data), *FAST, "--optimizer", "adamw"]), 32)
    assert adamw.optimizer_bytes > 3 * real
    assert real < 3 * n_params  # ~2 bytes per parameter (small tensors keep fp32 moments)


def test_adamw8bit_without_torchao_is_refused_in_one_line(byte_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # importlib finds no torchao
    out = tmp_path / "r"
    assert run_cli(main, ["--data", str(byte_data), "--out-dir", str(out), *FAST, *EIGHT_BIT, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install torchao" in err[0] and "adamw8bit" in err[0]
    assert not Path(out / "last.pt").exists()
