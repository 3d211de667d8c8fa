"""torch.compile covers the training step only: one static graph per training shape whatever instruments run, read
back from dynamo's own counters in the run's `end` event. The compiled run with every instrument on is the
uninterrupted run of tests/test_gpu_check.py (one cold compile for both); here: the end event without --compile,
and a recompile limit that covers every training shape."""

from __future__ import annotations

import torch

from model import ModelConfig
from pretrain.track.runlog import read_jsonl
from pretrain.train import speed
from pretrain.train.config import TrainConfig, parse_config
from pretrain.train.loop import train

TINY = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "2", "--d-ff", "64", "--block-size", "64",
        "--val-frac", "0.05", "--device", "cpu", "--live", "off", "--save-every", "0", "--save-minutes", "0",
        "--log-every", "1"]


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
