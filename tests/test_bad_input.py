"""Every CLI, every user mistake: one readable line naming the problem, exit code 2, no traceback, and
nothing already on disk changed. Table-driven over prepare, launch, train, compare and export.

Each case runs the CLI's main as its script does (run_cli, an argparse exit taken as the exit code, as the
interpreter takes it), without a new interpreter per case; one case per script runs as a real process, so the
scripts' own wiring is pinned too. Refused resumes and reruns: test_bad_resume.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_TRAIN, cli_exit

from pretrain.data.entry import main as prepare_main
from pretrain.plan.entry import main as launch_main
from pretrain.train.entry import main as train_main

PY = sys.executable
TRAIN = str(ROOT / "train_v29.py")
TINY = TINY_TRAIN


def export_main(argv: Sequence[str] | None = None) -> int:
    from pretrain.export import main

    return main(argv)


def compare_main(argv: Sequence[str]) -> int:
    return launch_main(["compare", *argv])  # `run_1b_launch.py compare ...`


@pytest.fixture(scope="module")
def more(world) -> dict[str, Path]:
    """Datasets and paths for more cases: same size but other content, another vocab, bad ids."""
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


def _launch(w: dict, *extra: str) -> list[str]:
    return ["--vram", "cpu", "--data", str(w["data"]), *extra]


# name: (main, argv from (world, more), what the line must say)
CASES = {
    # prepare_fineweb.py
    "prepare: tokens not a number": (prepare_main, lambda w, m: ["--tokens", "lots", "--output", str(w["base"] / "o")],
                                     "not a number"),
    "prepare: negative tokens": (prepare_main, lambda w, m: ["--tokens=-5M", "--output", str(w["base"] / "o")],
                                 "positive"),
    "prepare: missing source": (prepare_main, lambda w, m: ["--tokens", "1K", "--source", str(w["base"] / "no.parquet"),
                                                            "--output", str(w["base"] / "o")], "no such file"),
    "prepare: output is a user dir": (prepare_main, lambda w, m: ["--tokens", "1K", "--source",
                                                                  str(w["notes"] / "keep.txt"), "--output",
                                                                  str(w["notes"])], "notes"),
    "prepare: negative workers": (prepare_main, lambda w, m: ["--tokens", "1K", "--output", str(w["base"] / "o"),
                                                              "--workers", "-1"], "--workers"),
    "prepare: unknown flag": (prepare_main, lambda w, m: ["--tokens", "1K", "--output", str(w["base"] / "o"),
                                                          "--tokenz", "1M"], "unrecognized"),
    # run_1b_launch.py
    "launch: junk token budget": (launch_main, lambda w, m: _launch(w, "--val-frac", "0.05", "--target-tokens", "ten"),
                                  "not a number"),
    "launch: schedule beyond block": (launch_main, lambda w, m: _launch(w, "--seq-schedule", "8192@0"), "block"),
    "launch: kv heads not dividing": (launch_main, lambda w, m: _launch(w, "--variant", "gqa", "--n-kv-head", "3"),
                                      "divide"),
    "launch: odd RoPE dim": (launch_main, lambda w, m: _launch(w, "--d-model", "36", "--n-head", "4"), "RoPE"),
    "launch: missing data with --run": (launch_main, lambda w, m: ["--vram", "cpu", "--data",
                                                                   str(w["base"] / "nodata"), "--run"],
                                        "does not exist"),
    "launch: unknown tier": (launch_main, lambda w, m: ["--vram", "12", "--data", str(w["data"])], "tier"),
    # train_v29.py
    "train: missing data": (train_main, lambda w, m: ["--data", str(w["base"] / "nodata"), "--out-dir",
                                                      str(w["base"] / "r1")], "does not exist"),
    "train: no --data": (train_main, lambda w, m: ["--out-dir", str(w["base"] / "runs" / "nd")], "--data is required"),
    "train: vocab mismatch": (train_main, lambda w, m: ["--data", str(w["data"]), "--vocab-size", "100", "--out-dir",
                                                        str(w["base"] / "r2"), *TINY], "vocab"),
    "train: fewer tokens than a batch": (train_main, lambda w, m: ["--data", str(w["small"]), "--out-dir",
                                                                   str(w["base"] / "r3"), *TINY, "--batch-size", "64"],
                                         "fewer than one batch"),
    "train: corrupt manifest": (train_main, lambda w, m: ["--data", str(w["broken"]), "--out-dir",
                                                          str(w["base"] / "r4")], "manifest"),
    "train: shards of mixed dtype": (train_main, lambda w, m: ["--data", str(w["mixed"] / "*.npy"), "--out-dir",
                                                               str(w["base"] / "r5"), *TINY], "dtype"),
    "train: zero batch size": (train_main, lambda w, m: ["--data", str(w["data"]), "--batch-size", "0"], "batch-size"),
    "train: missing resume file": (train_main, lambda w, m: ["--data", str(w["data"]), "--resume",
                                                             str(w["base"] / "nope.pt"), "--out-dir",
                                                             str(w["base"] / "r6"), *TINY], "no such checkpoint"),
    "train: fresh start over a run": (train_main, lambda w, m: ["--data", str(w["data"]), "--out-dir", str(w["run"]),
                                                                "--resume", "never", *TINY], "--overwrite"),
    "train: incompatible resume": (train_main, lambda w, m: ["--data", str(w["data"]), "--out-dir", str(w["run"]),
                                                             *TINY, "--d-ff", "256", "--steps", "4"], "d_ff"),
    "train: resume with another --lr": (train_main, lambda w, m: ["--data", str(w["data"]), "--out-dir", str(w["run"]),
                                                                  *TINY, "--steps", "4", "--lr", "1e-2"], "lr"),
    "train: fp16 with bf16 weights": (train_main, lambda w, m: ["--param-dtype", "bf16", "--amp-dtype", "fp16"],
                                      "GradScaler"),
    # 12.7: every numeric flag checked at parse time, naming the flag
    "train: negative grad clip": (train_main, lambda w, m: _tr(w, "--grad-clip", "-1"), "--grad-clip"),
    "train: lr nan": (train_main, lambda w, m: _tr(w, "--lr", "nan"), "--lr"),
    "train: lr inf": (train_main, lambda w, m: _tr(w, "--lr", "inf"), "--lr"),
    "train: beta1 above 1": (train_main, lambda w, m: _tr(w, "--beta1", "2"), "--beta1"),
    "train: negative eps": (train_main, lambda w, m: _tr(w, "--eps", "-1"), "--eps"),
    "train: weight decay nan": (train_main, lambda w, m: _tr(w, "--weight-decay", "nan"), "--weight-decay"),
    "train: negative save minutes": (train_main, lambda w, m: _tr(w, "--save-minutes", "-1"), "--save-minutes"),
    # 12.8: checks that used to come after the run dir was written
    "train: negative eval seq len on a run": (train_main, lambda w, m: _tr(w, "--eval-seq-len", "-5", out="done"),
                                              "--eval-seq-len"),
    "train: val split below one eval batch": (train_main, lambda w, m: ["--data", str(m["tiny_val"]), "--out-dir",
                                                                        str(w["base"] / "runs" / "tv"), *TINY,
                                                                        "--val-frac", "0.01"], "eval batch"),
    # 12.6: ids the embedding cannot index
    "train: token id >= vocab": (train_main, lambda w, m: ["--data", str(m["ids300"]), "--out-dir",
                                                           str(w["base"] / "runs" / "ids"), *TINY], "token id 300"),
    # 12.12 / 12.11: resuming on other data, or data of another tokenizer
    "train: resume on shuffled data": (train_main, lambda w, m: ["--data", str(m["shuffled"]), "--out-dir",
                                                                 str(w["run"]), *TINY, "--steps", "4"],
                                       "--allow-data-change"),
    "train: resume on another tokenizer's data": (train_main, lambda w, m: ["--data", str(m["vocab512"]),
                                                                            "--out-dir", str(w["run"]), *TINY,
                                                                            "--steps", "4"], "vocab_size 256 -> 512"),
    # 12.11: wrong places to write
    "train: --out-dir is a file": (train_main, lambda w, m: _tr(w, out="../a_file.txt"), "is a file"),
    "train: --init-from with broken config": (train_main, lambda w, m: _tr(w, "--init-from", str(m["bad_hf"])),
                                              "--init-from"),
    # compare
    "compare: no such run": (compare_main, lambda w, m: [str(w["base"] / "runs" / "nope")], "nope"),
    "compare: not a run dir": (compare_main, lambda w, m: [str(w["notes"])], "notes"),
    # export
    "export: no such run": (export_main, lambda w, m: [str(w["base"] / "nope"), "--out", str(w["base"] / "hf1")],
                            "nope"),
    "export: would overwrite": (export_main, lambda w, m: [str(w["run"]), "--out", str(w["hf_out"])], "--overwrite"),
    "export: --out is an existing file": (export_main, lambda w, m: [str(w["run"]), "--out", str(m["a_file"])],
                                          "is a file"),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line(err: str, expect: str, name: str = "") -> None:
    assert "Traceback" not in err and err.startswith("error:"), err
    assert err.rstrip("\n").count("\n") == 0, f"{name}: more than one line:\n{err}"
    assert expect.lower() in err.lower(), err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_changed(name, world, more, capsys):
    main, args, expect = CASES[name]
    before = _snapshot(world["base"])
    code = cli_exit(main, args(world, more))
    err = capsys.readouterr().err
    assert code == 2, f"{name}: exit {code}\n{err}"
    assert_one_line(err, expect, name)
    assert _snapshot(world["base"]) == before, f"{name}: files changed on disk"


# One case per script, as a process: what the interpreter prints and exits with (script_exit_code's wiring).
SCRIPTS = {
    "prepare_fineweb.py": (["prepare_fineweb.py", "--tokens", "lots", "--output", "{tmp}/o"], "not a number"),
    "run_1b_launch.py": (["run_1b_launch.py", "--vram", "cpu", "--stepz", "5"], "unrecognized arguments: --stepz"),
    "train_v29.py": (["train_v29.py", "--data", "{tmp}/missing", "--out-dir", "{tmp}/r"], "missing"),
    "-m pretrain.export": (["-m", "pretrain.export", "{tmp}/nope", "--out", "{tmp}/hf"], "nope"),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_script_reports_bad_input_in_one_line_exit_2(script, tmp_path):
    argv, expect = SCRIPTS[script]
    proc = subprocess.run([PY, *(a.replace("{tmp}", str(tmp_path)) for a in argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, expect, script)
    assert list(tmp_path.iterdir()) == [], "a refused command wrote something"


def test_read_only_run_dir_is_one_line_before_anything_is_written(world, tmp_path, capsys, monkeypatch):
    import errno

    import pretrain.train.run_dir as run_dir

    def read_only(*a, **k):  # root ignores chmod, so the temp file's failure stands in for a read-only mount
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run_dir.tempfile, "mkstemp", read_only)
    assert cli_exit(train_main, ["--data", str(world["data"]), "--out-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not writable" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_compare_reads_a_run_with_malformed_meta(world, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    lines = (run / "train.jsonl").read_text().splitlines()
    meta = json.loads(lines[0])
    lines[0] = json.dumps({**meta, "model_config": "garbled", "train_config": [1, 2]})
    (run / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert cli_exit(compare_main, [str(run), "--no-plot"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.err.count("\n") == 1 and "malformed" in out.err, out.err
    assert run.name in out.out


def test_compare_json_into_a_closed_pipe_ends_quietly(world):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) is gone before the first byte
    proc = subprocess.run([PY, str(ROOT / "run_1b_launch.py"), "compare", str(world["run"]), "--json", "--no-plot"],
                          cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
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
