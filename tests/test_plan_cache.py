"""A dry run served from the estimate cache (pretrain/plan/estimate_cache.py): the same plan without one fake-tensor
estimate and without importing torch's MemTracker; the key is exact (code or arguments change: recomputed)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import count_calls

from model import ModelConfig
from pretrain.plan import estimate_cache, launch, memory
from pretrain.plan.memory import estimate_step_memory
from pretrain.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# A small model deep enough (5 blocks) to take the extrapolated path the 1b preset takes, on a GPU tier.
ARGV = ["--vram", "24", "--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "5", "--d-ff", "128",
        "--block-size", "64", "--global-batch", "2", "--json"]


def dry_run(warm, capsys) -> dict:
    memory._cached.cache_clear()  # this process's cache would hide the disk's
    assert launch.main([*ARGV, "--run-root", str(warm[2])]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(a cache dir filled by one cold dry run, that run's JSON, the run root every dry run here plans in)."""
    root = tmp_path_factory.mktemp("warm")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv(estimate_cache.CACHE_ENV, str(root / "cache"))
        memory._cached.cache_clear()
        assert launch.main([*ARGV, "--run-root", str(root / "runs")]) == 0
    return root / "cache", json.loads(out.getvalue()), root / "runs"


@pytest.fixture
def cache(warm, tmp_path, monkeypatch) -> Path:
    """A copy of the warm cache, in use."""
    shutil.copytree(warm[0], tmp_path / "cache")
    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "plan-memory"


def counting(monkeypatch) -> list:
    return count_calls(monkeypatch, memory, "_estimate")


def test_second_dry_run_is_served_from_the_cache(warm, cache, tmp_path, capsys, monkeypatch):
    assert sorted(cache.glob("*.json"))  # one file per estimate the cold plan made
    calls = counting(monkeypatch)
    assert dry_run(warm, capsys) == warm[1]  # peaks, breakdowns (their key order), all
    assert calls == []


def test_a_code_or_argument_change_recomputes(cache, monkeypatch):
    mcfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=32, n_head=2, n_layer=1, d_ff=64, block_size=16)
    calls = counting(monkeypatch)
    def estimate(batch: int):  # the figures, not how long the estimate took
        return replace(estimate_step_memory(mcfg, TrainConfig(batch_size=batch), 16), seconds=0)

    first = estimate(2)
    memory._cached.cache_clear()
    assert estimate(2) == first and len(calls) == 1  # from disk
    # Another repo state (an edited model or optimizer file) must not reuse figures computed by the old code.
    monkeypatch.setattr(estimate_cache, "code_fingerprint", lambda: "another checkout")
    memory._cached.cache_clear()
    assert estimate(2) == first and len(calls) == 2
    # Other arguments: their own estimates (and no two argument lists share a key by concatenation).
    assert estimate(3) != first and len(calls) == 3
    assert estimate_cache.key("a", "b") != estimate_cache.key("a", "c")
    assert estimate_cache.key("a\0c") != estimate_cache.key("a", "c") != estimate_cache.key("a,c")


def test_damaged_cache_files_are_recomputed_and_replaced(warm, cache, tmp_path, capsys, monkeypatch):
    files = sorted(cache.glob("*.json"))
    files[0].write_text("{not json")
    files[1].write_text(json.dumps({"key": "someone else's", "estimate": {"tensor_peak_bytes": 1}}))
    files[2].write_text(json.dumps({"key": files[2].stem, "estimate": {"unknown_field": 1}}))
    calls = counting(monkeypatch)
    assert dry_run(warm, capsys) == warm[1]
    assert len(calls) == 3
    for f in files[:3]:
        assert json.loads(f.read_text())["key"] == f.stem


def test_unwritable_cache_still_estimates(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(blocker))  # a file where the folder should be
    memory._cached.cache_clear()
    mcfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=32, n_head=2, n_layer=1, d_ff=64, block_size=16)
    assert estimate_step_memory(mcfg, TrainConfig(batch_size=2), 16).tensor_peak_bytes > 0


def test_cached_dry_run_does_not_import_the_memory_tracker(warm, cache, tmp_path, capsys):
    """The launcher imports torch's MemTracker (~1.5 s) only to compute an estimate: not for a cached plan."""
    code = ("import sys; from pretrain.plan.launch import main; "
            f"main({[*ARGV, '--run-root', str(warm[2])]!r}); "
            "sys.exit(3 if 'torch.distributed._tools.mem_tracker' in sys.modules else 0)")
    env = os.environ | {estimate_cache.CACHE_ENV: str(cache.parent)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == warm[1]
