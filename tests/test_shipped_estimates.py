"""The memory estimates shipped in the repo (pretrain/plan/shipped_estimates.json, made by `make plan-estimates`):
fresh, exactly what a trace gives, ignored when they do not hold for this checkout, and enough for a user's first dry
run of every GPU tier and --variant, and of the cpu tier, to trace nothing."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import count_calls

from model import ModelConfig
from pretrain.plan import estimate_cache, launch, memory, resolve
from pretrain.plan.ship_estimates import _records, imported_files, shipped_plans, shipped_text
from pretrain.train.config import TrainConfig

BODY = json.loads(estimate_cache.SHIPPED.read_text())
REGENERATE = "run `make plan-estimates`"
HOLDS_HERE = BODY["environment"] == estimate_cache.environment()
# Deep enough (5 blocks) for the extrapolated path the 1b preset takes, on a GPU tier; traced in well under a second.
TINY = ["--vram", "24", "--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "5", "--d-ff", "128",
        "--block-size", "64", "--global-batch", "2", "--json"]


@pytest.fixture
def traces(monkeypatch, tmp_path) -> list:
    """A cold user cache and no estimate in this process's; every fake-tensor trace is counted."""
    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / "cold-cache"))
    memory._cached.cache_clear()
    yield count_calls(monkeypatch, memory, "_trace")
    memory._cached.cache_clear()


def dry_run(argv: list[str], run_root: Path, capsys) -> str:
    """The --json plan as printed (key order included: a breakdown prints in the order the trace made it)."""
    memory._cached.cache_clear()
    assert launch.main([*argv, "--run-root", str(run_root)]) == 0
    return capsys.readouterr().out


def test_the_shipped_file_is_fresh():
    stale = estimate_cache.stale_files(BODY)
    if stale:
        pytest.fail(f"{estimate_cache.SHIPPED.name} is stale ({', '.join(stale)} changed): {REGENERATE}", False)
    grown = sorted(set(imported_files(sorted(BODY["files"]))) - set(BODY["imports"]))
    if grown:
        pytest.fail(f"the estimate's code now imports {', '.join(grown)}, which the shipped file has not looked at: "
                    f"{REGENERATE}", False)


@pytest.mark.skipif(not HOLDS_HERE, reason="the shipped estimates were made under another torch / Python / machine")
def test_a_first_dry_run_of_every_shipped_tier_and_variant_traces_nothing(traces, tmp_path, capsys, monkeypatch):
    assert {"16", "cpu"} <= {t for t, _ in shipped_plans()} and len({v for _, v in shipped_plans()}) >= 4
    for tier, variant in shipped_plans():
        # the cpu tier's plan follows the host's bf16 (fp32 where it is emulated): each host class's, wherever this runs
        for native in (True, False) if tier == "cpu" else (resolve.cpu_has_fast_bf16(),):
            monkeypatch.setattr(resolve, "cpu_has_fast_bf16", lambda native=native: native)
            dry_run(["--vram", tier, "--variant", variant, "--json"], tmp_path / "runs", capsys)
            if traces:
                host = f" (a host {'with' if native else 'without'} native bf16)" if tier == "cpu" else ""
                pytest.fail(f"--vram {tier} --variant {variant}{host} traced {len(traces)} estimates the shipped file "
                            f"lacks: {REGENERATE}", False)


@pytest.mark.skipif(not HOLDS_HERE, reason="the shipped estimates were made under another torch / Python / machine")
def test_a_shipped_estimate_is_what_a_trace_gives(traces, monkeypatch):
    steps = [e for e in BODY["estimates"] if e[3] == "None" and not e[4]]
    model_id, settings, seq_len, _, _, shipped = min(
        steps, key=lambda e: (e[1].get("batch_size", 1) * e[2], json.dumps(e[:2], sort_keys=True)))
    mcfg = ModelConfig.from_dict(BODY["models"][model_id])
    cfg = TrainConfig.from_dict(BODY["settings"] | settings)
    served = memory.estimate_step_memory(mcfg, cfg, seq_len)
    assert traces == [] and asdict(served) == shipped  # the entry rebuilds the key the planner computes
    monkeypatch.setenv(estimate_cache.SHIPPED_ENV, "off")
    memory._cached.cache_clear()
    traced = memory.estimate_step_memory(mcfg, cfg, seq_len)
    assert len(traces) == 1 and asdict(traced) | {"seconds": 0.0} == shipped


def test_shipped_estimates_that_do_not_hold_here_are_ignored(traces, tmp_path, monkeypatch, capsys):
    # A plan the repo does not ship, traced cold with the shipped file off; its estimates then shipped in a file of
    # their own, written by make plan-estimates' own writer.
    monkeypatch.setenv(estimate_cache.SHIPPED_ENV, "off")
    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / "traced"))
    traced = {}
    counted = memory._trace
    monkeypatch.setattr(memory, "_trace", lambda *key: traced.setdefault(key, counted(*key)))
    plan = dry_run(TINY, tmp_path / "runs", capsys)
    n = len(traces)
    assert n > 0 and len(traced) == n
    # What is tested below is whether an estimate is looked up or traced again, not the trace (that a trace gives the
    # shipped figures: the test above): a trace again is counted and gives the first trace's result (~1 CPU-s each).
    monkeypatch.setattr(memory, "_trace", lambda *key: traces.append(key) or traced[key])
    records = _records(tmp_path / "traced")
    assert len(records) == n
    good = json.loads(shipped_text(records, sorted(BODY["files"])))
    wrong_torch = good | {"environment": good["environment"] | {"torch": "0.0.1"}}
    edited = good | {"files": good["files"] | {"model/gpt.py": "0" * 64}}
    for i, (body, served) in enumerate(((good, True), (wrong_torch, False), (edited, False))):
        shipped = tmp_path / f"shipped{i}.json"
        shipped.write_text(json.dumps(body))
        monkeypatch.setenv(estimate_cache.SHIPPED_ENV, str(shipped))
        monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / f"cold{i}"))
        del traces[:]
        assert dry_run(TINY, tmp_path / "runs", capsys) == plan
        assert len(traces) == (0 if served else n), (i, len(traces))
