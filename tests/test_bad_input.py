"""Every CLI, every user mistake: one readable line naming the problem, exit code 2, no traceback, and
nothing already on disk changed. Table-driven over prepare, launch, train, compare and export."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

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
    return ["--data", str(w["data"]), "--out-dir", str(w["base"] / "runs" / out), *TINY, *extra]


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
                                          "existing file"),
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
