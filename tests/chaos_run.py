"""The chaos tests' configuration and tools: a tiny trainer run that saves every 2 steps, the trainer as a real
subprocess with probes to time a signal against its progress, bit-for-bit state comparison, checkpoint damage."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import ROOT

import pretrain.train.checkpoint as ck
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import checkpoint_paths, load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.loop import train

STEPS = 30
# Tiny model, grad-accum 2 (so signals can land mid-accumulation), a save every 2 steps, evals in between.
FLAGS = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
         "--batch-size", "4", "--grad-accum", "2", "--train-seq-len", "32", "--val-frac", "0.05",
         "--eval-iters", "2", "--eval-every", "10", "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3",
         "--device", "cpu", "--live", "off", "--save-minutes", "0", "--save-every", "2", "--keep-last", "2",
         "--steps", str(STEPS)]
TMP_PREFIX = ck._TMP_PREFIX  # name of a checkpoint file whose write is still in flight
TIMEOUT = 180.0  # generous: CI and shared dev boxes run these next to other CPU-heavy jobs


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out-dir", str(out), *FLAGS, *extra]


def run_inprocess(data: Path, out: Path, *extra: str) -> dict[str, Any]:
    return train(parse_config(argv(data, out, *extra)))


def events(out: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(out / "train.jsonl") if e["type"] == kind]


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality; tensors must match bit for bit (dtype, shape and every value)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_matches_reference(out: Path, reference: dict[str, Any]) -> None:
    """Same final weights, optimizer, data position and loss trajectory; each step and eval logged once."""
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == STEPS
    for key in ("model", "optimizer", "sampler", "tokens"):
        assert_same(reference["state"][key], state[key], key)
    steps = [e["step"] for e in events(out, "train")]
    assert steps == list(range(1, STEPS + 1)), f"train steps logged: {steps}"
    evals = [e["step"] for e in events(out, "eval")]
    assert evals == reference["evals"], f"eval steps logged: {evals}"
    assert {e["step"]: e["last_loss"] for e in events(out, "train")} == reference["losses"]
    assert not list(out.glob(f"{TMP_PREFIX}*")), "a killed write's temp file was never cleaned up"


def assert_checkpoints_whole(out: Path) -> int:
    """Every checkpoint name on disk holds one complete save for its step; returns last.pt's step."""
    paths = checkpoint_paths(out)
    last = load_checkpoint(paths["last"])["step"]
    for path in paths["numbered"]:
        step = int(path.stem.split("_")[1])
        assert load_checkpoint(path)["step"] == step <= last, f"{path.name} is torn or newer than last.pt"
    return last


def reference_run(data: Path, out: Path) -> dict[str, Any]:
    """One uninterrupted run of the chaos configuration, in-process: what every interrupted run must end as."""
    run_inprocess(data, out)
    return {"state": load_checkpoint(out / "last.pt"),
            "losses": {e["step"]: e["last_loss"] for e in events(out, "train")},
            "evals": [e["step"] for e in events(out, "eval")]}


class Trainer:
    """`python train_v29.py ...` as a subprocess, with probes to time a signal against its progress."""

    def __init__(self, data: Path, out: Path, log: Path, *extra: str) -> None:
        self.out, self.log = out, log
        self.stale = {p.name for p in out.glob(f"{TMP_PREFIX}*")}  # left by an earlier kill
        self.t_start = time.time()
        self._err = open(log, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train_v29.py"), *argv(data, out, *extra)],
                                     cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        self._size, self._events = -1, []

    def new_events(self) -> list[dict]:
        """train.jsonl events this process wrote (re-parsed only when the file grew)."""
        path = self.out / "train.jsonl"
        size = path.stat().st_size if path.exists() else 0
        if size != self._size:
            self._size = size
            self._events = [e for e in read_jsonl(path) if e["time"] >= self.t_start - 0.01]
        return self._events

    def start_step(self) -> int | None:
        """Step this process started from (0 fresh), once it has opened its run log."""
        for e in self.new_events():
            if e["type"] in ("meta", "resume"):
                return e.get("step", 0)
        return None

    def trained_to(self) -> int:
        return max((e["step"] for e in self.new_events() if e["type"] == "train"), default=-1)

    def write_in_flight(self) -> bool:
        return any(n.startswith(TMP_PREFIX) and n not in self.stale for n in os.listdir(self.out))

    def wait_for(self, condition: Callable[[], bool], what: str, poll: float = 0.002) -> None:
        deadline = time.time() + TIMEOUT
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited ({self.proc.returncode}) before {what}: {self.stderr()}")
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(poll)

    def wait_for_step(self, ahead: int) -> int:
        """Block until this process has finished `ahead` steps past its start; returns its start step."""
        self.wait_for(lambda: self.start_step() is not None, "the run log opened")
        start = self.start_step()
        self.wait_for(lambda: self.trained_to() >= start + ahead, f"step {start + ahead}")
        return start

    def wait(self) -> int:
        code = self.proc.wait(timeout=TIMEOUT)
        self._err.close()
        return code

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.log.read_text(errors="replace")


def corrupt(path: Path, how: str, rng: random.Random) -> None:
    """Damage a checkpoint in place, as a torn copy or a bad disk would (hard links share the damage)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: rng.randrange(len(data) // 4, 3 * len(data) // 4)]
    else:  # garble the zip header and the pickled structure that precedes the tensor bytes
        for i in range(min(len(data), 4096)):
            data[i] = rng.randrange(256)
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def corrupt_last(out: Path, how: str, rng: random.Random) -> int:
    """Corrupt last.pt (and so the step file hard-linked to it); returns the step it held."""
    step = assert_checkpoints_whole(out)
    older = [p for p in checkpoint_paths(out)["numbered"] if int(p.stem.split("_")[1]) < step]
    assert older, "no older checkpoint to fall back to"  # --keep-last 2 keeps one
    corrupt(out / "last.pt", how, rng)
    return step
