"""Model FLOPs (PaLM: full attention) beside the causal count (what the kernels run), issue 23.4: the function
against a hand count, and both figures where a user reads them (the plan's text and JSON, train.jsonl, summary.md)."""

from __future__ import annotations

import json

import pytest
import torch

from model import GPT, ModelConfig
from pretrain.plan import launch
from pretrain.track.runlog import read_jsonl
from pretrain.train import device as dev
from pretrain.train import loop
from pretrain.train.config import parse_config

SMALL = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "2", "--d-ff", "64", "--block-size", "64"]


@pytest.mark.parametrize("null_attn", [False, True])
def test_causal_flops_are_the_model_flops_minus_the_masked_pairs_counted_by_hand(null_attn):
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=32, n_head=2, n_layer=3, d_ff=64, block_size=8,
                                  null_attn=null_attn)
    T = 8
    linear = sum(m.weight.numel() for m in GPT(cfg).modules() if isinstance(m, torch.nn.Linear))
    # Every (query, key) pair the causal mask keeps, counted on the mask itself; the null key is seen by all.
    pairs = int(torch.tril(torch.ones(T, T)).sum()) + (T if null_attn else 0)
    width = cfg.d_model + cfg.d_model  # baseline: H * hd_qk scores, H * hd_v mixes
    # Per pair and layer: 2 FLOPs per multiply-add for QK^T and AV forward, backward twice that: 6 x width.
    by_hand = 6 * linear + 6 * cfg.n_layer * width * pairs / T
    assert cfg.flops_per_token(T, causal=True) == pytest.approx(by_hand, rel=1e-12)
    full_pairs = T * T + (T if null_attn else 0)
    assert cfg.flops_per_token(T) == pytest.approx(6 * linear + 6 * cfg.n_layer * width * full_pairs / T, rel=1e-12)


def test_plan_shows_both_figures_and_times_with_model_flops(tmp_path, capsys, untraced_plan_memory):
    argv = ["--vram", "80", *SMALL, "--run-root", str(tmp_path)]
    assert launch.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = ModelConfig.from_dict(out["model"])
    est = out["estimate"]
    assert "PaLM" in est["flops_convention"]
    for ph in out["phases"]:
        t = str(ph["seq_len"])
        assert est["flops_per_token"][t] == m.flops_per_token(ph["seq_len"])
        assert est["causal_flops_per_token"][t] == m.flops_per_token(ph["seq_len"], causal=True)
        assert est["causal_flops_per_token"][t] < est["flops_per_token"][t]
        # The time estimate is on model FLOPs: peak x MFU / model FLOPs per token.
        assert ph["flops_tokens_per_second"] == pytest.approx(
            est["peak_flops"] * est["effective_mfu"] / est["flops_per_token"][t])
    assert launch.main(argv) == 0
    text = capsys.readouterr().out
    last = out["phases"][-1]["seq_len"]
    assert f"{est['causal_flops_per_token'][str(last)] / 1e9:.2f} counting causal attention" in text


def test_trainer_reports_mfu_on_model_and_causal_flops(byte_data, tmp_path, monkeypatch):
    monkeypatch.setattr(dev, "peak_flops", lambda device: 1e12)  # a known peak, as a listed GPU has
    out = tmp_path / "run"
    loop.train(parse_config(["--data", str(byte_data), "--out-dir", str(out), *SMALL, "--batch-size", "2",
                             "--steps", "2", "--log-every", "1", "--eval-every", "0", "--val-frac", "0.05",
                             "--eval-iters", "1", "--no-amp", "--device", "cpu", "--live", "off"]))
    lines = [e for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"]
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=32, n_head=2, n_layer=2, d_ff=64, block_size=64)
    for e in lines:
        ratio = cfg.flops_per_token(e["seq_len"], causal=True) / cfg.flops_per_token(e["seq_len"])
        assert e["mfu_causal"] == pytest.approx(e["mfu"] * ratio)
    summary = (out / "summary.md").read_text()
    assert "on model FLOPs (PaLM convention" in summary and "counting causal attention" in summary
