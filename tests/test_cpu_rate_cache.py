"""A CPU plan's time (pretrain/plan/cpu_rate.py): a dry run times no step and says its time is the FLOP estimate and
how to measure it; --probe's measured rates are kept in the user's cache, a later dry run (a new process) shows them
and says where they came from; a rate timed on another host, with another thread count, by other code or on a busy
machine (for a quiet one) is not used; every repo file a timed step runs is in the key."""

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
from pretrain.plan import plan as plan_module
from pretrain.plan.plan import CPU_KEPT, CPU_NOT_TIMED
from pretrain.plan.probe import Stepper
from pretrain.train.config import TrainConfig
from pretrain.train.host_alloc import THP_ENV

ROOT = Path(__file__).resolve().parents[1]
# One phase of a tiny model with a byte vocabulary: --probe times ~0.5 s of millisecond steps (CPU_MIN_SECONDS).
SMALL = ["--vram", "cpu", "--size", "tiny", "--vocab-size", "256", "--d-model", "64", "--n-head", "4", "--n-layer",
         "2", "--d-ff", "128", "--block-size", "64", "--seq-schedule", "32@0", "--steps", "20"]


@pytest.fixture
def probes(tmp_path, monkeypatch) -> list:
    """A cold rate cache in tmp_path, no rate in this process's memory, a quiet machine, every --probe counted, and
    no step run in the launcher's process (only --probe's child steps). The memory estimates are the session's
    (tests/conftest.py; not what these tests are about)."""
    estimate_cache.cache_dir().mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "plan-memory").symlink_to(estimate_cache.cache_dir(), target_is_directory=True)
    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(THP_ENV, os.environ.get(THP_ENV, "1"))  # as the launcher's entry sets it (a key part)
    monkeypatch.setattr(cpu_rate, "_load", lambda: 0.0)  # a quiet machine, whatever else the host runs now

    def no_step(*args, **kwargs):
        raise AssertionError("the launcher stepped a model in its own process")

    monkeypatch.setattr(Stepper, "step", no_step)
    cpu_rate._host_and_code.cache_clear()
    yield count_calls(monkeypatch, plan_module, "probe_plan")
    cpu_rate._host_and_code.cache_clear()


def dry_run(tmp_path: Path, capsys, monkeypatch, *extra: str) -> dict:
    """The launcher's main (--json), as a new process starts it: no rate in memory (the disk cache is tested)."""
    monkeypatch.setattr(cpu_rate, "_kept", {})
    cpu_rate._host_and_code.cache_clear()
    assert launch.main([*SMALL, "--json", "--run-root", str(tmp_path / "runs"), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def rates(plan: dict) -> list[float]:
    return [p["tokens_per_second"] for p in plan["phases"]]


def estimated(plan: dict) -> bool:
    """The plan's time is the FLOP estimate, saying it was not timed and how to time it."""
    return plan["estimate"]["rate_how"].endswith(f"x MFU: {CPU_NOT_TIMED}") and \
        rates(plan) == [p["flops_tokens_per_second"] for p in plan["phases"]]


def test_a_cold_dry_run_times_no_step_and_says_its_time_is_the_flop_estimate(probes, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cpu_rate, "_kept", {})
    assert launch.main([*SMALL, "--run-root", str(tmp_path / "runs")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  time: "))
    assert "= tokens x FLOPs/token / (" in line and "x MFU 0.4 [" in line
    assert line.endswith("; not timed on this CPU, and a small model's step can be several times slower than its "
                         "FLOPs (loss, optimizer, Python overhead): add --probe to time real steps of each phase; "
                         "later dry runs of these settings on this host show that rate (after --run, the trainer's "
                         "own)")
    assert estimated(dry_run(tmp_path, capsys, monkeypatch))
    assert not probes and not (tmp_path / "cache" / cpu_rate.FOLDER).exists()


def test_probe_keeps_its_rates_and_a_later_dry_run_says_where_they_came_from(probes, tmp_path, capsys, monkeypatch):
    probed = dry_run(tmp_path, capsys, monkeypatch, "--probe")
    assert len(probes) == 1 and probed["estimate"]["rate_how"] == ("measured by --probe (real steps on this device); "
                                                                   f"{CPU_KEPT}")
    stored = sorted((tmp_path / "cache" / cpu_rate.FOLDER).glob("*.json"))
    assert len(stored) == 1
    # A new process of the launcher's script: the rate comes from the disk, as it was timed, and the plan says so.
    done = subprocess.run([sys.executable, "run_1b_launch.py", *SMALL, "--json", "--run-root", str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    second = json.loads(done.stdout)
    assert rates(second) == rates(probed)
    when = json.loads(stored[0].read_text())["rate"]["measured_at"]
    assert second["estimate"]["rate_how"] == ("measured: real steps of each phase timed on this CPU by --probe: "
                                              f"cached from {when} on {cpu_rate.platform.node()}")
    # A damaged entry is not a rate: the estimate again, until --probe times it.
    stored[0].write_text("{not json")
    assert estimated(dry_run(tmp_path, capsys, monkeypatch)) and len(probes) == 1


def test_a_rate_from_another_host_threads_or_code_is_not_used(probes, tmp_path, capsys, monkeypatch):
    kept = rates(dry_run(tmp_path, capsys, monkeypatch, "--probe"))
    assert rates(dry_run(tmp_path, capsys, monkeypatch)) == kept  # the same host, threads and code: the kept rate
    with monkeypatch.context() as m:  # another machine with the same cache folder (a shared home directory)
        m.setattr(cpu_rate.platform, "node", lambda: "another-host")
        assert estimated(dry_run(tmp_path, capsys, monkeypatch))
    with monkeypatch.context() as m:  # the same name, another CPU
        m.setattr(cpu_rate, "_cpuinfo", lambda: ("Another CPU", "sse2"))
        assert estimated(dry_run(tmp_path, capsys, monkeypatch))
    real_hashes = estimate_cache.file_hashes
    with monkeypatch.context() as m:  # an edited model file
        m.setattr(estimate_cache, "file_hashes",
                  lambda files: real_hashes(files) | {"model/gpt.py": "0" * 64})
        assert estimated(dry_run(tmp_path, capsys, monkeypatch))
    threads = torch.get_num_threads()
    try:  # another thread count (OMP_NUM_THREADS, another machine's cores)
        torch.set_num_threads(threads + 1)
        assert estimated(dry_run(tmp_path, capsys, monkeypatch))
    finally:
        torch.set_num_threads(threads)
    assert estimated(dry_run(tmp_path, capsys, monkeypatch, "--batch-size", "4"))  # another step: 4 x 2, not 8 x 1
    assert rates(dry_run(tmp_path, capsys, monkeypatch)) == kept  # back on this host, code and threads
    assert len(probes) == 1


def test_a_rate_timed_on_a_busy_machine_is_used_only_while_it_is_busy(probes, tmp_path, capsys, monkeypatch):
    busy = 4.0 * (os.cpu_count() or 1)
    monkeypatch.setattr(cpu_rate, "_load", lambda: busy)
    dry_run(tmp_path, capsys, monkeypatch, "--probe")
    busy_plan = dry_run(tmp_path, capsys, monkeypatch)
    assert busy_plan["estimate"]["rate_how"].endswith(f" (timed while busy: load {busy:.1f} on {os.cpu_count()} CPUs)")
    monkeypatch.setattr(cpu_rate, "_load", lambda: 0.0)
    assert estimated(dry_run(tmp_path, capsys, monkeypatch))  # quiet now: not a busy machine's figure
    dry_run(tmp_path, capsys, monkeypatch, "--probe")  # its own figure replaces the busy one
    quiet = dry_run(tmp_path, capsys, monkeypatch)["estimate"]["rate_how"]
    assert "cached from" in quiet and "busy" not in quiet
    assert len(probes) == 2 and len(list((tmp_path / "cache" / cpu_rate.FOLDER).glob("*.json"))) == 1


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
