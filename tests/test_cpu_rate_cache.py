"""A CPU plan's measured step rates kept in the user's cache (pretrain/plan/cpu_rate.py): a second dry run, in a new
process, times no step and says where its rates come from; a rate timed on another host, with another thread count
or by other code is not used; every repo file a timed step runs is in the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import count_calls

from model import ModelConfig
from pretrain.plan import cpu_rate, estimate_cache, launch
from pretrain.plan.probe import Stepper
from pretrain.train.config import TrainConfig
from pretrain.train.host_alloc import THP_ENV

ROOT = Path(__file__).resolve().parents[1]
# One phase of a tiny model with a byte vocabulary: a timing is ~0.5 s of millisecond steps (RATE_MIN_SECONDS).
SMALL = ["--vram", "cpu", "--size", "tiny", "--vocab-size", "256", "--d-model", "64", "--n-head", "4", "--n-layer",
         "2", "--d-ff", "128", "--block-size", "64", "--seq-schedule", "32@0", "--steps", "20", "--json"]


@pytest.fixture
def timings(tmp_path, monkeypatch) -> list:
    """A cold rate cache in tmp_path, no rate in this process's memory, and every timing of steps counted. The memory
    estimates are the session's (tests/conftest.py; not what these tests are about)."""
    estimate_cache.cache_dir().mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "plan-memory").symlink_to(estimate_cache.cache_dir(), target_is_directory=True)
    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(THP_ENV, os.environ.get(THP_ENV, "1"))  # as the launcher's entry sets it (a key part)
    monkeypatch.setattr(cpu_rate, "_timed", {})
    monkeypatch.setattr(cpu_rate, "_load", lambda: 0.0)  # a quiet machine, whatever else the host runs now
    cpu_rate._host_and_code.cache_clear()
    yield count_calls(monkeypatch, cpu_rate, "_time")
    cpu_rate._host_and_code.cache_clear()


def dry_run(tmp_path: Path, capsys, monkeypatch) -> dict:
    """The launcher's main, as a new process starts it: no rate in memory (the disk cache is what is tested)."""
    monkeypatch.setattr(cpu_rate, "_timed", {})
    cpu_rate._host_and_code.cache_clear()
    assert launch.main([*SMALL, "--run-root", str(tmp_path / "runs")]) == 0
    return json.loads(capsys.readouterr().out)


def rates(plan: dict) -> list[float]:
    return [p["tokens_per_second"] for p in plan["phases"]]


def test_a_second_dry_run_reads_the_timed_rate_and_says_where_it_came_from(timings, tmp_path, capsys, monkeypatch):
    first = dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 1 and first["estimate"]["rate_how"].startswith("measured: timed real steps")
    assert "timed by this dry run" in first["estimate"]["rate_how"]
    stored = sorted((tmp_path / "cache" / cpu_rate.FOLDER).glob("*.json"))
    assert len(stored) == 1
    # A new process of the launcher's script: the rate comes from the disk, as it was timed, and the plan says so.
    done = subprocess.run([sys.executable, "run_1b_launch.py", *SMALL, "--run-root", str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    second = json.loads(done.stdout)
    assert rates(second) == rates(first)
    when = json.loads(stored[0].read_text())["rate"]["measured_at"]
    assert second["estimate"]["rate_how"].endswith(f"cached from {when} on {cpu_rate.platform.node()}")
    assert "timed by this dry run" not in second["estimate"]["rate_how"]
    # A damaged entry is timed again and replaced.
    stored[0].write_text("{not json")
    third = dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 2 and "timed by this dry run" in third["estimate"]["rate_how"]
    assert json.loads(stored[0].read_text())["key"] == stored[0].stem


def test_a_rate_from_another_host_threads_or_code_is_not_used(timings, tmp_path, capsys, monkeypatch):
    dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 1
    dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 1  # the same host, threads and code: read from the cache
    with monkeypatch.context() as m:  # another machine with the same cache folder (a shared home directory)
        m.setattr(cpu_rate.platform, "node", lambda: "another-host")
        dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 2
    with monkeypatch.context() as m:  # the same name, another CPU
        m.setattr(cpu_rate, "_cpuinfo", lambda: ("Another CPU", "sse2"))
        dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 3
    real_hashes = estimate_cache.file_hashes
    with monkeypatch.context() as m:  # an edited model file
        m.setattr(estimate_cache, "file_hashes",
                  lambda files: real_hashes(files) | {"model/gpt.py": "0" * 64})
        dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 4
    threads = torch.get_num_threads()
    try:  # another thread count (OMP_NUM_THREADS, another machine's cores)
        torch.set_num_threads(threads + 1)
        dry_run(tmp_path, capsys, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert len(timings) == 5
    dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 5  # back on this host, code and threads: its own rate is still there
    assert len(list((tmp_path / "cache" / cpu_rate.FOLDER).glob("*.json"))) == 5


def test_a_rate_timed_on_a_busy_machine_is_reused_only_while_it_is_busy(timings, tmp_path, capsys, monkeypatch):
    busy = 4.0 * (os.cpu_count() or 1)
    monkeypatch.setattr(cpu_rate, "_load", lambda: busy)
    plan = dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 1 and "while the machine was busy" in plan["estimate"]["rate_how"]
    plan = dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 1 and f"(timed while busy: load {busy:.1f}" in plan["estimate"]["rate_how"]
    monkeypatch.setattr(cpu_rate, "_load", lambda: 0.0)
    plan = dry_run(tmp_path, capsys, monkeypatch)  # quiet now: its own figure, which replaces the busy one
    assert len(timings) == 2 and "timed by this dry run (kept" in plan["estimate"]["rate_how"]
    dry_run(tmp_path, capsys, monkeypatch)
    assert len(timings) == 2


def test_every_repo_file_a_timed_step_runs_is_in_the_rate_key():
    """A timed step's code is fingerprinted by folder (cpu_rate.RATE_CODE): a file it runs outside them would let an
    edit to it keep a stale rate."""
    mcfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=32, n_head=2, n_layer=2, d_ff=64, block_size=16)
    ran: set[str] = set()

    def profile(frame, event, arg):
        ran.add(frame.f_code.co_filename)

    for settings in ({}, {"param_dtype": "bf16", "optimizer": "lion"}, {"grad_checkpoint": True, "amp": False},
                     {"amp_dtype": "fp16"}):
        cfg = TrainConfig(size="tiny", batch_size=2, device="cpu", **settings)
        sys.settrace(profile)
        try:
            Stepper(mcfg, cfg, torch.device("cpu")).step(2, 16, 1)
        finally:
            sys.settrace(None)
    paths = [Path(f).resolve() for f in ran if f.endswith(".py") and Path(f).is_absolute()]
    env = Path(sys.prefix).resolve()  # a virtualenv inside the clone (`make venv` puts .venv there) is not its code
    files = {str(p.relative_to(ROOT)) for p in paths if p.is_relative_to(ROOT) and not p.is_relative_to(env)
             and "site-packages" not in p.parts}
    assert files and "model/gpt.py" in files
    assert files <= set(cpu_rate.code_files()), sorted(files - set(cpu_rate.code_files()))
