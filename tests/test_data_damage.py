"""A dataset damaged under a running trainer (issue 19.2): a shard truncated or rewritten in place, ids beyond the
vocab that the manifest does not record, a shard that is not a regular file. Each ends with the last full step
saved and one line naming the file, exit 2: never a signal (SIGBUS from a memmap), a hang or a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_data import make_dataset

from pretrain.errors import run_cli
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint

TINY = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--d-ff", "64", "--block-size", "32",
        "--batch-size", "4", "--train-seq-len", "32", "--eval-iters", "1", "--device", "cpu", "--live", "off",
        "--save-minutes", "0", "--eval-every", "0", "--log-every", "1"]


def _events(run: Path) -> list[dict]:
    """A running trainer's train.jsonl, as the project reads it: complete records only (the last line may still be
    half written)."""
    return read_jsonl(run / "train.jsonl")


def _one_error_line(err: str, *needles: str) -> None:
    """The run's last stderr line is its one error line (progress lines such as `eval step 0` may precede it)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(ln.startswith("error") for ln in lines) == 1, err
    for n in needles:
        assert n in lines[-1], err


def _saved_step(run: Path) -> int:
    state = load_checkpoint(run / "last.pt")
    end = [e for e in _events(run) if e["type"] == "end"]
    assert end and end[-1]["status"].startswith("stopped: shard"), end
    assert state["step"] == end[-1]["step"]
    return int(state["step"])


@pytest.mark.parametrize("how", ["truncate", "rewrite in place"])
def test_shard_changed_under_a_running_trainer_saves_and_names_the_file(tmp_path, how):
    """`truncate -s 200` of a memmapped shard was SIGBUS (exit 135, no message, no save)."""
    data = make_dataset(tmp_path / "ds", train_sizes=(60_000, 60_000), val_sizes=(5_000,), vocab=256)
    shard, run = data / "train_000001.npy", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_v29.py"), "--data", str(data), "--out-dir", str(run),
                             *TINY, "--steps", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(e["type"] == "train" for e in _events(run)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        if how == "truncate":
            os.truncate(shard, 200)
        else:  # cp / rsync --inplace: the same inode, other bytes (here: the same size, shifted ids)
            arr = np.load(shard)
            with open(shard, "r+b") as f:
                f.seek(128)
                f.write(((arr.astype(np.int64) + 7) % 256).astype(np.uint16).tobytes())
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, (proc.returncode, err)
    _one_error_line(err, str(shard), "changed while the trainer was reading it", "last.pt", "rerun")
    assert _saved_step(run) >= 1


def test_ids_beyond_the_vocab_that_the_manifest_hides_stop_the_run_with_one_line(tmp_path, capsys):
    """The manifest records max_token_id 255 but one token is 300: was an embedding IndexError traceback."""
    from pretrain.train.loop import main

    data = make_dataset(tmp_path / "ds", train_sizes=(3_000,), val_sizes=(2_000,), vocab=256)
    arr = np.load(data / "train_000000.npy")
    arr[1_100] = 300  # not one of the places the fingerprint samples at open: found when a batch holds it
    np.save(data / "train_000000.npy", arr)
    code = run_cli(main, ["--data", str(data), "--out-dir", str(tmp_path / "run"), *TINY, "--steps", "1000"])
    err = capsys.readouterr().err
    assert code == 2, err
    _one_error_line(err, str(data / "train_000000.npy"), "token id 300", "vocab_size 256", "last.pt")
    _saved_step(tmp_path / "run")


@pytest.mark.parametrize("which", ["train_000000.npy", "manifest.json"])
def test_a_shard_or_manifest_that_is_a_fifo_is_refused_not_waited_on(tmp_path, which):
    """A FIFO among the shards made open_dataset block forever (no writer ever comes)."""
    data = make_dataset(tmp_path / "ds", train_sizes=(3_000,), val_sizes=(2_000,), vocab=256)
    (data / which).unlink()
    os.mkfifo(data / which)
    before = sorted(p.name for p in data.iterdir())
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "train_v29.py"), "--data", str(data), "--out-dir",
                               str(tmp_path / "run"), *TINY, "--steps", "2"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the trainer was still waiting on the FIFO {which} after 60 s")
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, str(data / which), "FIFO")
    assert not (tmp_path / "run").exists() and sorted(p.name for p in data.iterdir()) == before
