"""compare ranks only runs on equal footing: runs that saw different tokens, text, seed counts or steps are
flagged and no best is marked; the launcher's default budget is the same for every variant of a shape."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from conftest import plots_unrendered
from test_train import FAST

from pretrain.plan import launch
from pretrain.track.compare import main as compare_main
from pretrain.train.config import parse_config
from pretrain.train.loop import train


def _train(data: Path, out: Path, *flags: str) -> Path:
    train(parse_config(["--data", str(data), "--out-dir", str(out), *FAST, "--eval-every", "3", "--save-every", "0",
                        *flags]))
    return out


@pytest.fixture(scope="module")
def runs(byte_data, made_bytes, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("footing")
    with pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # compare reads train.jsonl, not the runs' PNGs
        return {
            "base": _train(byte_data, root / "base", "--steps", "6"),
            "gqa-short": _train(byte_data, root / "gqa-short", "--steps", "3", "--attn", "gqa", "--n-kv-head", "2"),
            "gqa-other-text": _train(made_bytes, root / "gqa-other-text", "--steps", "6", "--attn", "gqa",
                                     "--n-kv-head", "2"),
            "base-seed2": _train(byte_data, root / "base-seed2", "--steps", "6", "--seed", "2"),
        }


def _compare(capsys, *runs: Path) -> tuple[list[str], str]:
    assert compare_main([*map(str, runs), "--no-plot"]) == 0
    out = capsys.readouterr().out
    table, _, verdict = out.partition("\n\n")
    return table.splitlines(), verdict


def _marked(table: list[str]) -> list[str]:
    return [line for line in table[2:] if " * " in line or " ~ " in line or line.endswith((" *", " ~"))]


def test_runs_on_different_token_budgets_are_flagged_and_not_ranked(runs, capsys):
    table, verdict = _compare(capsys, runs["base"], runs["gqa-short"])
    assert "not on equal footing, so no best is marked" in verdict
    assert "tokens differ: base 768, gqa-short 384" in verdict and "--target-tokens" in verdict
    assert "steps completed differ: base 6/6, gqa-short 3/3" in verdict
    assert not _marked(table) and len(table) == 4


def test_runs_on_different_text_are_flagged(runs, capsys):
    _, verdict = _compare(capsys, runs["base"], runs["gqa-other-text"])
    assert "training data differ" in verdict and "tokens differ" not in verdict
    assert "no best is marked" in verdict


def test_unequal_seed_counts_are_flagged(runs, capsys):
    table, verdict = _compare(capsys, runs["base"], runs["base-seed2"], runs["gqa-other-text"])
    assert "seed counts differ: base (+1 seed) 2, gqa-other-text 1" in verdict
    assert not _marked(table)


def test_equal_footing_is_ranked_with_its_noise_said(runs, capsys):
    """Same tokens, text, steps and one seed each: ranked, with the one-seed caveat and the noise verdict."""
    assert compare_main([str(runs["base"]), str(runs["base-seed2"]), "--no-plot", "--per-seed"]) == 0
    table, _, verdict = capsys.readouterr().out.partition("\n\n")
    assert "not on equal footing" not in verdict
    assert "best val:" in verdict and "one seed each" in verdict
    assert len(_marked(table.splitlines())) == 1


def test_launcher_default_budget_is_the_same_for_every_variant(untraced_plan_memory):
    """With no --target-tokens, a variant with fewer parameters is not given fewer tokens (tiny with a 32-wide
    bottleneck: 3.31M vs the baseline's 3.33M parameters)."""
    plans = {}
    for variant in ("baseline", "bottleneck"):
        with tempfile.TemporaryDirectory() as root:
            _, plans[variant] = launch.plan_from_argv(["--vram", "24", "--size", "tiny", "--attn-dim", "32",
                                                       "--block-size", "64", "--variant", variant, "--run-root", root],
                                                      gpu=None)
    base, other = plans["baseline"], plans["bottleneck"]
    assert other.resolved.mcfg.num_params() < base.resolved.mcfg.num_params()
    assert other.planned_tokens == base.planned_tokens and other.steps == base.steps
    assert "plain baseline of this shape" in other.resolved.sources["steps"]
