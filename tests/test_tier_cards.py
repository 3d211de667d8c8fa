"""Cards the tiers name: one compute-capability rule for bf16 in plan and trainer, plans for a named card
(--gpu) that say what fits a pre-Ampere card, the Colab notebook's plan on a free T4, and docs/tiers.md's
cards and host-RAM table held equal to the plan's --json."""

from __future__ import annotations

import io
import json
import re

import nbformat
import pytest
import torch
from conftest import ROOT

import pretrain.plan.launch as launch
from pretrain.errors import run_cli
from pretrain.plan.tiers import TIERS, card_named
from pretrain.plan.view import fmt_bytes, render_plan
from pretrain.train import device as dev
from pretrain.train.loop import main as train_main

# The 1b model at a fixed short step: the split and checkpointing are given, so the plan estimates few steps.
CHEAP = ["--batch-size", "1", "--grad-accum", "1", "--grad-checkpoint", "--train-seq-len", "64", "--steps", "2"]


def test_trainer_refuses_bf16_on_a_card_below_ampere(byte_data, tmp_path, monkeypatch, capsys) -> None:
    """torch.cuda.is_bf16_supported() says True on a T4 (emulated); the trainer uses the plan's rule instead."""
    monkeypatch.setattr(dev, "compute_capability", lambda device: (7, 5), raising=False)
    out = tmp_path / "run"
    code = run_cli(train_main, ["--data", str(byte_data), "--out-dir", str(out), "--size", "tiny", "--steps", "2",
                                "--device", "cpu", "--amp", "--amp-dtype", "bf16", "--param-dtype", "bf16",
                                "--live", "off", "--val-frac", "0.05"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "compute capability 7.5" in err[0] and "--amp-dtype fp16 --param-dtype fp32" in err[0]
    assert not out.exists()
    assert not dev.supports_bf16(torch.device("cuda"))  # the plan's cards use the same rule:
    assert not card_named("T4").has_bf16 and card_named("A100 80GB").has_bf16


def test_run_on_a_t4_is_refused_in_one_line_naming_what_fits(byte_data, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(launch, "detect_gpu", lambda: card_named("Tesla T4"))
    argv = ["--data", str(byte_data), "--val-frac", "0.05", "--vocab-size", "50257", *CHEAP,
            "--run-root", str(tmp_path), "--run"]
    assert run_cli(launch.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the plan does not fit"), err
    assert "--param-dtype bf16" not in err[0], "bf16 weights were never tried: fp16 autocast needs fp32 weights"
    assert "T4 (compute capability 7.5) has no bf16" in err[0] and "--size small fits" in err[0]
    assert not any(tmp_path.iterdir())


def _notebook_plan_args() -> list[str]:
    nb = nbformat.read(ROOT / "notebooks" / "colab_quickstart.ipynb", as_version=4)
    settings: dict = {}
    exec(next(c for c in nb.cells if c.cell_type == "code").source, settings)  # the form: plain assignments
    return settings["PLAN_ARGS"]


def test_colab_notebook_plans_a_run_that_fits_a_free_t4(tmp_path) -> None:
    ns, plan = launch.plan_from_argv([*_notebook_plan_args(), "--gpu", "T4", "--run-root", str(tmp_path)])
    assert plan.tier.name == "16" and plan.cfg.amp_dtype == "fp16" and plan.cfg.param_dtype == "fp32"
    assert all(p.verdict == "fits" for p in plan.phases), [(p.seq_len, p.verdict) for p in plan.phases]
    assert plan.suggestion is None
    # Colab's free runtime has ~12.7 GB of host RAM: a checkpoint save must fit in it.
    assert plan.host_ram_bytes < 12 * 2**30
    text = io.StringIO()
    render_plan(plan, file=text)  # what the notebook's plan cell prints
    assert "T4 (no bf16: fp16)" in text.getvalue()
    assert f"{fmt_bytes(plan.host_ram_bytes)} of host RAM while one is saved" in text.getvalue()


def _doc_rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "tiers.md").read_text()
    section = text.split("## Cards and host RAM per tier", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| tier")]
    return {r[0]: r for r in rows}


def test_docs_cards_and_host_ram_agree_with_the_plan_json(tmp_path, capsys) -> None:
    doc = _doc_rows()
    gpu_tiers = [name for name in TIERS if TIERS[name].is_gpu]
    assert sorted(doc) == sorted(gpu_tiers)
    for name in gpu_tiers:
        # The split does not change what a checkpoint holds; a short fixed one keeps the estimate to one step.
        assert launch.main(["--vram", name, "--batch-size", "1", "--grad-accum", "1", "--no-grad-checkpoint",
                            "--train-seq-len", "64", "--steps", "1", "--run-root", str(tmp_path), "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        cards = ", ".join(c["name"] + ("" if c["bf16"] else " (no bf16: fp16)") for c in plan["cards"])
        want = [name, cards, fmt_bytes(plan["checkpoint_bytes"]), fmt_bytes(plan["host_ram_bytes"])]
        assert plan["cards"] and all(c["bf16"] == card_named(c["name"]).has_bf16 for c in plan["cards"])
        assert doc[name] == want, f"docs/tiers.md row of tier {name}: {doc[name]} != {want} (the plan's --json)"
        assert re.fullmatch(r"\d+\.\d GiB", want[3])


@pytest.mark.parametrize("name", ["", "A1000"])
def test_unknown_gpu_name_is_one_line(name, tmp_path, capsys) -> None:
    assert run_cli(launch.main, ["--gpu", name, "--run-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --gpu" in err[0] and "T4" in err[0]


def test_docs_tier_estimates_and_commands_are_the_plans() -> None:
    """docs/tiers.md's estimates table and exact commands are generated from the plan (no hand-copied figure);
    one plan per tier the table lists."""
    from pretrain.plan import tier_table

    assert tier_table.main(["--check"]) == 0, "run python -m pretrain.plan.tier_table"
    section = tier_table.DOC.read_text().split(tier_table.BEGIN, 1)[1].split(tier_table.END, 1)[0]
    assert [r.split("|")[1].strip() for r in section.splitlines() if re.match(r"\| \d+ \|", r)] == \
        list(tier_table.TABLE_TIERS)
    assert section.count("python train_v29.py --size 1b ") == len(tier_table.TABLE_TIERS)
