"""What the trainer reports is what happened: every event reaches wandb across a resume, evals run at a trained
length, the console shows skipped steps, and summary.md holds the median throughput and the resume history."""

from __future__ import annotations

import glob
import os
import re
import signal
import statistics
from pathlib import Path

import pytest
from faults import nan_at_step
from wandb_records import iter_wandb_records, read_wandb_history

from pretrain.errors import EXIT_STOPPED
from pretrain.track.plots import events_by_step
from pretrain.track.runlog import read_jsonl
from pretrain.train.loop import main
from pretrain.units import fmt_count

FAST = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
        "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "1",
        "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--live", "basic", "--save-minutes", "0"]


def trainer(data: Path, out: Path, *flags: str) -> int:
    return main(["--data", str(data), "--out-dir", str(out), *FAST, *flags])


def sigterm_at_batch(monkeypatch, n: int) -> None:
    """SIGTERM while the n-th training batch is fetched (a preemption in the middle of that step)."""
    from pretrain.data import loader as data_mod

    original, calls = data_mod.Prefetcher.next, {"n": 0}

    def next_batch(self, batch_size, seq_len):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch_size, seq_len)

    monkeypatch.setattr(data_mod.Prefetcher, "next", next_batch)


def events(out: Path, kind: str) -> list[dict]:
    return events_by_step(read_jsonl(out / "train.jsonl"), kind)


def test_every_event_reaches_wandb_at_its_step_across_a_resume(byte_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    out = tmp_path / "r"
    flags = ["--steps", "6", "--eval-every", "2", "--save-every", "2", "--wandb", "--wandb-mode", "offline", "--tb"]
    sigterm_at_batch(monkeypatch, 4)  # stops inside step 4: saved at step 3
    assert trainer(byte_data, out, *flags) == EXIT_STOPPED
    monkeypatch.undo()
    assert trainer(byte_data, out, *flags) == 0
    console = capsys.readouterr().out.strip().splitlines()

    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))  # one per session, in time order
    assert len(files) == 2
    rows: dict[int, dict] = {}
    for f in files:  # a later session's row for a step wins, as `wandb sync` in this order leaves it
        for row in read_wandb_history(f):
            rows.setdefault(row["_step"], {}).update(row)
    evals, train, ckpts = events(out, "eval"), events(out, "train"), events(out, "checkpoint")
    assert [e["step"] for e in evals] == [0, 2, 4, 6]
    for e in evals:
        assert rows[e["step"]]["val/loss"] == pytest.approx(e["loss"])
        assert rows[e["step"]]["val/seq_len"] == e["seq_len"]
    for e in train:
        assert rows[e["step"]]["train/loss"] == pytest.approx(e["loss"])
        assert rows[e["step"]]["train/lr"] == pytest.approx(e["lr"])
    assert {e["step"] for e in ckpts} <= {s for s, r in rows.items() if "checkpoint/best" in r}
    assert all(rows[s]["tokens"] == e["tokens"] for e in train for s in [e["step"]])

    # Charts can use tokens as their x-axis.
    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in iter_wandb_records(files[0])
               if r.WhichOneof("record_type") == "metric"}
    assert metrics.get("train/*") == metrics.get("val/*") == "tokens"

    # The offline sync command covers both sessions, in summary.md and as the console's last line.
    sync = re.search(r"`(wandb sync [^`]+)`", (out / "summary.md").read_text()).group(1)
    assert console[-1].endswith(sync)
    assert sorted(glob.glob(sync.split(" ", 2)[2])) == [str(f.parent) for f in files]
    # A session started in the same second as the one before gets wandb's "-1" suffix; another run's dir is
    # not swept in.
    same_second = Path(f"{files[0].parent}-1")
    same_second.mkdir(exist_ok=True)
    (files[0].parent.parent / "offline-run-20260101_000000-otherrun").mkdir()
    assert sorted(glob.glob(sync.split(" ", 2)[2])) == sorted({str(f.parent) for f in files} | {str(same_second)})


def test_eval_uses_the_longest_length_trained_so_far(byte_data, tmp_path, capsys):
    out = tmp_path / "sched"
    assert trainer(byte_data, out, "--block-size", "256", "--seq-schedule", "64@0,256@1000", "--steps", "4",
                   "--eval-every", "2", "--save-every", "0") == 0
    assert [(e["step"], e["seq_len"]) for e in events(out, "eval")] == [(0, 64), (2, 64), (4, 64)]
    eval_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval step")]
    assert len(eval_lines) == 3 and all("| seq 64 |" in line for line in eval_lines)

    out = tmp_path / "switch"
    assert trainer(byte_data, out, "--seq-schedule", "32@0,64@2", "--steps", "4", "--eval-every", "2",
                   "--save-every", "0") == 0
    assert [(e["step"], e["seq_len"]) for e in events(out, "eval")] == [(0, 32), (2, 32), (4, 64)]

    out = tmp_path / "explicit"  # an explicit --eval-seq-len still wins
    assert trainer(byte_data, out, "--steps", "1", "--eval-every", "0", "--eval-seq-len", "48",
                   "--save-every", "0") == 0
    assert {e["seq_len"] for e in events(out, "eval")} == {48}


def test_console_shows_skipped_steps_and_summary_holds_median_and_resumes(byte_data, tmp_path, monkeypatch,
                                                                           capsys):
    nan_at_step(monkeypatch, 3)
    out = tmp_path / "r"
    assert trainer(byte_data, out, "--steps", "4", "--eval-every", "0", "--save-every", "0") == 0
    monkeypatch.undo()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert "skipped" not in lines[1] and "skipped 1" in lines[2] and "skipped 1" in lines[3]
    assert "loss nan" in lines[2]  # a window of only skipped steps has no mean loss

    assert trainer(byte_data, out, "--steps", "6", "--eval-every", "0", "--save-every", "0") == 0
    summary = (out / "summary.md").read_text()
    train = events(out, "train")
    median = fmt_count(statistics.median(e["tok_s"] for e in train))  # what `compare` shows
    assert f"| throughput | {median} tok/s (median of 6 train lines) |" in summary
    resume = next(e for e in read_jsonl(out / "train.jsonl") if e["type"] == "resume")
    assert (resume["step"], resume["steps_before"], resume["steps"]) == (4, 4, 6)
    history = summary.split("## Resumes", 1)[1]
    assert re.search(r"- \d{4}-\d\d-\d\d \d\d:\d\d UTC: resumed at step 4 from `last.pt`; "
                     r"run length 4 -> 6 steps \(extended\)", history)
