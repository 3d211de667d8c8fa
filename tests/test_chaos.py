"""Chaos: kill -9 and SIGTERM at random moments, corrupted and hostile checkpoints, failing checkpoint writes.

Each scenario ends with the promise a preemptible user relies on: rerunning the same command finishes with
weights and optimizer state bit-identical to an uninterrupted run, each step logged once, and nothing unsafe
or corrupt ever loaded. Moments are seeded (random.Random) so a failure can be replayed; the trainer runs as
a real subprocess where a signal has to hit it, in-process where a function has to be swapped.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT

import pretrain.train.checkpoint as ck
from pretrain.cli import EXIT_STOPPED, UserError, run_cli
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import checkpoint_paths, load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.loop import main, train

STEPS = 30
# Tiny model, grad-accum 2 (so signals can land mid-accumulation), a save every 2 steps, evals in between.
FLAGS = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--layers", "2", "--d-ff", "128", "--block", "64",
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


@pytest.fixture(scope="module")
def reference(byte_data, tmp_path_factory) -> dict[str, Any]:
    """One uninterrupted run of the chaos configuration, in-process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_inprocess(byte_data, out)
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


# ------------------------------------------------------------------------------------------------- kill -9
def test_kill9_at_random_moments_and_corrupt_checkpoints_end_bit_identical(
        byte_data, tmp_path, reference, capfd) -> None:
    """4 kill -9s (two the instant a checkpoint write is in flight), last.pt corrupted twice, then finish.

    A kill lands `ahead` steps after the process's start step plus a random fraction of a step. Kills that
    precede a corruption come >= 5 steps in, so two saves have completed: there is an older good file to
    fall back to (a kill before the very first save is a different case: the rerun then asks for --overwrite).
    """
    rng = random.Random(9)
    out = tmp_path / "run"
    plan = ["step", "mid-write", "corrupt:truncate", "mid-write"]
    caught_mid_write = 0
    for i, what in enumerate(plan):
        if what.startswith("corrupt:"):
            damaged = corrupt_last(out, what.split(":")[1], rng)
        trainer = Trainer(byte_data, out, tmp_path / f"kill{i}.err")
        if what.startswith("corrupt:"):
            # The rerun skipped the damaged file (and its hard-linked step file) and resumed from an older one.
            start = trainer.wait_for_step(1)
            assert start < damaged and (out / f"step_{start}.pt").exists()
            assert "skipping unloadable checkpoint" in trainer.stderr() and "last.pt" in trainer.stderr()
            assert f"resuming from {out / f'step_{start}.pt'} at step {start}" in trainer.stderr()
        if what == "mid-write":
            trainer.wait_for(lambda t=trainer: t.start_step() is not None and t.trained_to() > t.start_step(),
                             "training")
            trainer.wait_for(trainer.write_in_flight, "a checkpoint write", poll=0)
        else:
            trainer.wait_for_step(rng.randint(5, 7))
            time.sleep(rng.uniform(0, 0.08))  # land anywhere in a step: forward, backward, eval, save
        trainer.proc.send_signal(signal.SIGKILL)
        assert trainer.wait() == -signal.SIGKILL, trainer.stderr()
        if what == "mid-write":
            caught_mid_write += trainer.write_in_flight()  # its temp file outlived it: killed mid-write
        assert_checkpoints_whole(out)
    assert caught_mid_write >= 1, "no kill landed while a checkpoint write was in flight"

    # Garble last.pt once more, then the same command (in-process here) falls back and completes.
    damaged = corrupt_last(out, "garble", rng)
    capfd.readouterr()
    result = run_inprocess(byte_data, out)
    err = capfd.readouterr().err
    assert result["status"] == "completed"
    resumed = events(out, "resume")[-1]["step"]
    assert resumed < damaged and "skipping unloadable checkpoint" in err
    assert f"step_{resumed}.pt at step {resumed}" in err
    assert_matches_reference(out, reference)


def test_kill9_before_the_first_checkpoint_then_the_same_command_starts_it_afresh(
        byte_data, tmp_path, capfd) -> None:
    """A hard kill before anything was saved leaves a run dir with a log but no checkpoint: nothing can be
    resumed, so rerunning the same command starts that run again, saying so in one line (issue 12.5)."""
    out = tmp_path / "run"
    no_saves = ["--steps", "8", "--save-every", "0"]  # and --save-minutes 0, no eval before the end
    trainer = Trainer(byte_data, out, tmp_path / "kill.err", *no_saves)
    trainer.wait_for_step(1)
    trainer.proc.send_signal(signal.SIGKILL)
    assert trainer.wait() == -signal.SIGKILL
    assert not list(out.glob("*.pt"))
    capfd.readouterr()
    assert run_cli(main, argv(byte_data, out, *no_saves)) == 0
    err = capfd.readouterr().err
    assert err.count("no checkpoint") == 1 and "afresh" in err, err
    assert [e["step"] for e in events(out, "train")] == list(range(1, 9))
    assert len(events(out, "meta")) == 1
    assert load_checkpoint(out / "last.pt")["step"] == 8


# ------------------------------------------------------------------------------------ two trainers, early stop
def test_second_trainer_on_a_live_run_dir_is_refused_and_kill9_leaves_no_stale_lock(byte_data, tmp_path) -> None:
    """One process per run dir (issue 12.2): the second gets one line naming the holder's pid and changes
    nothing; after a kill -9 of the holder the same dir is usable at once (the OS dropped the lock)."""
    out = tmp_path / "run"
    forever = ["--steps", "100000"]
    holder = Trainer(byte_data, out, tmp_path / "holder.err", *forever)
    holder.wait_for_step(3)
    second = subprocess.run([sys.executable, str(ROOT / "train_v29.py"), *argv(byte_data, out, *forever)],
                            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert second.stderr.startswith("error:") and second.stderr.strip().count("\n") == 0, second.stderr
    assert f"pid {holder.proc.pid}" in second.stderr, second.stderr
    reached = holder.trained_to()
    holder.wait_for(lambda: holder.trained_to() >= reached + 2, "the holder to keep training")
    assert holder.proc.poll() is None
    assert [e["step"] for e in events(out, "train")] == list(range(1, holder.trained_to() + 1))
    holder.proc.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    # --steps 1: resumes the holder's last checkpoint (past step 1) and only finishes: cheap, and proves the lock.
    assert run_cli(main, argv(byte_data, out, "--steps", "1")) == 0
    assert events(out, "end")[-1]["status"] == "completed"


def test_sigterm_while_the_session_opens_stops_cleanly_and_the_command_reruns(byte_data, tmp_path, capfd) -> None:
    """SIGTERM in the window between the run log's creation and the first step (here: an offline wandb.init)
    must not kill the trainer; the same command then runs (issue 12.5)."""
    out = tmp_path / "run"
    trainer = Trainer(byte_data, out, tmp_path / "term.err", "--steps", "4", "--wandb", "--wandb-mode", "offline")
    trainer.wait_for(lambda: trainer.start_step() is not None, "the run log opened", poll=0.0005)
    trainer.proc.send_signal(signal.SIGTERM)
    code = trainer.wait()
    assert code == EXIT_STOPPED and "Traceback" not in trainer.stderr(), (code, trainer.stderr())
    capfd.readouterr()
    assert run_cli(main, argv(byte_data, out, "--steps", "4")) == 0, capfd.readouterr().err
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3, 4]


def corrupt_last(out: Path, how: str, rng: random.Random) -> int:
    """Corrupt last.pt (and so the step file hard-linked to it); returns the step it held."""
    step = assert_checkpoints_whole(out)
    older = [p for p in checkpoint_paths(out)["numbered"] if int(p.stem.split("_")[1]) < step]
    assert older, "no older checkpoint to fall back to"  # --keep-last 2 keeps one
    corrupt(out / "last.pt", how, rng)
    return step


# ------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_at_random_moments_loses_no_step_and_ends_bit_identical(byte_data, tmp_path, reference) -> None:
    """3 SIGTERMs (one while a checkpoint write is in flight): each exits 75 (EXIT_STOPPED: rerun) having saved
    its last full step."""
    rng = random.Random(15)
    out = tmp_path / "run"
    saved: int | None = None
    for i, what in enumerate(["step", "mid-write", "step"]):
        trainer = Trainer(byte_data, out, tmp_path / f"term{i}.err")
        if what == "mid-write":
            trainer.wait_for(lambda t=trainer: t.start_step() is not None and t.trained_to() > t.start_step(),
                             "training")
            trainer.wait_for(trainer.write_in_flight, "a checkpoint write", poll=0)
            start = trainer.start_step()
        else:
            start = trainer.wait_for_step(rng.randint(1, 4))
            time.sleep(rng.uniform(0, 0.08))
        if saved is not None:  # resumed from exactly the step the previous SIGTERM saved, from last.pt
            assert start == saved and f"resuming from {out / 'last.pt'} at step {saved}" in trainer.stderr()
        trainer.proc.send_signal(signal.SIGTERM)
        assert trainer.wait() == EXIT_STOPPED, trainer.stderr()
        saved = load_checkpoint(out / "last.pt")["step"]
        # Zero steps lost: every step this process completed (logged) is in the checkpoint.
        assert saved == trainer.trained_to() > start
        assert f"stopped by signal SIGTERM: saved step {saved}" in trainer.stderr()
        end = read_jsonl(out / "train.jsonl")[-1]
        assert end["type"] == "end" and end["step"] == saved and "SIGTERM" in end["status"]
        assert saved < STEPS, "the run finished before the last signal; raise STEPS"

    result = run_inprocess(byte_data, out)
    assert result["status"] == "completed" and events(out, "resume")[-1]["step"] == saved
    assert_matches_reference(out, reference)


@pytest.mark.parametrize("where", ["eval", "sample"])
def test_sigterm_inside_an_eval_or_sample_saves_that_step_and_resumes_bit_identical(
        byte_data, tmp_path, reference, monkeypatch, where) -> None:
    """SIGTERM while step 10's eval (or text sampling, which reseeds the RNG) runs: the pass stops at once, step
    10 is saved, and the rerun ends bit-identical to the uninterrupted run. The cut eval is not run again."""
    from model.gpt import GPT
    from pretrain.data.loader import ValWindows

    extra = ["--sample-every", "10", "--sample-tokens", "8"] if where == "sample" else []
    cls, name = (ValWindows, "__iter__") if where == "eval" else (GPT, "generate")
    real, calls = getattr(cls, name), {"n": 0}

    def signal_inside(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (2 if where == "eval" else 1):  # step 0's eval is the first; samples start at step 10
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, signal_inside)
    out = tmp_path / "run"
    assert run_cli(main, argv(byte_data, out, *extra)) == EXIT_STOPPED
    assert load_checkpoint(out / "last.pt")["step"] == 10 and events(out, "end")[-1]["step"] == 10
    assert 10 not in [e["step"] for e in events(out, where)], "the pass ran to its end"
    monkeypatch.undo()

    result = run_inprocess(byte_data, out, *extra)
    assert result["status"] == "completed" and events(out, "resume")[-1]["step"] == 10
    state = load_checkpoint(out / "last.pt")
    for key in ("model", "optimizer", "sampler", "tokens"):
        assert_same(reference["state"][key], state[key], key)
    assert [e["step"] for e in events(out, "train")] == list(range(1, STEPS + 1))
    assert {e["step"]: e["last_loss"] for e in events(out, "train")} == reference["losses"]
    cut = [10] if where == "eval" else []
    assert [e["step"] for e in events(out, "eval")] == [s for s in reference["evals"] if s not in cut]


# ------------------------------------------------------------------------------------------- write failures
@pytest.mark.parametrize("failure", ["enospc", "exception"])
def test_failed_checkpoint_write_keeps_previous_and_training_goes_on(
        byte_data, tmp_path, reference, monkeypatch, capfd, failure) -> None:
    real = ck._write_payload
    seen: dict[str, Any] = {}
    out = tmp_path / "run"

    def flaky(f, state):
        if state["step"] == 4:  # the second save fails part-way through
            f.write(b"\0" * 4096)
            if failure == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise RuntimeError("serializer crashed")
        if state["step"] == 6:  # the next save: what did the failure leave behind?
            seen["last_step"] = load_checkpoint(out / "last.pt")["step"]
            seen["temps"] = len(list(out.glob(f"{TMP_PREFIX}*")))  # only this write's own
            seen["step_4"] = (out / "step_4.pt").exists()
        real(f, state)

    monkeypatch.setattr(ck, "_write_payload", flaky)
    steps = STEPS if failure == "enospc" else 8  # one full run is enough for the reference comparison
    result = run_inprocess(byte_data, out, "--steps", str(steps))
    err = capfd.readouterr().err
    assert result["status"] == "completed"
    assert seen == {"last_step": 2, "temps": 1, "step_4": False}, "the failed write damaged the previous save"
    message = "No space left on device" if failure == "enospc" else "serializer crashed"
    warning = [line for line in err.splitlines() if "step 4" in line and message in line]
    assert len(warning) == 1 and warning[0].startswith("warning:") and "training goes on" in warning[0]
    assert load_checkpoint(out / "last.pt")["step"] == steps  # later saves succeed
    if steps == STEPS:
        assert_matches_reference(out, reference)  # a failed save does not perturb training either


@pytest.mark.parametrize("when", ["signal", "final"])
def test_run_does_not_claim_a_save_that_failed(byte_data, tmp_path, monkeypatch, capfd, when) -> None:
    """The stop/finish save fails: the trainer must not report it as saved (message, exit code)."""
    from pretrain.data import loader as data_mod

    out = tmp_path / "run"
    steps = 6
    real_write, real_next = ck._write_payload, data_mod.Prefetcher.next
    calls = {"n": 0}

    def failing_from_step_3(f, state):
        if state["step"] >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(f, state)

    def next_then_signal(self, batch_size, seq_len):
        calls["n"] += 1
        if when == "signal" and calls["n"] == 2 * 3 + 1:  # first micro-batch of step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self, batch_size, seq_len)

    monkeypatch.setattr(ck, "_write_payload", failing_from_step_3)
    monkeypatch.setattr(data_mod.Prefetcher, "next", next_then_signal)
    code = run_cli(main, argv(byte_data, out, "--steps", str(steps)))
    err = capfd.readouterr().err
    on_disk = load_checkpoint(out / "last.pt")["step"]
    assert on_disk == 2 and "no space left" in err.lower()
    stopped_at = 3 if when == "signal" else steps
    assert f"saved step {stopped_at}" not in err, f"claims step {stopped_at} was saved, but last.pt holds {on_disk}"
    assert code != 0, f"exit code 0 although the {when} checkpoint (step {stopped_at}) was never written"


# ---------------------------------------------------------------------------------------- hostile checkpoint
class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def plant(path: Path, state: dict, marker: Path) -> None:
    """Replace `path` (new inode, so hard-linked names keep their content) with a payload-carrying copy."""
    tmp = path.with_name("planted.tmp")
    torch.save({**state, "extra": Payload(marker)}, tmp)
    os.replace(tmp, path)


def test_pickle_payload_checkpoint_is_refused_and_never_runs(byte_data, tmp_path, capfd) -> None:
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    run_inprocess(byte_data, out, "--steps", "4")
    good = load_checkpoint(out / "last.pt")
    plant(out / "last.pt", good, marker)
    capfd.readouterr()

    # With a good step file beside it, the rerun falls back to that file.
    result = run_inprocess(byte_data, out, "--steps", "6")
    err = capfd.readouterr().err
    assert result["status"] == "completed" and not marker.exists()
    assert "was refused: it holds Python objects" in err and "nothing in it was run" in err
    assert events(out, "resume")[-1]["step"] == 4

    # With every candidate hostile there is nothing to resume: one clear error, nothing overwritten or run.
    for path in [out / "last.pt", *checkpoint_paths(out)["numbered"]]:
        plant(path, good, marker)
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    capfd.readouterr()
    assert run_cli(main, argv(byte_data, out, "--steps", "8")) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error:") and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before
    assert not marker.exists()
    with pytest.raises(UserError, match="was refused: it holds Python objects"):
        load_checkpoint(out / "last.pt")
    # Control: the planted payload is live, so only the refusal kept it from running.
    torch.load(out / "last.pt", weights_only=False)
    assert marker.read_text() == "pwned"


# ------------------------------------------------------------------------------------------------ bit rot
def test_bit_flip_in_tensor_data_is_not_loaded(byte_data, tmp_path, capfd) -> None:
    """A checkpoint whose tensor bytes were damaged (bad disk, torn network copy) must not be resumed from.

    torch.load does not verify the CRC-32s torch.save writes for every zip member, so a flipped byte inside
    a tensor loads silently as a slightly different weight.
    """
    import zipfile

    out = tmp_path / "run"
    run_inprocess(byte_data, out, "--steps", "4")
    last = out / "last.pt"
    with zipfile.ZipFile(last) as z:  # the largest tensor record: embedding weights or an Adam moment
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(last, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x40]))
    capfd.readouterr()
    run_inprocess(byte_data, out, "--steps", "6")
    resumed = events(out, "resume")[-1]["step"]
    assert resumed != 4, "resumed from a last.pt whose tensor data is corrupt (CRC mismatch not detected)"


# ---------------------------------------------------------------------------------------- precision modes
# Every precision mode a tier can choose: bf16 weights (AdamW with fp32 state and stochastic rounding),
# fp16 autocast with a GradScaler, Lion on bf16 weights (the small-card choice).
PRECISION_MODES = {
    "bf16-params": (["--param-dtype", "bf16"], signal.SIGKILL),
    "fp16-amp": (["--amp-dtype", "fp16"], signal.SIGTERM),
    "lion-bf16": (["--optimizer", "lion", "--param-dtype", "bf16"], signal.SIGKILL),
}


@pytest.mark.parametrize("mode", list(PRECISION_MODES))
def test_precision_modes_resume_bit_identical(byte_data, tmp_path, mode) -> None:
    """Straight run vs a run killed at a random moment (after its first save) then rerun: torch.equal on
    weights, optimizer state (dtypes included: bf16 weights keep fp32 moments) and the GradScaler."""
    flags, sig = PRECISION_MODES[mode]
    steps = ["--steps", "10", "--eval-every", "5"]
    run_inprocess(byte_data, tmp_path / "straight", *steps, *flags)
    out = tmp_path / "killed"
    trainer = Trainer(byte_data, out, tmp_path / "kill.err", *steps, *flags)
    trainer.wait_for_step(random.Random(mode).randint(3, 6))
    trainer.proc.send_signal(sig)
    assert trainer.wait() == (EXIT_STOPPED if sig == signal.SIGTERM else -sig), trainer.stderr()
    assert load_checkpoint(out / "last.pt")["step"] < 10
    result = run_inprocess(byte_data, out, *steps, *flags)
    assert result["status"] == "completed" and events(out, "resume")
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(out / "last.pt")
    for key in ("model", "optimizer", "scaler", "sampler", "rounding_rng"):
        assert_same(a[key], b[key], key)
    moments = {t.dtype for st in b["optimizer"]["state"].values() for k, t in st.items() if k != "step"}
    assert moments == {torch.float32}
    assert {e["step"]: e["last_loss"] for e in events(out, "train")} == {
        e["step"]: e["last_loss"] for e in events(tmp_path / "straight", "train")}
