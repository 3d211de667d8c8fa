"""bench/gemm_floor.py's projection GEMMs are the ones the model runs (issue 23.1: an honest floor).

The floor is the step's own GEMMs timed alone. If it timed GEMMs the step does not run (q, k and v as three
narrow GEMMs where the model runs one fused qkv GEMM), the floor would be another step's and the ratio would
flatter or wrong the product. Held here: every 2-D matmul one forward + backward of GPT runs (recorded at the
dispatcher) is, shape for shape and count for count, a GEMM of the floor's list, for each variant it covers.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.gemm_floor import step_gemms
from model import GPT, ModelConfig


class _MatmulShapes(TorchDispatchMode):
    """Records (m, k, n) of every 2-D matmul dispatched: mm, and addmm when a bias is added."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[tuple[int, int, int]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        a, b = {torch.ops.aten.mm.default: args[:2], torch.ops.aten.mm.out: args[:2],
                torch.ops.aten.addmm.default: args[1:3]}.get(func, (None, None))
        if a is not None:
            self.shapes[(a.shape[0], a.shape[1], b.shape[1])] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fields", [dict(attn="baseline"), dict(attn="gqa", n_kv_head=2),
                                    dict(attn="bottleneck", attn_dim=64), dict(attn="baseline", tie_qk=True)])
def test_floor_lists_the_matmuls_the_step_runs(fields):
    cfg = ModelConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, d_model=128, d_ff=256, **fields)
    batch, seq_len = 2, 64
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with _MatmulShapes() as rec:
        model(x, x).backward()
    listed = Counter({(g.m, g.k, g.n): 0 for g in step_gemms(cfg, batch, seq_len) if g.batch == 1})
    for g in step_gemms(cfg, batch, seq_len):
        if g.batch == 1:  # the projections and the LM head; attention's batched GEMMs are its kernel's
            listed[(g.m, g.k, g.n)] += g.count
    assert rec.shapes == listed
