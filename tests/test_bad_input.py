"""Every CLI, every user mistake: one readable line naming the problem, exit code 2, no traceback, and
nothing already on disk changed. Table-driven over prepare, launch, train, compare and export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, full_disk

PY = sys.executable
PREPARE, LAUNCH, TRAIN = str(ROOT / "prepare_fineweb.py"), str(ROOT / "run_1b_launch.py"), str(ROOT / "train_v29.py")
EXPORT = ["-m", "pretrain.export"]
TINY = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--layers", "1", "--d-ff", "128", "--block", "64",
        "--batch-size", "2", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "1", "--device", "cpu",
        "--live", "off", "--save-minutes", "0", "--eval-every", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, byte_data) -> dict[str, Path]:
    """Things a user might point a CLI at: a finished run, a non-dataset dir, broken datasets."""
    from pretrain.train.config import parse_config
    from pretrain.train.loop import train

    base = tmp_path_factory.mktemp("bad")
    run = base / "runs" / "done"
    train(parse_config(["--data", str(byte_data), "--out-dir", str(run), "--steps", "2", *TINY]))
    notes = base / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("user file")
    broken = base / "broken_manifest"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    mixed = base / "mixed"
    mixed.mkdir()
    np.save(mixed / "train_a.npy", np.arange(1000, dtype=np.uint16))
    np.save(mixed / "train_b.npy", np.arange(1000, dtype=np.uint32))
    for f in ("train_a.npy", "train_b.npy"):
        (mixed / (f + ".meta")).write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256, "eot_id": 0}))
    small = base / "small.npy"
    np.save(small, np.arange(40, dtype=np.uint16) % 256)
    Path(str(small) + ".meta").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256, "eot_id": 0}))
    hf_out = base / "hf_out"
    hf_out.mkdir()
    (hf_out / "config.json").write_text("{}")
    return {"base": base, "run": run, "notes": notes, "broken": broken, "mixed": mixed, "small": small,
            "data": byte_data, "hf_out": hf_out}


def _case(cli: list[str], args: Callable[[dict], list[str]], expect: str) -> tuple:
    return cli, args, expect


CASES = {
    # prepare_fineweb.py
    "prepare: tokens not a number": _case([PREPARE], lambda w: ["--tokens", "lots", "--output", str(w["base"] / "o")],
                                          "not a number"),
    "prepare: negative tokens": _case([PREPARE], lambda w: ["--tokens=-5M", "--output", str(w["base"] / "o")],
                                      "positive"),
    "prepare: missing source": _case([PREPARE], lambda w: ["--tokens", "1K", "--source", str(w["base"] / "no.parquet"),
                                                           "--output", str(w["base"] / "o")], "no such file"),
    "prepare: output is a user dir": _case([PREPARE], lambda w: ["--tokens", "1K", "--source",
                                                                 str(w["notes"] / "keep.txt"), "--output",
                                                                 str(w["notes"])], "notes"),
    "prepare: negative workers": _case([PREPARE], lambda w: ["--tokens", "1K", "--output", str(w["base"] / "o"),
                                                             "--workers", "-1"], "--workers"),
    "prepare: unknown flag": _case([PREPARE], lambda w: ["--tokens", "1K", "--output", str(w["base"] / "o"),
                                                         "--tokenz", "1M"], "unrecognized"),
    # run_1b_launch.py
    "launch: junk token budget": _case([LAUNCH], lambda w: ["--vram", "cpu", "--data", str(w["data"]), "--val-frac",
                                                            "0.05", "--target-tokens", "ten"], "not a number"),
    "launch: schedule beyond block": _case([LAUNCH], lambda w: ["--vram", "cpu", "--data", str(w["data"]),
                                                                "--seq-schedule", "8192@0"], "block"),
    "launch: kv heads not dividing": _case([LAUNCH], lambda w: ["--vram", "cpu", "--data", str(w["data"]), "--variant",
                                                                "gqa", "--kv-head", "3"], "divide"),
    "launch: odd RoPE dim": _case([LAUNCH], lambda w: ["--vram", "cpu", "--data", str(w["data"]), "--d-model", "36",
                                                       "--n-head", "4"], "RoPE"),
    "launch: missing data with --run": _case([LAUNCH], lambda w: ["--vram", "cpu", "--data", str(w["base"] / "nodata"),
                                                                  "--run"], "does not exist"),
    "launch: unknown tier": _case([LAUNCH], lambda w: ["--vram", "12", "--data", str(w["data"])], "tier"),
    # train_v29.py
    "train: missing data": _case([TRAIN], lambda w: ["--data", str(w["base"] / "nodata"), "--out-dir",
                                                     str(w["base"] / "r1")], "does not exist"),
    "train: vocab mismatch": _case([TRAIN], lambda w: ["--data", str(w["data"]), "--vocab-size", "100", "--out-dir",
                                                       str(w["base"] / "r2"), *TINY], "vocab"),
    "train: fewer tokens than a batch": _case([TRAIN], lambda w: ["--data", str(w["small"]), "--out-dir",
                                                                  str(w["base"] / "r3"), *TINY, "--batch-size", "64"],
                                              "fewer than one batch"),
    "train: corrupt manifest": _case([TRAIN], lambda w: ["--data", str(w["broken"]), "--out-dir",
                                                         str(w["base"] / "r4")], "manifest"),
    "train: shards of mixed dtype": _case([TRAIN], lambda w: ["--data", str(w["mixed"] / "*.npy"), "--out-dir",
                                                              str(w["base"] / "r5"), *TINY], "dtype"),
    "train: zero batch size": _case([TRAIN], lambda w: ["--data", str(w["data"]), "--batch-size", "0"], "batch-size"),
    "train: missing resume file": _case([TRAIN], lambda w: ["--data", str(w["data"]), "--resume",
                                                            str(w["base"] / "nope.pt"), "--out-dir",
                                                            str(w["base"] / "r6"), *TINY], "no such checkpoint"),
    "train: fresh start over a run": _case([TRAIN], lambda w: ["--data", str(w["data"]), "--out-dir", str(w["run"]),
                                                               "--resume", "never", *TINY], "--overwrite"),
    "train: incompatible resume": _case([TRAIN], lambda w: ["--data", str(w["data"]), "--out-dir", str(w["run"]),
                                                            *TINY, "--d-ff", "256", "--steps", "4"], "d_ff"),
    "train: fp16 with bf16 weights": _case([TRAIN], lambda w: ["--param-dtype", "bf16", "--amp-dtype", "fp16"],
                                           "GradScaler"),
    # compare
    "compare: no such run": _case([LAUNCH, "compare"], lambda w: [str(w["base"] / "runs" / "nope")], "nope"),
    "compare: not a run dir": _case([LAUNCH, "compare"], lambda w: [str(w["notes"])], "notes"),
    # export
    "export: no such run": _case(EXPORT, lambda w: [str(w["base"] / "nope"), "--out", str(w["base"] / "hf1")], "nope"),
    "export: would overwrite": _case(EXPORT, lambda w: [str(w["run"]), "--out", str(w["hf_out"])], "--overwrite"),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_changed(name, world):
    cli, args, expect = CASES[name]
    before = _snapshot(world["base"])
    proc = subprocess.run([PY, *cli, *args(world)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err}"
    assert "Traceback" not in err and err.startswith("error:"), err
    assert err.rstrip("\n").count("\n") == 0, f"{name}: more than one line:\n{err}"
    assert expect.lower() in err.lower(), err
    assert _snapshot(world["base"]) == before, f"{name}: files changed on disk"


# ------------------------------------------------------------------------ in-process: trainer, compare, export
# The same promise, through each CLI's main (run_cli: what the script runs) without a new interpreter per case.
def _train_main(argv: list[str]) -> int:
    from pretrain.cli import run_cli
    from pretrain.train.loop import main

    return run_cli(main, argv)


def _export_main(argv: list[str]) -> int:
    from pretrain.cli import run_cli
    from pretrain.export import main

    return run_cli(main, argv)


@pytest.fixture(scope="module")
def more(world) -> dict[str, Path]:
    """Datasets and paths for the in-process cases: same size but other content, another vocab, bad ids."""
    base = world["base"]
    tokens = np.load(world["data"])
    meta = json.loads(Path(str(world["data"]) + ".meta").read_text())
    out: dict[str, Path] = {}
    for name, arr, vocab in (("shuffled", np.random.default_rng(0).permutation(tokens), 256),
                             ("vocab512", tokens, 512), ("ids300", np.where(tokens == ord(" "), 300, tokens), 256)):
        p = base / name / "tokens.npy"
        p.parent.mkdir()
        np.save(p, arr.astype(np.uint16))
        Path(str(p) + ".meta").write_text(json.dumps({**meta, "vocab_size": vocab}))
        out[name] = p
    tiny_val = base / "tiny_val" / "tokens.npy"
    tiny_val.parent.mkdir()
    np.save(tiny_val, tokens[:3000])
    Path(str(tiny_val) + ".meta").write_text(json.dumps(meta))
    out["tiny_val"] = tiny_val
    out["bad_hf"] = base / "bad_hf"
    out["bad_hf"].mkdir()
    (out["bad_hf"] / "config.json").write_text("{not json")
    out["a_file"] = base / "a_file.txt"
    out["a_file"].write_text("not a run dir")
    return out


def _tr(w: dict, *extra: str, out: str = "fresh") -> list[str]:
    return ["--data", str(w["data"]), "--out-dir", str(w["base"] / "runs" / out), *TINY, "--steps", "2", *extra]


INPROCESS = {
    # 12.7: every numeric flag checked at parse time, naming the flag
    "train: negative grad clip": (_train_main, lambda w, m: _tr(w, "--grad-clip", "-1"), "--grad-clip"),
    "train: lr nan": (_train_main, lambda w, m: _tr(w, "--lr", "nan"), "--lr"),
    "train: lr inf": (_train_main, lambda w, m: _tr(w, "--lr", "inf"), "--lr"),
    "train: beta1 above 1": (_train_main, lambda w, m: _tr(w, "--beta1", "2"), "--beta1"),
    "train: negative eps": (_train_main, lambda w, m: _tr(w, "--eps", "-1"), "--eps"),
    "train: weight decay nan": (_train_main, lambda w, m: _tr(w, "--weight-decay", "nan"), "--weight-decay"),
    "train: negative save minutes": (_train_main, lambda w, m: _tr(w, "--save-minutes", "-1"), "--save-minutes"),
    # 12.8: checks that used to come after the run dir was written
    "train: negative eval seq len on a run": (_train_main, lambda w, m: _tr(w, "--eval-seq-len", "-5", "--steps", "2",
                                                                        out="done"), "--eval-seq-len"),
    "train: val split below one eval batch": (_train_main, lambda w, m: ["--data", str(m["tiny_val"]), "--out-dir",
                                                                        str(w["base"] / "runs" / "tv"), *TINY,
                                                                        "--val-frac", "0.01"], "eval batch"),
    # 12.6: ids the embedding cannot index
    "train: token id >= vocab": (_train_main, lambda w, m: ["--data", str(m["ids300"]), "--out-dir",
                                                            str(w["base"] / "runs" / "ids"), *TINY], "token id 300"),
    # 12.12 / 12.11: resuming on other data, or data of another tokenizer
    "train: resume on shuffled data": (_train_main, lambda w, m: ["--data", str(m["shuffled"]), "--out-dir",
                                                                  str(w["run"]), *TINY, "--steps", "4"],
                                       "--allow-data-change"),
    "train: resume on another tokenizer's data": (_train_main, lambda w, m: ["--data", str(m["vocab512"]),
                                                                             "--out-dir", str(w["run"]), *TINY,
                                                                             "--steps", "4"], "vocab_size 256 -> 512"),
    # 12.11: wrong places to write
    "train: --out-dir is a file": (_train_main, lambda w, m: _tr(w, out="../a_file.txt"), "is a file"),
    "train: --init-from with broken config": (_train_main, lambda w, m: _tr(w, "--init-from", str(m["bad_hf"])),
                                              "--init-from"),
    "export: --out is an existing file": (_export_main, lambda w, m: [str(w["run"]), "--out", str(m["a_file"])],
                                          "is a file"),
    # 11.11
    "train: no --data": (_train_main, lambda w, m: ["--out-dir", str(w["base"] / "runs" / "nd")], "--data is required"),
}


@pytest.mark.parametrize("name", list(INPROCESS))
def test_bad_input_in_process_is_one_line_exit_2_nothing_changed(name, world, more, capsys):
    main, args, expect = INPROCESS[name]
    before = _snapshot(world["base"])
    code = main(args(world, more))
    err = capsys.readouterr().err
    assert code == 2, f"{name}: exit {code}\n{err}"
    assert "Traceback" not in err and err.startswith("error:"), err
    assert err.rstrip("\n").count("\n") == 0, f"{name}: more than one line:\n{err}"
    assert expect.lower() in err.lower(), err
    assert _snapshot(world["base"]) == before, f"{name}: files changed on disk"


# ------------------------------------------------------------------------------- what a rerun may not change
def _copy_run(world: dict, tmp_path: Path) -> Path:
    import shutil

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
    from pretrain.track.runlog import read_jsonl

    kinds = [e["type"] for e in read_jsonl(run / "train.jsonl")]
    assert kinds.count("meta") == 1 and kinds.count("end") == 1 and "resume" not in kinds, kinds
    # Another experiment's log is still protected.
    for p in run.glob("*.pt"):
        p.unlink()
    assert _train_main([*argv, "--lr", "1e-3"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------- malformed (but loadable) checkpoints: 12.9
def _break(state: dict, how: str) -> dict:
    import torch

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
    import torch

    from pretrain.train.checkpoint import load_checkpoint

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


def test_refused_checkpoint_is_named_refused_not_truncated(world, tmp_path, capsys):
    """A checkpoint whose pickle calls os.system: weights_only loading refuses it. The trainer (named with
    --resume, or found as last.pt) and export must say it was refused, not that it is truncated."""
    import torch

    from pretrain.train.checkpoint import load_checkpoint

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
    assert "truncated" not in err and not marker.exists()


def test_read_only_run_dir_is_one_line_before_anything_is_written(world, tmp_path, capsys, monkeypatch):
    import errno

    import pretrain.train.rundir as rundir

    def read_only(*a, **k):  # root ignores chmod, so the probe's failure stands in for a read-only mount
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    assert _train_main(["--data", str(world["data"]), "--out-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not writable" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_compare_reads_a_run_with_malformed_meta(world, tmp_path, capsys):
    from pretrain.cli import run_cli
    from pretrain.plan.launch import main as launch_main

    run = _copy_run(world, tmp_path)
    lines = (run / "train.jsonl").read_text().splitlines()
    meta = json.loads(lines[0])
    lines[0] = json.dumps({**meta, "model_config": "garbled", "train_config": [1, 2]})
    (run / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert run_cli(launch_main, ["compare", str(run), "--no-plot"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.err.count("\n") == 1 and "malformed" in out.err, out.err
    assert run.name in out.out


def test_compare_json_into_a_closed_pipe_ends_quietly(world):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) is gone before the first byte
    proc = subprocess.run([PY, LAUNCH, "compare", str(world["run"]), "--json", "--no-plot"], cwd=ROOT,
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_help_shows_defaults_and_the_compare_subcommand(capsys):
    from pretrain.plan.launch import build_parser as launch_parser
    from pretrain.train.config import build_parser

    trainer = " ".join(build_parser().format_help().split())
    assert "(default: 1.0)" in trainer and "(default: 1000)" in trainer and "(default: adamw)" in trainer
    assert "the run" in trainer.split("--max-bad-steps")[-1][:200] and "reload" not in trainer
    assert "compare" in launch_parser().format_help()


# --------------------------------------------------------- 19.8: sizes read from files, bounded before allocating
def _limited_memory() -> None:
    import resource

    # 6 GB of address space: what these files asked for (hundreds of GB) fails fast instead of swapping the host
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _run_limited(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited_memory)


@pytest.mark.parametrize("how", ["huge model", "huge block", "shapes differ"])
def test_generate_refuses_a_checkpoint_whose_model_config_the_weights_do_not_back(world, tmp_path, how):
    """A 3 KB checkpoint whose model_config describes a huge model made generate allocate until it died."""
    import torch

    from pretrain.train.checkpoint import load_checkpoint

    state = load_checkpoint(world["run"] / "last.pt")
    change = {"huge model": {"n_layer": 4096, "d_model": 8192, "d_ff": 32768, "n_head": 64, "n_kv_head": 64},
              "huge block": {"block_size": 1 << 40}, "shapes differ": {"d_ff": 64}}[how]
    run = tmp_path / "run"
    run.mkdir()
    torch.save({**state, "model_config": {**state["model_config"], **change}}, run / "last.pt")
    proc = _run_limited(["-m", "pretrain.generate", str(run), "--prompt", "The", "--max-new-tokens", "4",
                         "--tokenizer", "bytes"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert str(run / "last.pt") in proc.stderr and "model_config" in proc.stderr, proc.stderr


def test_a_manifest_with_an_absurd_vocab_is_one_line_before_anything_is_written(tmp_path):
    """vocab_size 2**31 in a manifest: the trainer wrote its lock, then tried to allocate ~550 GB."""
    from test_data import make_dataset

    data = make_dataset(tmp_path / "ds", train_sizes=(3_000,), val_sizes=(2_000,), dtype="uint32", vocab=2**31)
    proc = _run_limited([TRAIN, "--data", str(data), "--out-dir", str(tmp_path / "run"), *TINY, "--steps", "2"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "vocab_size 2,147,483,648" in proc.stderr and str(data / "manifest.json") in proc.stderr
    assert not (tmp_path / "run").exists()
