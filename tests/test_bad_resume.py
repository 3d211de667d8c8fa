"""Rerunning a command over an existing run dir, and the checkpoints a resume must refuse or skip: a finished
run is left alone, --overwrite removes only what the trainer wrote, malformed or hostile checkpoints are skipped
for the newest good one (or refused in one line when named), and failures are blamed on what caused them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN
from faults import full_disk

from pretrain.errors import run_cli
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import checkpoint_paths, load_checkpoint

TINY = TINY_TRAIN


def _train_main(argv: list[str]) -> int:
    from pretrain.train.loop import main

    return run_cli(main, argv)


def _export_main(argv: list[str]) -> int:
    from pretrain.export import main

    return run_cli(main, argv)


# ------------------------------------------------------------------------------- what a rerun may not change
def _copy_run(world: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return run


def test_rerunning_a_finished_run_says_complete_and_writes_nothing(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file()}
    assert _train_main(["--data", str(world["data"]), "--out-dir", str(run), "--steps", "2", *TINY]) == 0
    out = capsys.readouterr().err
    assert "complete" in out and "2 of 2 steps" in out, out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file()} == before


def test_overwrite_removes_only_what_the_trainer_wrote(world, tmp_path):
    run = _copy_run(world, tmp_path)
    mine = {"my_model.pt": b"user weights", "diagram.png": b"user picture", "notes.md": b"user notes"}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    argv = ["--data", str(world["data"]), "--out-dir", str(run), *TINY, "--steps", "1", "--resume", "never",
            "--overwrite", "--keep-last", "0"]
    assert _train_main(argv) == 0
    for name, data in mine.items():
        assert (run / name).read_bytes() == data, f"{name} was deleted or changed"
    assert not (run / "step_2.pt").exists(), "the previous run's own checkpoint should be gone"


def test_log_without_checkpoint_restarts_as_a_fresh_run_of_the_same_command(world, tmp_path, capsys):
    """What a SIGTERM/kill before the first save leaves: a log (meta, maybe train lines), no checkpoint."""
    run = _copy_run(world, tmp_path)
    for p in run.glob("*.pt"):
        p.unlink()
    argv = ["--data", str(world["data"]), "--out-dir", str(run), "--steps", "2", *TINY]
    assert _train_main(argv) == 0, capsys.readouterr().err
    assert "no checkpoint" in capsys.readouterr().err

    kinds = [e["type"] for e in read_jsonl(run / "train.jsonl")]
    assert kinds.count("meta") == 1 and kinds.count("end") == 1 and "resume" not in kinds, kinds
    # Another experiment's log is still protected.
    for p in run.glob("*.pt"):
        p.unlink()
    assert _train_main([*argv, "--lr", "1e-3"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------- malformed (but loadable) checkpoints: 12.9
def _break(state: dict, how: str) -> dict:

    s = {**state, "model": dict(state["model"]), "sampler": dict(state["sampler"])}
    if how == "missing optimizer":
        del s["optimizer"]
    elif how == "wrong shape":
        s["model"]["lm_head.weight" if "lm_head.weight" in s["model"] else next(iter(s["model"]))] = torch.zeros(3, 3)
    elif how == "negative sampler index":
        s["sampler"]["index"] = -5
    elif how == "nan weights":
        k = next(k for k, v in s["model"].items() if v.is_floating_point())
        s["model"][k] = torch.full_like(s["model"][k], float("nan"))
    elif how == "absurd step":
        s["step"] = 10**9
    elif how == "no lr_horizon":  # every checkpoint this trainer writes holds it
        del s["lr_horizon"]
    elif how == "positional optimizer state":  # optimizer.state_dict()'s own layout; checkpoints key by name
        s["optimizer"] = {**s["optimizer"], "state": dict(enumerate(s["optimizer"]["state"].values()))}
    return s


@pytest.mark.parametrize("how", ["missing optimizer", "wrong shape", "negative sampler index", "nan weights",
                                 "absurd step", "positional optimizer state", "no lr_horizon"])
def test_malformed_checkpoint_is_skipped_for_the_newest_good_one(world, tmp_path, capsys, how):


    run = tmp_path / "run"
    argv = ["--data", str(world["data"]), "--out-dir", str(run), *TINY, "--save-every", "1", "--keep-last", "3"]
    assert _train_main([*argv, "--steps", "2"]) == 0
    good = load_checkpoint(run / "step_1.pt")
    for name in ("last.pt", "step_2.pt", "best.pt"):
        (run / name).unlink(missing_ok=True)
        torch.save(_break(load_checkpoint(run / "step_1.pt") | {"step": 2}, how), run / name)
    capsys.readouterr()
    assert _train_main([*argv, "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "skipping checkpoint" in err, err
    from pretrain.track.runlog import read_jsonl

    resumes = [e["step"] for e in read_jsonl(run / "train.jsonl") if e["type"] == "resume"]
    assert resumes == [good["step"]], resumes
    assert load_checkpoint(run / "last.pt")["step"] == 3
    # Named explicitly, the same file is refused in one line.
    torch.save(_break(good | {"step": 2}, how), run / "bad.pt")
    assert _train_main([*argv, "--steps", "4", "--resume", str(run / "bad.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot resume from")


# ------------------------------------------------------------------------------- blame: 12.11, 11.11
def test_diverged_weights_are_not_blamed_on_the_disk(world, tmp_path, capsys):
    argv = ["--data", str(world["data"]), "--out-dir", str(tmp_path / "run"), *TINY, "--steps", "4",
            "--lr", "3e38", "--warmup-steps", "0", "--grad-clip", "0", "--max-bad-steps", "0"]
    assert _train_main(argv) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert "diverged" in text and "--lr" in text and "free disk space" not in text, text


def test_full_disk_is_named_not_torch_internals(world, tmp_path, capsys, monkeypatch):
    """The disk fills during a checkpoint write: torch 2.13's zip writer reports the short write as "[enforce
    fail at inline_container.cc:672] unexpected pos"; the user must read that the disk is full, and what to do."""
    import errno

    from pretrain.track.runlog import RunLog

    full_disk(monkeypatch, free_bytes=100_000)  # the checkpoint is ~300 KB
    argv = ["--data", str(world["data"]), "--out-dir", str(tmp_path / "run"), *TINY, "--steps", "2"]
    assert _train_main(argv) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert "inline_container" not in text and "unexpected pos" not in text, text
    warning = [line for line in text.splitlines() if line.startswith("warning: checkpoint write")]
    assert warning and "No space left on device: the disk of" in warning[0], text
    final = [line for line in text.splitlines() if line.startswith("error: could not save step 2")]
    assert final and "free disk space, then rerun" in final[0], text
    # The run log hitting the full disk: one line, exit 2, no traceback.
    monkeypatch.undo()
    real_event = RunLog.event

    def event(self, type, **fields):
        if type == "train":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_event(self, type, **fields)

    monkeypatch.setattr(RunLog, "event", event)
    assert _train_main([*argv[:3], str(tmp_path / "run2"), *argv[4:]]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: no space left") and "free disk space" in last, err


class _ShellPayload:
    """Unpickling this would run a shell command (creating `marker`); os.* is what real payloads call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refused_checkpoint_is_named_refused_not_truncated_and_never_runs(world, tmp_path, capsys):
    """A checkpoint whose pickle calls os.system: weights_only loading refuses it. The trainer (named with
    --resume, or found as last.pt) and export must say it was refused, not that it is truncated; with a good step
    file beside it the rerun resumes from that; with every candidate hostile there is nothing to resume: one
    clear error, nothing overwritten, nothing run. (That the payload is live: test_checkpoint.py's control.)"""
    run = _copy_run(world, tmp_path)
    marker = tmp_path / "ran"
    torch.save({**load_checkpoint(run / "last.pt"), "x": _ShellPayload(marker)}, run / "evil.pt")
    argv = ["--data", str(world["data"]), "--out-dir", str(run), *TINY, "--steps", "3"]
    assert _train_main([*argv, "--resume", str(run / "evil.pt")]) == 2
    assert _export_main([str(run), "--out", str(tmp_path / "hf"), "--checkpoint", str(run / "evil.pt")]) == 2
    for line in capsys.readouterr().err.splitlines():
        assert line.startswith("error: checkpoint") and "evil.pt was refused" in line, line
        assert "truncated" not in line and "not made by this trainer or was tampered with" in line, line
    (run / "evil.pt").replace(run / "last.pt")  # the resume point itself: skipped, the step file resumes
    assert _train_main(argv) == 0
    err = capsys.readouterr().err
    assert "skipping unloadable checkpoint: checkpoint" in err and "last.pt was refused" in err, err
    assert "was refused: it holds Python objects" in err and "nothing in it was run" in err, err
    assert "truncated" not in err and not marker.exists()
    assert [e["step"] for e in read_jsonl(run / "train.jsonl") if e["type"] == "resume"] == [2]

    good = load_checkpoint(run / "last.pt")
    for path in [run / "last.pt", *checkpoint_paths(run)["numbered"]]:  # new inodes: hard links keep their bytes
        torch.save({**good, "x": _ShellPayload(marker)}, run / "planted.tmp")
        os.replace(run / "planted.tmp", path)
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    assert _train_main([*argv[:-1], "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error:") and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    assert not marker.exists()
