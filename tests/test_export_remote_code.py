"""Bottleneck / decoupled exports load with AutoModelForCausalLM (trust_remote_code) and compute our logits.

A tiny run of each variant is trained by the trainer, exported by `python -m pretrain.export`'s main, and loaded
offline by transformers from the export folder alone: its logits must equal the checkpoint's model (same code,
fp32: tolerance 1e-5), padded batches must give each row its own logits, and `generate` (greedy) must give the
tokens our sampler gives, also past block_size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.evals.run_model import load_run_model
from pretrain.export import MARKER, load_exported
from pretrain.export import main as export_main
from pretrain.export_remote import model_sources
from pretrain.train.config import parse_config
from pretrain.train.loop import train

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "decoupled": ["--attn", "decoupled", "--attn-dim", "32", "--sem-dim", "16", "--geo-dim", "16",
                  "--null-attn"],
    "bottleneck": ["--attn", "bottleneck", "--attn-dim", "32", "--learned-temp"],
}
TOLERANCE = 1e-5  # fp32, the same code on the same device: in practice the difference is exactly 0


def tiny_run(data: Path, out_dir: Path, *flags: str) -> Path:
    """A 3-step run of a 2-layer, d_model 64, block 64 model on `data`, evaluated at start and end."""
    train(parse_config(["--data", str(data), "--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2",
                        "--d-ff", "128", "--block-size", "64", "--batch-size", "4", "--train-seq-len", "32",
                        "--val-frac", "0.05", "--eval-iters", "1", "--warmup-steps", "1", "--lr", "3e-3",
                        "--device", "cpu", "--live", "off", "--save-minutes", "0", "--eval-every", "0",
                        "--steps", "3", "--out-dir", str(out_dir), *flags]))
    return out_dir


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_export_is_an_automodel_with_our_logits(variant, byte_data, tmp_path):
    run = tiny_run(byte_data, tmp_path / "run", *VARIANTS[variant])
    out = tmp_path / "hf"
    assert export_main([str(run), "--out", str(out)]) == 0
    for src in model_sources():  # model/'s code, byte for byte: nothing to drift
        assert (out / src.name).read_bytes() == src.read_bytes()

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True,
                                                           local_files_only=True).eval()
    ours, _, _ = load_run_model(run)
    assert type(hf).__name__ == "PretrainGPTForCausalLM" and hf.config.vocab_size == 256
    idx = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(idx), hf(idx).logits
        assert got.shape == want.shape == (2, 48, 256)
        assert (got - want).abs().max().item() <= TOLERANCE
        assert torch.equal(load_exported(out).eval()(idx), want)  # our own loader reads the same files

        mask = torch.ones_like(idx)
        mask[1, :7] = 0  # row 1 left-padded, as lm-eval and batched generate pad
        padded = hf(idx, attention_mask=mask).logits
        assert (padded[0] - want[0]).abs().max().item() <= TOLERANCE
        assert (padded[1, 7:] - ours(idx[1:, 7:])[0]).abs().max().item() <= TOLERANCE

    prompt = idx[:, :20]
    gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50, do_sample=False)
    assert torch.equal(gen, ours.generate(prompt, 50, temperature=0))  # 70 tokens: past block_size 64
    assert not (out / "__pycache__").exists()  # loading left nothing in the export (--overwrite still works)
    assert {p.name for p in out.iterdir()} == {MARKER, *json.loads((out / MARKER).read_text())["files"]}
