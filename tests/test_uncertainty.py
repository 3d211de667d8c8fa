"""Error bars: val loss ± its standard error over eval batches, downstream accuracy ± its binomial error (also when
scored standalone, recorded in the run), seed groups as mean ± sd with n, and compare saying when the lowest
val loss is inside the noise."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import plots_unrendered
from test_train import FAST

from pretrain.evals import downstream
from pretrain.track.compare import main as compare_main
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import parse_config
from pretrain.train.loop import train


def _train(data: Path, out: Path, *flags: str) -> Path:
    train(parse_config(["--data", str(data), "--out-dir", str(out), *FAST, "--steps", "6", "--eval-every", "3",
                        "--eval-iters", "4", *flags]))
    return out


@pytest.fixture(scope="module")
def grid(byte_data, tmp_path_factory) -> Path:
    """2 variants x 2 seeds, tiny, on CPU."""
    root = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # what is read here: train.jsonl, compare's table
        for variant, flags in (("base", []), ("gqa", ["--attn", "gqa", "--n-kv-head", "2"])):
            for seed in (1, 2):
                _train(byte_data, root / f"{variant}-s{seed}", "--seed", str(seed), *flags)
    return root


def _evals(run: Path) -> list[dict]:
    return [e for e in read_jsonl(run / "train.jsonl") if e["type"] == "eval"]


def test_val_loss_carries_its_standard_error_and_compare_prints_it(grid, capsys):
    evals = _evals(grid / "base-s1")
    assert all(0 < e["loss_se"] < 0.5 * e["loss"] for e in evals)
    assert compare_main([str(grid / "base-s1"), "--no-plot"]) == 0
    (row,) = capsys.readouterr().out.splitlines()[2:3]
    best = min(evals, key=lambda e: e["loss"])
    assert f"{best['loss']:.4f} ± {best['loss_se']:.4f} se" in row


def test_one_eval_batch_has_no_standard_error(byte_data, tmp_path):
    run = _train(byte_data, tmp_path / "one", "--eval-iters", "1", "--steps", "1")
    assert all(e["loss_se"] is None for e in _evals(run))


def test_seed_groups_are_mean_sd_and_n_and_the_ranking_uses_their_spread(grid, capsys):
    assert compare_main([str(grid), "--no-plot"]) == 0
    table, _, verdict = capsys.readouterr().out.partition("\n\n")
    lines = table.splitlines()
    header = lines[0].split()
    assert "seeds" in header
    for variant in ("base", "gqa"):
        (line,) = [ln for ln in lines if ln.startswith(f"{variant}-s1 (+1 seed)")]
        best = [min(e["loss"] for e in _evals(grid / f"{variant}-s{s}")) for s in (1, 2)]
        assert f"{statistics.fmean(best):.4f} ± {statistics.stdev(best):.4f} sd" in line
        assert "  2  " in line  # n
    assert "not on equal footing" not in verdict and "one seed each" not in verdict
    assert "best val:" in verdict and ("inside the noise" in verdict or "standard errors of the difference" in verdict)


def test_a_lead_inside_the_noise_is_not_a_winner(grid, capsys):
    """Two seeds of one config as two rows: whatever separates them is noise, and compare says so when the gap is
    under 2 standard errors (here the eval errors alone, so an honest test picks runs whose gap is small)."""
    rows = {s: min(e["loss"] for e in _evals(grid / f"base-s{s}")) for s in (1, 2)}
    ses = {s: min(_evals(grid / f"base-s{s}"), key=lambda e: e["loss"])["loss_se"] for s in (1, 2)}
    inside = abs(rows[1] - rows[2]) <= 2 * math.hypot(ses[1], ses[2])
    assert compare_main([str(grid / "base-s1"), str(grid / "base-s2"), "--no-plot", "--per-seed"]) == 0
    table, _, verdict = capsys.readouterr().out.partition("\n\n")
    assert ("inside the noise" in verdict and "marked ~" in verdict) == inside
    assert ("marked *" in verdict) == (not inside)
    assert sum(" ~" in ln or " *" in ln for ln in table.splitlines()[2:]) == 1


def test_standalone_downstream_is_recorded_with_its_binomial_error_and_compared(grid, tmp_path, capsys):
    items = tmp_path / "mc.jsonl"
    rows = [{"ctx": f"Chapter {i}: the king", "endings": ["ruled the land", "qzx vvk", "ploom", "rrrr tt"],
             "label": i % 4} for i in range(12)]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = grid / "gqa-s2"
    assert downstream.main([str(run), "--hellaswag", str(items), "--checkpoint", "last", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    (event,) = [e for e in read_jsonl(run / "train.jsonl") if e["type"] == "downstream"]
    p = event["acc_norm"]
    assert event["n"] == 12 and event["step"] == 6
    assert event["acc_norm_se"] == pytest.approx(math.sqrt(p * (1 - p) / 12))
    assert printed["acc_norm_se"] == event["acc_norm_se"]
    assert compare_main([str(run), "--no-plot"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "acc_norm" in table[0] and f"{p:.3f} ± {event['acc_norm_se']:.3f} se" in table[2]
