"""The paper comparison as README's comparing section prints it: 2 seeds of a config are one group everywhere,
the KV-settings table included, each ± a seed spread written as such."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import plots_unrendered
from test_kv_quant import SMALL

from pretrain.track.compare import main as compare_main
from pretrain.track.runlog import read_jsonl
from pretrain.train.loop import main as train_main


@pytest.fixture(scope="module")
def seed_pair(made_bytes, tmp_path_factory) -> Path:
    """Two seeds of one tiny baseline, measured with bf16, q8_0 and q4_0 caches."""
    root = tmp_path_factory.mktemp("demo") / "runs"
    with pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # compare measures the checkpoints and reads train.jsonl
        for seed in ("1", "2"):
            assert train_main(["--data", str(made_bytes), "--out-dir", str(root / f"base-s{seed}"), "--seed", seed,
                               *SMALL, "--eval-seq-lens", "16,32"]) == 0
    return root


def _kv_table(capsys, *argv: str) -> list[list[str]]:
    assert compare_main(list(argv)) == 0
    text = capsys.readouterr().out.split("KV cache settings")[1]
    lines = [ln for ln in text.splitlines()[3:] if ln.strip() and not ln.startswith("val loss vs")]
    return [re.split(r"\s{2,}", ln.strip()) for ln in lines]


def test_kv_table_spread_of_a_seed_group_is_an_unsigned_sd(seed_pair, capsys):
    rows = _kv_table(capsys, str(seed_pair), "--measure", "--measure-lengths", "32", "--decode-tokens", "2",
                     "--kv-cache", "bf16,q8_0,q4_0", "--quality-tokens", "64", "--no-plot")
    assert [r[2] for r in rows] == ["bf16", "q8_0", "q4_0"] and all("(+1 seed)" in r[0] for r in rows)
    q4 = rows[2]
    # the change keeps its sign, its spread over the seeds has none and says it is one
    assert re.fullmatch(r"[+-]\d\.\d{4} ± \d\.\d{4} sd", q4[-1]), q4
    assert re.fullmatch(r"\d+\.\d{4} ± \d\.\d{4} sd", q4[-2]), q4


def test_per_length_loss_carries_its_standard_error(seed_pair, capsys):
    """One run's val@<length> is ± its standard error over the same targets, as its best val is."""
    assert compare_main([str(seed_pair), "--no-plot", "--per-seed"]) == 0
    lines = capsys.readouterr().out.partition("\n\n")[0].splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    row = dict(zip(header, re.split(r"\s{2,}", lines[2].strip()), strict=True))
    last = [e for e in read_jsonl(seed_pair / "base-s1" / "train.jsonl") if e["type"] == "eval_lengths"][-1]
    for n in ("16", "32"):
        assert row[f"val@{n}"] == f"{last['loss'][n]:.4f} ± {last['loss_se'][n]:.4f} se", row
