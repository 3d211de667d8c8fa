"""The embedded demo (`make demo`) and the bundled data/sample it trains on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, trainers_in_process

from pretrain import demo
from pretrain.data.dataset import open_dataset
from pretrain.errors import EXIT_STOPPED, run_cli
from pretrain.track.runlog import read_jsonl

SAMPLE = ROOT / "data" / "sample"


def test_sample_opens_is_small_and_gpt2():
    ds = open_dataset(str(SAMPLE))
    assert (ds.tokenizer, ds.vocab_size, ds.eot_id, ds.dtype) == ("gpt2", 50257, 50256, "uint16")
    assert ds.val_tokens > 0 and ds.train_tokens >= 1_000_000
    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    assert manifest["tokenizer"] == "gpt2" and manifest["complete"]
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) < 5_000_000


def test_sample_matches_its_provenance():
    """PROVENANCE.md's checksums and token counts are those of the shards in the repo."""
    text = (SAMPLE / "PROVENANCE.md").read_text()
    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    for shard in manifest["shards"]:
        digest = hashlib.sha256((SAMPLE / shard["file"]).read_bytes()).hexdigest()
        row = next(line for line in text.splitlines() if line.startswith(f"| `{shard['file']}`"))
        assert digest in row and f"{shard['tokens']:,}" in row


def test_sample_is_not_git_ignored():
    files = [str(p.relative_to(ROOT)) for p in SAMPLE.iterdir()] + ["data/README.md"]
    proc = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.stdout.strip() == "", f"ignored by .gitignore: {proc.stdout}"


def _evals(run_dir) -> list[float]:
    return [e["loss"] for e in read_jsonl(run_dir / "train.jsonl") if e["type"] == "eval"]


def test_demo_command_trains_reports_and_reruns_as_complete(tmp_path):
    """`python -m pretrain.demo` as `make demo` runs it, shortened through PRETRAIN_DEMO_STEPS, from another
    directory (the package found as an installed one would be: on the path, not in the working directory)."""
    env = {**os.environ, demo.STEPS_ENV: "30", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pretrain.demo", "--run-root", str(tmp_path / "runs")]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny-baseline-demo"
    assert (run_dir / "last.pt").exists()
    for name in ("summary.md", "loss.png", "train.jsonl"):
        assert (run_dir / name).exists() and f"runs/tiny-baseline-demo/{name}" in first.stdout, name  # cwd-relative
    end = [e for e in read_jsonl(run_dir / "train.jsonl") if e["type"] == "end"][-1]
    assert end["status"] == "completed" and end["step"] == 30
    meta = next(e for e in read_jsonl(run_dir / "train.jsonl") if e["type"] == "meta")
    assert meta["train_config"]["seq_schedule"] == "128@0" and meta["train_config"]["lr"] == 3e-3
    losses = _evals(run_dir)
    assert losses[-1] < losses[0] - 1.5, losses  # ~10.8 (= ln 50257) at init
    assert re.search(r"val loss \d+\.\d+ -> \d+\.\d+", first.stdout)
    assert "run_1b_launch.py compare" in first.stdout and "loss.png" in (run_dir / "summary.md").read_text()

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already completed" in again.stdout
    assert _evals(run_dir) == losses  # nothing retrained


@pytest.mark.parametrize("argv, needle", [(["--data", "{tmp}"], "manifest.json"), (["--steps", "0"], "--steps")])
def test_demo_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--run-root", str(tmp_path / "runs")]
    assert run_cli(demo.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_demo_stopped_by_ctrl_c_says_how_to_resume_and_exits_75(tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGINT) mid-run: the trainer saves, the demo says to rerun and exits EXIT_STOPPED, not 0."""
    from pretrain.data import loader as data_mod

    original, calls = data_mod.Prefetcher.next, {"n": 0}

    def next_then_ctrl_c(self, batch_size, seq_len):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size, seq_len)

    trainers_in_process(monkeypatch)  # the launcher's trainer in this process, so the Ctrl-C lands mid-run
    monkeypatch.setattr(data_mod.Prefetcher, "next", next_then_ctrl_c)
    assert demo.main(["--steps", "6", "--run-root", str(tmp_path)]) == EXIT_STOPPED
    out, err = capsys.readouterr()
    assert "saved step 2" in out + err and "demo: stopped before the end" in err, out + err
    assert err.rstrip().endswith("rerun the same command to resume"), err
