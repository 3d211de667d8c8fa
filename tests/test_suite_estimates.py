"""The suite's own memory estimates (tests/suite_estimates.py, tests/data/suite_estimates.json): put in a session's
cache only while they hold for this checkout, and then served exactly as a trace gives them."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import suite_estimates
from conftest import count_calls

from model import ModelConfig
from pretrain.plan import estimate_cache, memory
from pretrain.train.config import TrainConfig


@pytest.fixture
def traces(monkeypatch, tmp_path) -> list:
    """A cold cache, the product's shipped estimates off, every fake-tensor trace counted."""
    monkeypatch.setenv(estimate_cache.SHIPPED_ENV, "off")
    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / "cold"))
    memory._cached.cache_clear()
    yield count_calls(monkeypatch, memory, "_trace")
    memory._cached.cache_clear()


def fields(est: memory.MemoryEstimate) -> dict:
    return asdict(est) | {"seconds": 0.0}  # how long a trace took is not a result


def test_preloaded_estimates_are_served_untraced_only_while_the_file_holds(traces, tmp_path, monkeypatch):
    mcfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=64, n_head=4, n_layer=2, d_ff=128, block_size=32)
    cfg = TrainConfig(batch_size=2)
    traced = memory.estimate_step_memory(mcfg, cfg, 16)
    assert len(traces) == 1
    path = tmp_path / "suite.json"
    assert suite_estimates.save(tmp_path / "cold", path) == 1  # the writer `make test` uses to keep them
    good = json.loads(path.read_text())
    edited = good | {"files": good["files"] | {"model/gpt.py": "0" * 64}}
    other_torch = good | {"environment": good["environment"] | {"torch": "0.0.1"}}
    for i, (body, why_not) in enumerate(((good, None), (edited, "model/gpt.py changed"), (other_torch, "0.0.1"))):
        f = tmp_path / f"suite{i}.json"
        f.write_text(json.dumps(body))
        monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / f"session{i}"))
        memory._cached.cache_clear()
        n, reason = suite_estimates.preload(f)
        del traces[:]
        assert fields(memory.estimate_step_memory(mcfg, cfg, 16)) == fields(traced)
        if why_not is None:
            assert (n, reason, len(traces)) == (1, None, 0)
        else:
            assert n == 0 and why_not in reason and len(traces) == 1, (n, reason, traces)


def test_the_repos_suite_estimate_is_what_a_trace_gives(traces):
    body = estimate_cache.read_shipped(suite_estimates.FILE)
    reason = suite_estimates.why_not_used(body)
    if reason is not None:
        pytest.skip(f"{suite_estimates.FILE.name} is not used here ({reason}): the suite traces its estimates")
    assert body is not None
    steps = [e for e in body["estimates"] if e[3] == "None" and not e[4]]
    model_id, settings, seq_len, _, _, kept = min(
        steps, key=lambda e: (e[1].get("batch_size", 1) * e[2], json.dumps(e[:2], sort_keys=True)))
    mcfg = ModelConfig.from_dict(body["models"][model_id])
    cfg = TrainConfig.from_dict(body["settings"] | settings)
    assert fields(memory.estimate_step_memory(mcfg, cfg, seq_len)) == kept | {"seconds": 0.0}
    assert len(traces) == 1


@pytest.mark.parametrize("native_bf16", [True, False])
def test_a_save_keeps_the_other_host_classs_estimates_traced_again(native_bf16, traces, tmp_path, monkeypatch):
    """The cpu tier autocasts where bf16 is native and trains in fp32 where it is emulated, so each host class's run
    plans estimates the other's does not: a save keeps the other class's from the file it replaces (traced again
    under this code, not copied), and drops this class's that no test asked for."""
    from pretrain.plan import resolve

    monkeypatch.setattr(resolve, "cpu_has_fast_bf16", lambda: native_bf16)
    mcfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=64, n_head=4, n_layer=2, d_ff=128, block_size=32)
    other, stale, this = (TrainConfig(batch_size=b, amp=amp)
                          for b, amp in ((2, not native_bf16), (3, native_bf16), (2, native_bf16)))
    want = fields(memory.estimate_step_memory(mcfg, other, 16))
    memory.estimate_step_memory(mcfg, stale, 16)
    path = tmp_path / "suite.json"
    assert suite_estimates.save(tmp_path / "cold", path) == 2
    body = json.loads(path.read_text())
    for entry in body["estimates"]:  # as if made by other code: a copy would keep these
        entry[-1] = entry[-1] | {"tensor_peak_bytes": 1}
    path.write_text(json.dumps(body))

    monkeypatch.setenv(estimate_cache.CACHE_ENV, str(tmp_path / "next"))
    memory._cached.cache_clear()
    memory.estimate_step_memory(mcfg, this, 16)
    del traces[:]
    assert suite_estimates.save(tmp_path / "next", path) == 2
    assert len(traces) == 1  # the other class's, traced again
    saved = json.loads(path.read_text())
    kept = {((saved["settings"] | e[1])["batch_size"], (saved["settings"] | e[1])["amp"]): e[-1]
            for e in saved["estimates"]}
    assert set(kept) == {(2, native_bf16), (2, not native_bf16)}  # not (3, native_bf16): no test asked for it
    assert kept[2, not native_bf16] == want
