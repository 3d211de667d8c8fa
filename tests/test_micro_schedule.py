"""--micro-batch-schedule through the trainer: the same sequences per step whatever the split, an exact resume
across a change of micro-batch, one-line errors for a split that does not divide the step."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.errors import run_cli
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import parse_config
from pretrain.train.loop import main as train_main
from pretrain.train.loop import train

FAST = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--d-ff", "64", "--block-size", "64",
        "--batch-size", "2", "--grad-accum", "4", "--seq-schedule", "32@0,64@3", "--val-frac", "0.05",
        "--eval-iters", "1", "--eval-every", "0", "--log-every", "1", "--lr", "3e-3", "--lr-schedule", "constant",
        "--warmup-steps", "0", "--no-amp", "--device", "cpu", "--live", "off", "--save-minutes", "0"]


def run(data: Path, out: Path, *flags: str) -> dict[int, float]:
    train(parse_config(["--data", str(data), "--out-dir", str(out), *FAST, *flags]))
    return {e["step"]: e["last_loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"}


def test_per_phase_micro_batch_trains_the_same_sequences_and_resumes_exactly(byte_data, tmp_path):
    plain = run(byte_data, tmp_path / "plain", "--steps", "6")
    split = run(byte_data, tmp_path / "split", "--steps", "6", "--micro-batch-schedule", "8@0,4@2,2@3")
    assert plain.keys() == split.keys() == set(range(1, 7))
    for step in plain:  # same 8 sequences per step; only the fp32 summation order differs
        assert split[step] == pytest.approx(plain[step], rel=1e-4)
    tokens = [e["tokens_per_step"] for e in read_jsonl(tmp_path / "split" / "train.jsonl") if e["type"] == "train"]
    assert tokens == [8 * 32] * 3 + [8 * 64] * 3
    # Stop after step 2 (micro-batch 8), resume into micro-batches 4 then 2: the same losses as straight through.
    resumed = tmp_path / "resumed"
    run(byte_data, resumed, "--steps", "2", "--micro-batch-schedule", "8@0,4@2,2@3")
    after = run(byte_data, resumed, "--steps", "6", "--micro-batch-schedule", "8@0,4@2,2@3")
    assert after == split


@pytest.mark.parametrize("schedule, message", [
    ("3@0", "must divide the 8 sequences per step"),
    ("8@2", "must start at step 0"),
    ("8@0,4@x", "is not MICRO@STEP"),
])
def test_bad_micro_batch_schedule_is_one_line_and_exit_2(schedule, message, byte_data, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["--data", str(byte_data), "--out-dir", str(out), *FAST, "--steps", "2", "--micro-batch-schedule",
            schedule]
    assert run_cli(train_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()
