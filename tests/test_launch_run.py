"""run_1b_launch.py as a user runs it: the dry run writes nothing, --run trains and passes SIGTERM on, and
re-running the same command resumes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, trainers_in_process

from pretrain.errors import EXIT_STOPPED
from pretrain.plan import launch
from pretrain.plan.view import render_plan
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import parse_config

LAUNCHER = str(ROOT / "run_1b_launch.py")
SMALL = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
         "--eval-iters", "2", "--eval-every", "0", "--log-every", "1", "--save-every", "0", "--save-minutes", "0",
         "--live", "off"]


def listing(*dirs: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_size) for d in dirs for p in d.rglob("*"))


def test_dry_run_writes_nothing_and_prints_one_json_object(tmp_path, byte_data):
    before = listing(tmp_path, byte_data.parent)
    cmd = [sys.executable, LAUNCHER, "--vram", "cpu", "--data", str(byte_data), "--val-frac", "0.05",
           "--run-root", "runs", "--json", *SMALL]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert listing(tmp_path, byte_data.parent) == before and not (tmp_path / "runs").exists()
    plan = json.loads(proc.stdout)
    assert plan["data"]["vocab_size"] == 256 and plan["data"]["passes"] > 0
    assert plan["run"] == {"name": "tiny-baseline", "dir": "runs/tiny-baseline", "action": "fresh", "note": "",
                           "seed": 1337}
    assert parse_config(plan["command"][2:]).out_dir == "runs/tiny-baseline"


def test_plain_text_plan_names_sources_verdicts_and_the_command(tmp_path, byte_data):
    _, plan = launch.plan_from_argv(["--vram", "cpu", "--data", str(byte_data), "--val-frac", "0.05",
                                     "--run-root", str(tmp_path), *SMALL], gpu=None)
    out = io.StringIO()
    render_plan(plan, file=out)
    text = out.getvalue()
    for needle in ("dry run", "tier cpu", "fits", "ESTIMATE", "checkpoints:", "measured", "command:",
                   "python train_v29.py --size tiny"):
        assert needle in text, needle
    assert "\x1b[" not in text  # no terminal codes when not on a TTY


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.05)


def test_run_forwards_sigterm_then_the_same_command_resumes(tmp_path, byte_data, capfd, monkeypatch):
    runs = tmp_path / "runs"
    cmd = [sys.executable, LAUNCHER, "--vram", "cpu", "--data", str(byte_data), "--val-frac", "0.05",
           "--run-root", str(runs), "--steps", "100", "--run", *SMALL]
    log = runs / "tiny-baseline" / "train.jsonl"
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: log.exists() and '"type": "train"' in log.read_text(), first)
    first.send_signal(signal.SIGTERM)  # to the launcher only: it must pass it on so the trainer saves
    out, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_STOPPED, err[-3000:]  # the trainer's "stopped: rerun", passed through
    assert (runs / "tiny-baseline" / "last.pt").exists()
    stopped = [e for e in read_jsonl(log) if e["type"] == "end"]
    assert stopped and stopped[-1]["status"].startswith("stopped by signal") and stopped[-1]["step"] < 100

    # The same command again, its main in this process (the signal path above needed the launcher as a process),
    # and its trainer too (what is checked now is that the run resumes, not the process: a trainer as the launcher's
    # child is the first half).
    monkeypatch.chdir(tmp_path)
    trainers_in_process(monkeypatch)
    capfd.readouterr()
    assert launch.main(cmd[2:]) == 0
    second = capfd.readouterr()
    assert "resume" in second.out + second.err, second.err[-3000:]
    events = read_jsonl(log)
    assert [e["type"] for e in events].count("meta") == 1  # one run, continued, not started over
    steps = [e["step"] for e in events if e["type"] == "train"]
    assert steps == list(range(1, 101))
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed" and events[-1]["step"] == 100
    assert not (runs / "tiny-baseline-2").exists()

    assert launch.main(cmd[2:]) == 0  # a third time: complete, nothing runs
    assert "already completed 100 steps" in capfd.readouterr().err
