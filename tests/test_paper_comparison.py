"""The paper's comparison is not confounded: one preset per registered variant, all with the same options and
budget, so `--variant paper_baseline` and `--variant paper_decoupled` plan runs that differ only in attention;
docs/paper_presets.md is generated from the same table and says what differs."""

from __future__ import annotations

import dataclasses
import tempfile

from model import PAPER_PRESETS
from model.config import PAPER_OPTIONS
from model.variants import ATTENTION_VARIANTS
from pretrain.plan import launch, paper_table
from pretrain.track.runlog import read_jsonl
from pretrain.train.loop import main as train_main

# TrainConfig fields that are the attention itself (the thing a paper comparison varies).
ATTENTION_FIELDS = {"attn", "tie_qk", "n_kv_head", "attn_dim", "sem_dim", "geo_dim"}


def _plan(variant: str):
    with tempfile.TemporaryDirectory() as root:
        _, plan = launch.plan_from_argv(["--vram", "24", "--size", "tiny", "--attn-dim", "32", "--block-size", "64",
                                         "--variant", variant, "--run-root", root], gpu=None)
    return plan


def test_paper_baseline_and_paper_decoupled_differ_only_in_attention(untraced_plan_memory):
    base, dec = _plan("paper_baseline"), _plan("paper_decoupled")
    a, b = dataclasses.asdict(base.cfg), dataclasses.asdict(dec.cfg)
    differ = {k for k in a if a[k] != b[k]}
    assert differ - {"exp", "out_dir"} <= ATTENTION_FIELDS and "attn" in differ
    assert base.cfg.learned_temp and base.cfg.null_attn  # the original trained every mode with them
    assert (base.steps, base.planned_tokens) == (dec.steps, dec.planned_tokens)
    ma, mb = base.resolved.mcfg.to_dict(), dec.resolved.mcfg.to_dict()
    assert {k for k in ma if ma[k] != mb[k]} <= {"attn", "tie_qk"}


def test_every_registered_variant_has_a_paper_preset_with_the_shared_options(byte_data, tmp_path):
    assert set(PAPER_PRESETS) == {f"paper_{name}" for name in ATTENTION_VARIANTS}
    for fields in PAPER_PRESETS.values():
        assert PAPER_OPTIONS.items() <= fields.items()
    out = tmp_path / "gqa"
    assert train_main(["--data", str(byte_data), "--out-dir", str(out), "--exp", "paper_gqa", "--size", "tiny",
                       "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "96", "--block-size", "32",
                       "--batch-size", "2", "--val-frac", "0.05", "--eval-iters", "1", "--steps", "1",
                       "--device", "cpu", "--live", "off", "--save-minutes", "0"]) == 0
    meta = next(e for e in read_jsonl(out / "train.jsonl") if e["type"] == "meta")["model_config"]
    assert (meta["attn"], meta["learned_temp"], meta["null_attn"], meta["tie_qk"]) == ("gqa", True, True, False)


def test_docs_say_what_differs_and_a_stale_page_is_caught(tmp_path, monkeypatch, capsys):
    assert paper_table.main(["--check"]) == 0
    text = paper_table.DOC.read_text()
    for name in PAPER_PRESETS:
        assert f"| `{name}` | " in text
    assert "What differs is the attention alone" in text
    stale = tmp_path / "paper_presets.md"
    stale.write_text(text.replace("paper_gqa", "paper_mqa"))
    monkeypatch.setattr(paper_table, "DOC", stale)
    assert paper_table.main(["--check"]) == 1
    assert "out of date: run python -m pretrain.plan.paper_table" in capsys.readouterr().err
    assert paper_table.main([]) == 0 and stale.read_text() == text
