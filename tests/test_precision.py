"""Precision and optimizer paths through the trainer: every path a flag allows steps and skips a non-finite
step; bf16 weights resume with their fp32 optimizer state; the null key/value get no weight decay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from faults import nan_at_step

from model import GPT, ModelConfig
from model.rope import apply_rotary
from pretrain.track.runlog import read_jsonl
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.loop import train

FAST = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128", "--block-size", "64",
        "--batch-size", "4", "--train-seq-len", "32", "--val-frac", "0.05", "--eval-iters", "2", "--log-every", "1",
        "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--live", "off", "--save-minutes", "0",
        "--eval-every", "0"]

# Every optimizer / precision combination the flags allow on one device (fused AdamW is the default).
PATHS = {
    "fused-adamw": [],
    "no-opt-fused": ["--no-opt-fused"],
    "bf16-adamw": ["--param-dtype", "bf16"],
    "lion": ["--optimizer", "lion"],
    "lion-bf16": ["--optimizer", "lion", "--param-dtype", "bf16"],
    "fp16-amp": ["--amp-dtype", "fp16"],
    "fp16-amp-no-opt-fused": ["--amp-dtype", "fp16", "--no-opt-fused"],
    "no-amp-no-opt-fused": ["--no-amp", "--no-opt-fused"],
}


def run(data: Path, out: Path, *flags: str) -> dict:
    return train(parse_config(["--data", str(data), "--out-dir", str(out), *FAST, *flags]))


@pytest.mark.parametrize("path", list(PATHS))
def test_nan_step_is_skipped_and_counted_on_every_optimizer_path(byte_data, tmp_path, monkeypatch, path):
    nan_at_step(monkeypatch, 3)
    out = tmp_path / "r"
    result = run(byte_data, out, "--steps", "5", "--save-every", "1", "--keep-last", "10", *PATHS[path])
    assert result["status"] == "completed" and result["skipped_steps"] == 1
    assert [e["skipped_steps"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"] == [0, 0, 1, 1, 1]
    before, after, last = (load_checkpoint(out / f"step_{n}.pt") for n in (2, 3, 5))
    # Skipped, not applied: step 3 left weights and optimizer state exactly as step 2 had them.
    for k, w in before["model"].items():
        assert torch.equal(w, after["model"][k]), f"{k} changed in the skipped step"
    for name, st in before["optimizer"]["state"].items():
        for key, t in st.items():
            assert torch.equal(t, after["optimizer"]["state"][name][key]), f"{name}.{key} changed when skipped"
    # And training goes on afterwards.
    assert not torch.equal(last["model"]["wte.weight"], after["model"]["wte.weight"])
    assert all(torch.isfinite(t.float()).all() for t in last["model"].values())


def test_resume_across_fused_and_unfused_adamw_keeps_skipping(byte_data, tmp_path, monkeypatch):
    """--opt-fused may change on resume: torch's fused AdamW loading our AdamW's state must stay fused (its
    foreach fallback would refuse the non-finite-step flag), and the reverse must load too."""
    out = tmp_path / "r"
    run(byte_data, out, "--steps", "2", "--no-opt-fused")
    run(byte_data, out, "--steps", "4")
    nan_at_step(monkeypatch, 1)  # the first step after this resume
    result = run(byte_data, out, "--steps", "6", "--no-opt-fused")
    assert result["status"] == "completed" and result["skipped_steps"] == 1


def _null_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32,
                           null_attn=True, rope_base=100.0))


def test_null_key_and_value_get_no_weight_decay(byte_data, tmp_path):
    out = tmp_path / "r"
    run(byte_data, out, "--steps", "1", "--null-attn", "--weight-decay", "0.1")
    groups = load_checkpoint(out / "last.pt")["optimizer"]["param_groups"]
    decay_of = {name: g["weight_decay"] for g in groups for name in g["params"]}
    nulls = [n for n in decay_of if n.endswith(("null_k", "null_v"))]
    assert len(nulls) == 4 and all(decay_of[n] == 0.0 for n in nulls)
    assert decay_of["blocks.0.attn.qkv_proj.weight"] == 0.1 and decay_of["blocks.0.attn_norm.weight"] == 0.0


def test_null_key_scores_as_a_key_at_position_zero():
    """The documented choice (model/attention.py): a query at position m scores the null key as a key at
    position 0, so shifting the query and a key holding the null key's vector together leaves the score."""
    attn = _null_model().blocks[0].attn
    with torch.no_grad():
        attn.null_k.normal_()
        x = torch.randn(1, 1, 16)
        hd = attn.qk_head_dim

        def query(pos: int) -> torch.Tensor:
            return attn._qkv(x, torch.tensor([pos]))[0][0, :, 0]  # (heads, hd)

        def rotated_null(pos: int) -> torch.Tensor:
            cos, sin = attn.rope(torch.tensor([pos]))
            return apply_rotary(attn.null_k[None], cos, sin)[0, :, 0]

        null = attn.null_k[:, 0]
        for m in (0, 3, 9):
            assert torch.allclose((query(m) * null).sum(-1), (query(m + 4) * rotated_null(4)).sum(-1), atol=1e-5)
        assert not torch.allclose((query(0) * null).sum(-1), (query(9) * null).sum(-1)), "depends on distance"
        assert hd == null.shape[-1]


@pytest.mark.parametrize("native,flags,warned", [(False, [], True), (False, ["--no-amp"], False),
                                                 (True, [], False)])
def test_bf16_autocast_on_a_cpu_that_emulates_it_is_named_with_the_fix(byte_data, tmp_path, monkeypatch, capsys,
                                                                       native, flags, warned):
    """bf16 autocast where the CPU has no bf16 dot product (an AVX2 host: config S's step 256 s against fp32's
    3.1 s): the trainer says so in one line with the flag that fixes it, and trains what it was given."""
    from pretrain.train import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: native)
    assert run(byte_data, tmp_path / "r", "--steps", "1", *flags)["status"] == "completed"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "bf16 autocast is emulated" in ln]
    assert len(lines) == int(warned)
    assert all(ln.startswith("warning: ") and "--no-amp" in ln for ln in lines)
    meta = next(e for e in read_jsonl(tmp_path / "r" / "train.jsonl") if e["type"] == "meta")
    assert meta["host"]["native_bf16"] is native and meta["train_config"]["amp"] is not flags
