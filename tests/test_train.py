"""The trainer end to end on CPU: a stop inside accumulation, bf16 weights learn and stay bf16.

Elsewhere: kill -9, SIGTERM and damaged checkpoints in test_chaos.py; NaN steps and precision paths in
test_precision.py; refused fresh starts and resumes in test_bad_input.py; learning on GPT-2 tokens in
test_demo.py (the demo run) and test_notebook.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.loop import train

FAST = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
        "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "1",
        "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--live", "off", "--save-minutes", "0"]


def run(data: Path, out: Path, *flags: str) -> dict:
    cfg = parse_config(["--data", str(data), "--out-dir", str(out), *FAST, *flags])
    return train(cfg)


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["last_loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"}


def test_sigterm_inside_accumulation_saves_last_full_step(byte_data, tmp_path, monkeypatch):
    from pretrain.data import loader as data_mod

    calls = {"n": 0, "after_signal": 0}
    original = data_mod.Prefetcher.next

    def next_and_signal(self, batch_size, seq_len):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 2:  # second micro-batch of step 3 (grad_accum 4)
            os.kill(os.getpid(), signal.SIGTERM)
        elif calls["n"] > 10:
            calls["after_signal"] += 1
        return original(self, batch_size, seq_len)

    monkeypatch.setattr(data_mod.Prefetcher, "next", next_and_signal)
    out = tmp_path / "r"
    result = run(byte_data, out, "--steps", "50", "--grad-accum", "4", "--eval-every", "0", "--save-every", "0")
    assert result["status"].startswith("stopped by signal")
    assert calls["after_signal"] == 0  # stopped inside the accumulation loop, without finishing the step
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 2
    monkeypatch.setattr(data_mod.Prefetcher, "next", original)
    # Resuming replays step 3 from its first micro-batch and finishes.
    resumed = run(byte_data, out, "--steps", "4", "--grad-accum", "4", "--eval-every", "0", "--save-every", "0")
    assert resumed["status"] == "completed" and resumed["step"] == 4


def test_bf16_params_train_and_stay_bf16(byte_data, tmp_path):
    out = tmp_path / "r"
    result = run(byte_data, out, "--steps", "30", "--param-dtype", "bf16", "--eval-every", "0")
    state = load_checkpoint(out / "last.pt")
    assert all(t.dtype == torch.bfloat16 for t in state["model"].values())
    evals = [e["loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "eval"]
    assert result["final_val_loss"] < evals[0] - 1.0
