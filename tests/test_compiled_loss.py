"""Under --compile each chunk of the chunked loss is one compiled graph (issue 23.5): the loss and gradients equal the
eager chunks', every chunk of every step runs the one graph (the last chunk padded, not recompiled), and the
trainer's end event counts it: one more graph, no recompiles, no eager fallbacks."""

from __future__ import annotations

import torch
from conftest import COMPILED_SHAPE

import model.gpt as gpt
import model.loss_chunk as loss_chunk
from model.gpt import chunked_cross_entropy
from pretrain.track.runlog import read_jsonl
from pretrain.train import speed
from train_v29 import main as train_main

# The suite's one compiled shape (conftest.COMPILED_SHAPE): inductor's kernels for its block are built once per session.
TINY = [*COMPILED_SHAPE, "--val-frac", "0.05", "--eval-iters", "1", "--log-every", "1",
        "--device", "cpu", "--live", "off", "--save-every", "0", "--save-minutes", "0", "--eval-every", "0"]


def loss_and_grads(h, w, t, compiled: bool, rows_per_chunk: int) -> tuple[torch.Tensor, ...]:
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = chunked_cross_entropy(h, w, t, vocab_size=50, chunk_rows=rows_per_chunk, compiled=compiled)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def fresh_dynamo() -> None:
    """Dynamo's caches and counters as in a new process (speed.compile_counts reads the counters)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def test_compiled_chunks_equal_eager_with_one_graph(monkeypatch):
    fresh_dynamo()
    shapes = []
    compiled_chunk = torch.compile(loss_chunk.chunk_loss_and_logit_grad_, dynamic=False)  # as compiled_chunk_loop does
    monkeypatch.setattr(loss_chunk, "_compiled_chunk", lambda logits, *a: shapes.append(tuple(logits.shape))
                        or compiled_chunk(logits, *a))
    torch.manual_seed(0)
    h, w = torch.randn(37, 16), torch.randn(64, 16)  # 64 columns, the last 14 padding (vocab 50)
    for _ in range(2):
        t = torch.randint(0, 50, (37,))
        t[::5] = -100  # ignored rows
        eager = loss_and_grads(h, w, t, compiled=False, rows_per_chunk=10)
        compiled = loss_and_grads(h, w, t, compiled=True, rows_per_chunk=10)
        for got, want in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # 37 rows in chunks of at most 10: four of 10 (three rows of padding), one graph for both steps.
    assert shapes == [(10, 64)] * 8
    assert speed.compile_counts() == {"frames": 1, "recompiles": 0, "eager_fallbacks": 0}
    fresh_dynamo()


def test_trainer_compiles_the_loss_chunk_and_the_cast_blocks_once(monkeypatch, byte_data, tmp_path):
    """Also the compiled run of --bf16-weight-cache (tests/test_bf16_weight_cache.py): one block graph for every
    step's micro-batches takes the weights cast once per step (a forward object made per step recompiled the block
    each step); the eager run beside it casts the same way. Plain weights compiled: tests/test_gpu_check.py."""
    calls = []
    real = gpt.compiled_chunk_loop
    monkeypatch.setattr(gpt, "compiled_chunk_loop", lambda hh, *a: calls.append(hh.shape[0]) or real(hh, *a))
    init = gpt.GPT.__init__

    def small_chunks(self, config):  # 8 x 128 = 1024 rows a micro-batch: three chunks of 342 (two rows of padding)
        init(self, config)
        self.loss_chunk_rows = 400

    monkeypatch.setattr(gpt.GPT, "__init__", small_chunks)
    fresh_dynamo()
    out = tmp_path / "run"
    assert train_main([*TINY, "--data", str(byte_data), "--out-dir", str(out), "--steps", "3", "--grad-accum", "2",
                       "--compile", "--bf16-weight-cache"]) == 0
    fresh_dynamo()
    assert calls == [1024] * 6  # every training micro-batch; the evals (run eagerly) use the eager loss
    events = read_jsonl(out / "train.jsonl")
    # The block's graph and the loss chunk's: no recompile over 3 steps x 2 micro-batches x 3 chunks, nor per step.
    assert next(e for e in events if e["type"] == "end")["compile"] == {"frames": 2, "recompiles": 0,
                                                                        "eager_fallbacks": 0}
    eager = tmp_path / "eager"
    assert train_main([*TINY, "--data", str(byte_data), "--out-dir", str(eager), "--steps", "3",
                       "--grad-accum", "2", "--bf16-weight-cache"]) == 0
    losses = [[e["loss"] for e in read_jsonl(d / "train.jsonl") if e["type"] == "train"] for d in (out, eager)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=1e-4)
