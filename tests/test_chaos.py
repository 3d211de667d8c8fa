"""Chaos: kill -9 and SIGTERM at random moments, corrupted checkpoints, every precision mode (failing checkpoint
writes: test_chaos_writes.py; hostile checkpoints: test_bad_resume.py; the tools: chaos_run.py).

Each scenario ends with the promise a preemptible user relies on: rerunning the same command finishes with
weights and optimizer state bit-identical to an uninterrupted run, each step logged once, and nothing unsafe
or corrupt ever loaded. Moments are seeded (random.Random) so a failure can be replayed; the trainer runs as
a real subprocess where a signal has to hit it, in-process where a function has to be swapped.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch
from chaos_run import (
    STEPS,
    Trainer,
    argv,
    assert_checkpoints_whole,
    assert_matches_reference,
    assert_same,
    corrupt_last,
    events,
    run_inprocess,
)

from pretrain.errors import EXIT_STOPPED, run_cli
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.loop import main


# ------------------------------------------------------------------------------------------------- kill -9
def test_kill9_at_random_moments_and_corrupt_checkpoints_end_bit_identical(
        byte_data, tmp_path, chaos_reference, capfd) -> None:
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
    assert_matches_reference(out, chaos_reference)


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
def test_second_trainer_on_a_live_run_dir_is_refused_and_kill9_leaves_no_stale_lock(byte_data, tmp_path,
                                                                                     capfd) -> None:
    """One process per run dir (issue 12.2): the second (this process: the lock is per process, and a script's
    exit-2 wiring is tests/test_bad_input.py's) gets one line naming the holder's pid and changes nothing; after a
    kill -9 of the holder the same dir is usable at once (the OS dropped the lock)."""
    out = tmp_path / "run"
    forever = ["--steps", "100000"]
    holder = Trainer(byte_data, out, tmp_path / "holder.err", *forever)
    holder.wait_for_step(3)
    capfd.readouterr()
    code = run_cli(main, argv(byte_data, out, *forever))
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    assert f"pid {holder.proc.pid}" in err, err
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


# ------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_at_random_moments_loses_no_step_and_ends_bit_identical(byte_data, tmp_path, chaos_reference) -> None:
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
    assert_matches_reference(out, chaos_reference)


@pytest.mark.parametrize("where", ["eval", "sample"])
def test_sigterm_inside_an_eval_or_sample_saves_that_step_and_resumes_bit_identical(
        byte_data, tmp_path, chaos_reference, monkeypatch, where) -> None:
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
        assert_same(chaos_reference["state"][key], state[key], key)
    assert [e["step"] for e in events(out, "train")] == list(range(1, STEPS + 1))
    assert {e["step"]: e["last_loss"] for e in events(out, "train")} == chaos_reference["losses"]
    cut = [10] if where == "eval" else []
    assert [e["step"] for e in events(out, "eval")] == [s for s in chaos_reference["evals"] if s not in cut]


# ---------------------------------------------------------------------------------------- precision modes
# Every precision mode a tier can choose: fp16 autocast with a GradScaler, Lion on bf16 weights (the small-card
# choice: bf16 weights, fp32 optimizer state, stochastic rounding). AdamW on bf16 weights resumes bit-identical in
# tests/test_distributed.py::test_bf16_param_replicas_stay_identical_across_a_resume (2 ranks, fp32 moments too).
PRECISION_MODES = {
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
    weights = torch.bfloat16 if "bf16" in flags else torch.float32  # fp16 autocast keeps fp32 weights
    assert {t.dtype for t in b["model"].values()} == {weights}
    if "fp16" in flags:
        assert b["scaler"]["scale"] > 0  # the GradScaler ran and its scale resumed
    assert {e["step"]: e["last_loss"] for e in events(out, "train")} == {
        e["step"]: e["last_loss"] for e in events(tmp_path / "straight", "train")}
