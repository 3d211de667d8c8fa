"""A stop request ends whatever the trainer runs within seconds (issue 18.7): an eval, samples, diagnostics, a
downstream eval. The trainer runs as a subprocess, as a spot instance's SIGTERM or a closed SSH session's SIGHUP
reaches it; each test reads back what a user or a job scheduler sees: the exit code (75, pretrain.errors.EXIT_STOPPED:
rerun the same command), the time from signal to exit, last.pt and train.jsonl.

Each pass is made long on purpose (thousands of eval windows, tokens or items) so that a trainer that lets it
finish first misses the latency bound by far; the passes' own events must then be absent from train.jsonl, which
tells a stopped pass from a finished one whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from pretrain.errors import EXIT_STOPPED, run_cli
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.loop import main as train_main

TINY = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "256",
        "--batch-size", "4", "--val-frac", "0.2", "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3",
        "--device", "cpu", "--live", "off", "--save-minutes", "0", "--save-every", "0", "--no-amp"]
STOP_WITHIN = 5.0  # seconds from the signal to the process's exit, the save and the end event included
TIMEOUT = 180.0
# Evals every 2 steps of 40 batches of 16 rows: at step 0 rows of 16 tokens (the first phase, cheap), from step 2
# rows of 256 (~160K tokens, most of the validation split).
LONG_EVAL = ["--seq-schedule", "16@0,256@1", "--batch-size", "16", "--val-frac", "0.3", "--eval-every", "2",
             "--eval-iters", "40"]


class Trainer:
    """`python train_v29.py ...` as a subprocess, watched through its train.jsonl."""

    def __init__(self, data: Path, out: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.out = out
        self.cmd = [sys.executable, str(ROOT / "train_v29.py"), "--data", str(data), "--out-dir", str(out), *TINY,
                    *flags]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=None if env is None else {**os.environ, **env})

    def events(self) -> list[dict]:
        return read_jsonl(self.out / "train.jsonl") if (self.out / "train.jsonl").exists() else []

    def wait_for(self, kind: str, step: int | None) -> None:
        """Until train.jsonl logs a `kind` event at `step` (training step N: the passes due at N start next)."""
        deadline = time.monotonic() + TIMEOUT
        while not any(e["type"] == kind and e.get("step") == step for e in self.events()):
            assert self.proc.poll() is None, f"trainer exited ({self.proc.returncode}): {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, f"no {kind} event at step {step}"
            time.sleep(0.05)

    def stop(self, sig: int) -> tuple[int, float, str]:
        """Send `sig`; (exit code, seconds from the signal to the exit, stderr)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, time.monotonic() - t0, err


def assert_stopped_at(out: Path, step: int, sig: int, err: str) -> None:
    """The state of the last full step is saved (none before the first), the run log ends as a stopped run's."""
    status = f"stopped by signal {signal.Signals(sig).name}"
    if step:
        assert load_checkpoint(out / "last.pt")["step"] == step
    else:  # nothing trained: nothing to save, the rerun starts afresh
        assert not list(out.glob("*.pt"))
        status += " before its first step"
    end = read_jsonl(out / "train.jsonl")[-1]
    assert end["type"] == "end" and end["status"] == status, end
    assert end["step"] == step and end["saved"]
    assert "Traceback" not in err, err


def test_sigterm_stops_a_long_eval_within_seconds_and_the_same_command_resumes(byte_data, tmp_path):
    """The eval at step 2 scores 640 windows of 256 tokens; SIGTERM once it starts: exit 75 within seconds,
    step 2 saved; the same command then resumes at step 2, finishes and exits 0."""
    out = tmp_path / "run"
    # Step 0's eval runs at the first phase's 16 tokens (cheap); from step 2 evals score the 256-token windows.
    flags = ["--steps", "3", *LONG_EVAL]
    trainer = Trainer(byte_data, out, *flags)
    trainer.wait_for("train", 2)
    time.sleep(0.3)  # into the eval
    code, seconds, err = trainer.stop(signal.SIGTERM)
    assert code == EXIT_STOPPED, err
    assert [e["step"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "eval"] == [0], \
        "the step-2 eval ran to its end before the trainer stopped"
    assert seconds < STOP_WITHIN, f"{seconds:.1f} s from SIGTERM to exit"
    assert_stopped_at(out, 2, signal.SIGTERM, err)
    assert "rerun the same command to resume" in err

    # The same command, in this process (what a signal hits is the first process; the rerun only has to resume).
    assert run_cli(train_main, trainer.cmd[2:]) == 0  # a finished run exits 0
    events = read_jsonl(out / "train.jsonl")
    assert [e["step"] for e in events if e["type"] == "train"] == [1, 2, 3]
    assert [e["step"] for e in events if e["type"] == "resume"] == [2]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed" and events[-1]["step"] == 3


def _hellaswag(path: Path, n: int) -> str:
    items = [{"ctx": f"Item {i} begins with a sentence that sets up", "label": i % 4,
              "endings": [f"an ending number {k} of a few more words for item {i}." for k in range(4)]}
             for i in range(n)]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


# (signal, the pass, the step it runs at and is stopped in, the event after which it starts, flags making it
# long). At step 2: 8 x 20,000 generated tokens; 20,000 multiple-choice items (SIGHUP: a closed SSH session;
# SIGINT is the demo's Ctrl-C test). Step 0's diagnostics, run right after step 0's eval, trace 8 layers on
# 4 x 1024 tokens (~10 s on 2 loaded cores).
PASSES = {
    "sample": (signal.SIGTERM, "sample", 2, "train", ["--sample-every", "2", "--sample-tokens", "20000"]),
    "downstream-sighup": (signal.SIGHUP, "downstream", 2, "train", ["--hellaswag", "{items}", "--downstream-every",
                                                                    "2", "--downstream-items", "0"]),
    "diagnostics-at-start": (signal.SIGUSR1, "diagnostics", 0, "eval", ["--analysis-every", "2", "--n-layer", "8",
                                                                        "--block-size", "1024",
                                                                        "--eval-seq-len", "1024"]),
}


@pytest.mark.parametrize("case", list(PASSES))
def test_a_stop_ends_any_pass_within_seconds(byte_data, tmp_path, case):
    sig, kind, step, after, extra = PASSES[case]
    extra = [_hellaswag(tmp_path / "items.jsonl", 20_000) if a == "{items}" else a for a in extra]
    out = tmp_path / "run"
    trainer = Trainer(byte_data, out, "--steps", "100", "--train-seq-len", "16", "--eval-iters", "1", *extra)
    trainer.wait_for(after, step)
    time.sleep(0.3)  # into the pass
    code, seconds, err = trainer.stop(sig)
    assert code == EXIT_STOPPED, err
    assert not [e for e in read_jsonl(out / "train.jsonl") if e["type"] == kind and e["step"] == step], \
        f"the step-{step} {kind} ran to its end before the trainer stopped"
    assert seconds < STOP_WITHIN, f"{seconds:.1f} s from {signal.Signals(sig).name} to exit"
    assert_stopped_at(out, step, sig, err)


def test_a_stop_during_the_first_compile_ends_within_seconds(byte_data, tmp_path):
    """Evals run eagerly, so with --compile the first training micro-batch compiles (~15 s on CPU): a SIGTERM
    then drops that micro-batch and saves step 0 within seconds instead of waiting for the compile."""
    out = tmp_path / "run"
    # An empty inductor cache: the session's shared one (conftest) may hold this graph, and a compile loaded from it
    # can end before the signal.
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    trainer = Trainer(byte_data, out, "--steps", "100", "--train-seq-len", "16", "--eval-iters", "1", "--compile",
                      env=cold)
    trainer.wait_for("eval", 0)  # the first training step compiles next
    time.sleep(0.5)
    code, seconds, err = trainer.stop(signal.SIGTERM)
    assert code == EXIT_STOPPED, err
    events = read_jsonl(out / "train.jsonl")
    assert not [e for e in events if e["type"] == "train"], "the first step's compile ran to its end first"
    assert seconds < STOP_WITHIN, f"{seconds:.1f} s from SIGTERM to exit"
    assert events[-1]["type"] == "end" and events[-1]["status"] == "stopped by signal SIGTERM", events[-1]
    assert events[-1]["step"] == 0 and events[-1]["saved"] and "Traceback" not in err
