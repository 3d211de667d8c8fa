"""--eval-seq-lens measures length, not text: every length scores the same target tokens (the longest windows,
context cut to each length), the per-position curve is binned to be readable, the "trained" length is the one
trained so far, and the plan counts the eval's time."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import plots_unrendered

from pretrain.data.dataset import open_dataset
from pretrain.data.loader import ValWindows
from pretrain.evals.lengths import token_losses
from pretrain.evals.run_model import load_run_model
from pretrain.plan import launch
from pretrain.plan.view import render_plan
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import parse_config
from pretrain.train.loop import train

TINY = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "96", "--block-size", "64",
        "--batch-size", "4", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "2", "--no-amp",
        "--warmup-steps", "1", "--lr", "3e-3", "--device", "cpu", "--live", "off", "--save-minutes", "0",
        "--steps", "4", "--eval-every", "2", "--seq-schedule", "16@0,32@2"]
LENGTHS = [16, 32, 128]  # 128: past the block, RoPE extrapolation


@pytest.fixture(scope="module")
def run(byte_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lengths") / "r"
    with pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # read here: train.jsonl and the checkpoint
        train(parse_config(["--data", str(byte_data), "--out-dir", str(out), *TINY,
                            "--eval-seq-lens", ",".join(map(str, LENGTHS))]))
    return out


def _events(run: Path) -> list[dict]:
    return [e for e in read_jsonl(run / "train.jsonl") if e["type"] == "eval_lengths"]


def test_every_length_scores_the_same_targets_with_its_context_cut(run, byte_data):
    """Recompute from the final checkpoint: the longest windows, each target scored from the start of its n-token
    piece, give the recorded loss at every length."""
    last = _events(run)[-1]
    model, _, _ = load_run_model(run, "last", torch.device("cpu"))
    ds = open_dataset(str(byte_data), 0.05, vocab_size=256)
    windows = ValWindows(ds, 128, 4 * 32 // 128 or 1, 2)  # the trainer's: ~batch x eval length tokens a batch
    with torch.no_grad():
        for n in LENGTHS:
            losses = [token_losses(model, x[:, i:i + n], y[:, i:i + n]) for x, y in windows for i in range(0, 128, n)]
            expected = torch.cat([t.flatten() for t in losses]).mean().item()
            assert last["loss"][str(n)] == pytest.approx(expected, abs=1e-4), n
    assert last["targets"] == sum(y.numel() for _, y in windows)
    assert all(v is None or v > 0 for v in last["loss_se"].values())


def test_position_curve_bins_hold_enough_tokens_and_no_lone_last_bucket(run):
    pos = _events(run)[-1]["position"]
    assert pos["seq_len"] == 128 and len(pos["x"]) == len(pos["loss"]) == len(pos["se"]) == len(pos["tokens"])
    assert len(pos["x"]) >= 8 and sum(pos["tokens"]) == 128 * 2  # 1 window a batch x 2 batches, all positions
    assert min(pos["tokens"]) >= 2 * 16 * 0.5  # a bin is >= 16 positions wide here (8 bins of 128)
    assert list(pos["buckets"]) == ["pos_0", "pos_1", "pos_3", "pos_7", "pos_15", "pos_31", "pos_63"]


def test_trained_length_is_the_one_trained_so_far(run):
    assert [(e["step"], e["trained_len"]) for e in _events(run)] == [(0, 16), (2, 16), (4, 32)]
    assert "trained so far on sequences of up to 32 tokens" in (run / "summary.md").read_text()


def test_plan_counts_the_length_evals_time(capsys):
    argv = ["--vram", "cpu", "--size", "tiny", "--block-size", "64", "--steps", "10", "--eval-every", "5"]
    with tempfile.TemporaryDirectory() as root:
        _, plain = launch.plan_from_argv([*argv, "--run-root", root], gpu=None)
        _, with_lengths = launch.plan_from_argv([*argv, "--eval-seq-lens", "16,64,256", "--run-root", root], gpu=None)
    assert plain.eval_lengths_seconds == 0 and with_lengths.eval_lengths_seconds > 0
    assert with_lengths.to_json()["estimate"]["eval_lengths_seconds"] == with_lengths.eval_lengths_seconds
    text = io.StringIO()
    render_plan(with_lengths, file=text)
    assert "+ --eval-seq-lens: ESTIMATE" in text.getvalue() and "in all" in text.getvalue()
