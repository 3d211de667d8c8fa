"""torch.compile covers the training step only: one static graph per training phase whatever instruments run
(evals at other lengths, diagnostics, KV-cache sampling, downstream scoring run the same modules eagerly), read
back from dynamo's own counters in the run's `end` event."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from model import GPT, ModelConfig
from pretrain.track.runlog import read_jsonl
from pretrain.train import speed
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import TrainConfig, parse_config
from pretrain.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "2", "--d-ff", "64", "--block-size", "64",
        "--val-frac", "0.05", "--device", "cpu", "--live", "off", "--save-every", "0", "--save-minutes", "0",
        "--log-every", "1"]


def test_compile_is_one_graph_per_training_phase_with_every_instrument_on(byte_data, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"ctx": ctx, "endings": endings, "label": 0}) + "\n" for ctx, endings in [
        ("In the beginning", [" God created", " qqq", " zzz", " xx"]), ("The Lord said", [" unto", " b", " c", " d"])]))
    out = tmp_path / "run"
    # Two phases of one step each, two shapes (micro-batch x seq len); every instrument runs between them, at
    # other lengths (eval 16/48, diagnostics at the longest), without gradients, and token by token with a KV cache.
    argv = [sys.executable, str(ROOT / "train_v29.py"), *TINY, "--data", str(byte_data), "--out-dir", str(out),
            "--compile", "--steps", "2", "--seq-schedule", "16@0,64@1", "--micro-batch-schedule", "4@0,1@1",
            "--batch-size", "2", "--grad-accum", "2", "--eval-every", "1", "--eval-iters", "1",
            "--eval-seq-lens", "16,48", "--analysis-every", "1", "--sample-every", "1", "--sample-tokens", "10",
            "--downstream-every", "1", "--hellaswag", str(items)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # Dynamo's one warning line when a frame hits the limit, after which every new shape runs eagerly.
    assert "recompile_limit" not in done.stderr and "cache_size_limit" not in done.stderr, done.stderr[-3000:]
    events = read_jsonl(out / "train.jsonl")
    kinds = {e["type"] for e in events}
    assert {"eval", "eval_lengths", "diagnostics", "sample", "downstream"} <= kinds  # every instrument ran
    assert sorted({e["seq_len"] for e in events if e["type"] == "train"}) == [16, 64]
    end = next(e for e in events if e["type"] == "end")
    # The block's two shapes, plus the loss chunk's one (4 x 16 and 1 x 64 rows are both one 64-row chunk).
    assert end["compile"] == {"frames": 3, "recompiles": 1, "eager_fallbacks": 0}
    # The compiled run's checkpoint is a plain model's: no _orig_mod. keys, loads strictly into an uncompiled GPT.
    state = load_checkpoint(out / "last.pt")
    assert not any("_orig_mod" in k for k in state["model"])
    GPT(ModelConfig.from_dict(state["model_config"])).load_state_dict(state["model"])


def test_end_event_compile_is_null_without_compile(byte_data, tmp_path):
    out = tmp_path / "run"
    result = train(parse_config([*TINY, "--data", str(byte_data), "--out-dir", str(out), "--steps", "1",
                                 "--train-seq-len", "16", "--batch-size", "2", "--eval-iters", "1", "--no-compile"]))
    end = next(e for e in read_jsonl(out / "train.jsonl") if e["type"] == "end")
    assert result["compile"] is None and "compile" in end and end["compile"] is None


def test_recompile_limit_covers_every_training_shape():
    """Every training shape is one more graph of the one Block.forward frame: a schedule with more shapes than the
    default recompile limit (8) would train its last phases eagerly. (Compiling 9 graphs in a test costs minutes.)"""
    cfg = TrainConfig(steps=100, batch_size=8, grad_accum=1, compile=True)
    seq_points = [(10 * i, 8 * (i + 1)) for i in range(8)]  # 8 lengths, the last at step 70
    micro_points = [(0, 8), (75, 4), (100, 2)]  # a micro-batch change within the last length; 100 is past the end
    assert speed.training_shapes(seq_points, micro_points, cfg) == 9
    mcfg = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64)
    # torch's own patch, not monkeypatch: undoing a monkeypatch on dynamo's config module hides the key for every
    # later test in the process ("torch._dynamo.config.recompile_limit does not exist").
    with torch._dynamo.config.patch(recompile_limit=8, suppress_errors=False):
        speed.build_model(mcfg, cfg, torch.device("cpu"), shapes=9)
        assert torch._dynamo.config.recompile_limit == 9 and torch._dynamo.config.suppress_errors
