"""The trainer end to end on CPU: learning, exact resume, signals, fallbacks, precision paths, tracking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, nan_at_step

from model import GPT, ModelConfig
from pretrain.cli import EXIT_STOPPED, UserError
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.loop import train

FAST = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--layers", "2", "--d-ff", "128", "--block", "64",
        "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "1",
        "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--live", "off", "--save-minutes", "0"]


def run(data: Path, out: Path, *flags: str) -> dict:
    cfg = parse_config(["--data", str(data), "--out-dir", str(out), *FAST, *flags])
    return train(cfg)


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["last_loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"}


def test_tiny_model_learns_on_gpt2_tokens(gpt2_data, tmp_path):
    cfg = parse_config(["--data", str(gpt2_data), "--out-dir", str(tmp_path / "r"), "--size", "tiny",
                        "--batch-size", "4", "--train-seq-len", "64", "--steps", "120", "--val-frac", "0.05",
                        "--eval-every", "0", "--eval-iters", "4", "--log-every", "20", "--lr", "3e-3",
                        "--warmup-steps", "10", "--device", "cpu", "--live", "off", "--save-every", "0",
                        "--save-minutes", "0", "--no-amp"])  # learning, not bf16: emulated bf16 is slow on AVX2
    result = train(cfg)
    evals = [e for e in read_jsonl(tmp_path / "r" / "train.jsonl") if e["type"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 120
    assert evals[0]["loss"] > 10.0  # ~ln(50257) at init
    assert result["final_val_loss"] < evals[0]["loss"] - 3.0
    assert (tmp_path / "r" / "summary.md").read_text().count("val") > 0


def test_kill9_then_resume_matches_straight_run(byte_data, tmp_path):
    """N steps straight == N/2 steps, kill -9 somewhere after, resume: same losses, same final weights."""
    steps, half = 24, 12
    common = ["--steps", str(steps), "--grad-accum", "2", "--eval-every", "8", "--save-every", str(half),
              "--keep-last", "5"]
    straight = tmp_path / "straight"
    run(byte_data, straight, *common)

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_v29.py"), "--data", str(byte_data), "--out-dir", str(killed),
           *FAST, *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / f"step_{half}.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / f"step_{half}.pt").exists(), proc.stderr.read().decode()
    result = run(byte_data, killed, *common)  # the same command again resumes
    assert result["step"] == steps

    assert losses(killed) == losses(straight)
    steps_logged = [e["step"] for e in read_jsonl(killed / "train.jsonl") if e["type"] == "train"]
    assert steps_logged == sorted(set(steps_logged)) == list(range(1, steps + 1))
    a = load_checkpoint(straight / "last.pt")["model"]
    b = load_checkpoint(killed / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def test_sigterm_subprocess_exits_75_quickly(byte_data, tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, str(ROOT / "train_v29.py"), "--data", str(byte_data), "--out-dir", str(out), *FAST,
           "--steps", "100000", "--eval-every", "0", "--save-every", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "train.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and '"type": "train"' not in (out / "train.jsonl").read_text():
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_STOPPED, proc.stderr.read().decode()
    assert time.time() - t0 < 30
    state = load_checkpoint(out / "last.pt")
    assert state["step"] >= 1
    events = read_jsonl(out / "train.jsonl")
    assert events[-1]["type"] == "end" and "signal" in events[-1]["status"]


def test_truncated_last_pt_falls_back_to_step_file(byte_data, tmp_path, capfd):
    out = tmp_path / "r"
    run(byte_data, out, "--steps", "6", "--save-every", "3", "--eval-every", "0")
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    result = run(byte_data, out, "--steps", "8", "--save-every", "3", "--eval-every", "0")
    assert result["status"] == "completed" and result["step"] == 8
    assert "last.pt" in capfd.readouterr().err
    steps = [e["step"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"]
    assert steps == list(range(1, 9))  # resumed from step_6.pt, each step once


def test_nan_loss_is_skipped_and_counted(byte_data, tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    out = tmp_path / "r"
    result = run(byte_data, out, "--steps", "6", "--eval-every", "0", "--save-every", "0")
    assert result["status"] == "completed" and result["skipped_steps"] == 1
    state = load_checkpoint(out / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    train_lines = [e for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"]
    assert train_lines[-1]["skipped_steps"] == 1


def test_fp16_autocast_uses_grad_scaler(byte_data, tmp_path):
    out = tmp_path / "r"
    result = run(byte_data, out, "--steps", "4", "--amp-dtype", "fp16", "--eval-every", "0")
    assert result["status"] == "completed"
    state = load_checkpoint(out / "last.pt")
    assert state["scaler"]["scale"] > 0
    assert all(t.dtype == torch.float32 for t in state["model"].values())


def test_bf16_params_train_and_stay_bf16(byte_data, tmp_path):
    out = tmp_path / "r"
    result = run(byte_data, out, "--steps", "30", "--param-dtype", "bf16", "--eval-every", "0")
    state = load_checkpoint(out / "last.pt")
    assert all(t.dtype == torch.bfloat16 for t in state["model"].values())
    evals = [e["loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "eval"]
    assert result["final_val_loss"] < evals[0] - 1.0


def test_compiled_run_saves_plain_loadable_checkpoint(byte_data, tmp_path):
    out = tmp_path / "r"
    run(byte_data, out, "--steps", "2", "--compile", "--eval-every", "0")
    state = load_checkpoint(out / "last.pt")
    assert not any("_orig_mod" in k for k in state["model"])
    model = GPT(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])


def test_fresh_start_into_existing_run_is_refused(byte_data, tmp_path):
    out = tmp_path / "r"
    run(byte_data, out, "--steps", "2", "--eval-every", "0")
    before = (out / "last.pt").read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        run(byte_data, out, "--steps", "2", "--resume", "never")
    with pytest.raises(UserError, match="lr"):
        run(byte_data, out, "--steps", "4", "--lr", "1e-2")
    assert (out / "last.pt").read_bytes() == before
    run(byte_data, out, "--steps", "2", "--resume", "never", "--overwrite")


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_v29.py"), "--data", str(tmp_path / "missing"),
                           "--out-dir", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "missing" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_wandb_offline_file_holds_train_jsonl_losses(byte_data, tmp_path):
    from wandb_records import iter_wandb_records

    out = tmp_path / "r"
    run(byte_data, out, "--steps", "5", "--eval-every", "0", "--wandb", "--wandb-mode", "offline")
    logged = {e["step"]: e["loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"}
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    seen = {}
    for rec in iter_wandb_records(files[0]):
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
        if "train/loss" in items:
            seen[items["_step"]] = items["train/loss"]
    assert seen == pytest.approx(logged)
