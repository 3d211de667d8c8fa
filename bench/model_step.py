"""Forward+backward throughput of each attention variant, against this machine's matmul peak.

    .venv/bin/python bench/model_step.py                # small preset, T=256, batch 1, ~1-2 min on 2 CPU cores
    .venv/bin/python bench/model_step.py --preset tiny --batch 8 --iters 5

For each variant: training-step tokens/s (loss forward + backward, no optimizer), the achieved FLOP/s
using ModelConfig.flops_per_token (model FLOPs: 6N + attention, no recompute), and that as a fraction
of the FLOP/s of a large fp32 matmul timed in the same run (the practical peak of this machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import GPT, ModelConfig  # noqa: E402
from model.variants import ATTENTION_VARIANTS  # noqa: E402

VARIANTS = tuple(ATTENTION_VARIANTS)


def matmul_flops_per_second(n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps FLOP/s of an n x n fp32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the BLAS threads
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_seconds(model: GPT, batch: int, seq_len: int, warmup: int, iters: int) -> float:
    """Median wall time of one forward+backward of the mean loss."""
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch, seq_len))
    y = torch.randint(0, vocab, (batch, seq_len))
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        model(x, y).backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    peak_before = matmul_flops_per_second()
    rows = []
    for attn in args.variants.split(","):
        cfg = ModelConfig.from_preset(args.preset, attn=attn)
        model = GPT(cfg).train()
        seconds = step_seconds(model, args.batch, args.seq_len, args.warmup, args.iters)
        tokens_per_s = args.batch * args.seq_len / seconds
        rows.append((attn, cfg.num_params(), cfg.flops_per_token(args.seq_len), seconds, tokens_per_s))
        del model
    peak = max(peak_before, matmul_flops_per_second())  # timed again: other load may have changed

    print(f"preset={args.preset} T={args.seq_len} batch={args.batch} iters={args.iters} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"fp32 2048^3 matmul: {peak / 1e9:.1f} GFLOP/s (best of before/after)")
    print(f"{'variant':<11}{'params':>9}{'GFLOP/tok':>11}{'step s':>9}{'tok/s':>9}{'GFLOP/s':>9}{'of mm':>8}")
    for attn, params, fpt, seconds, tps in rows:
        achieved = fpt * tps
        print(f"{attn:<11}{params / 1e6:>8.1f}M{fpt / 1e9:>11.3f}{seconds:>9.2f}{tps:>9.0f}"
              f"{achieved / 1e9:>9.1f}{achieved / peak:>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
