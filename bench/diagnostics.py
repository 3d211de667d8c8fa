"""Overhead of the attention diagnostics (--analysis-every) against training time, per attention variant.

    .venv/bin/python bench/diagnostics.py                          # tiny, 8 x 256 (the launcher's cpu tier)
    .venv/bin/python bench/diagnostics.py --preset small --batch 1 --every 200

For each variant: the median wall (and CPU) seconds of one training step like the trainer's (forward +
backward, AdamW step; fp32 unless --amp) and of one `diagnose` call on the fixed batch the trainer would use
(diagnostic_rows sequences of the eval length: reference attention with explicit softmax, K/V SVDs, one extra
forward + backward for per-layer gradient norms). The overhead at cadence N is diag / (N * step), the share
of training time the diagnostics add when they run every N steps; the launcher's default is every eval
(--eval-every, 200 steps). CPU seconds are printed too: on a shared box they survive time-slicing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import GPT, PAPER_PRESETS, ModelConfig  # noqa: E402
from pretrain.evals.diagnostics import diagnose, diagnostic_rows  # noqa: E402

VARIANTS = {"baseline": {"attn": "baseline"}, "gqa": {"attn": "gqa"}, **PAPER_PRESETS}


def timed(fn: Callable[[], object], warmup: int, iters: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of fn over iters runs after warmup runs."""
    walls, cpus = [], []
    for i in range(warmup + iters):
        w, c = time.perf_counter(), time.process_time()
        fn()
        if i >= warmup:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def measure(cfg: ModelConfig, args: argparse.Namespace, autocast: Any) -> tuple[float, float, float, float]:
    """(step wall, step CPU, diag wall, diag CPU) median seconds for one model config."""
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))

    def step() -> None:
        with autocast:
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    px = x[:diagnostic_rows(cfg.n_head, args.seq_len, args.batch)]
    return (*timed(step, args.warmup, args.iters),
            *timed(lambda: diagnose(model, px, px, autocast), args.warmup, args.iters))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="training micro-batch (diagnostics use up to 4 rows)")
    p.add_argument("--every", type=int, default=200, help="diagnostics cadence in steps (launcher: --eval-every)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast as the trainer (default fp32: bf16 GEMMs on this box's CPU run ~100x slower)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()
    print(f"preset {args.preset}, train batch {args.batch} x {args.seq_len}, {'bf16 autocast' if args.amp else 'fp32'}"
          f", torch threads {torch.get_num_threads()}, cadence every {args.every} steps")
    print(f"{'variant':<17} {'step s':>8} {'diag s':>8} {'diag/step':>9} {'overhead':>9} {'(CPU s)':>9}")
    for name in args.variants.split(","):
        step_wall, step_cpu, diag_wall, diag_cpu = measure(ModelConfig.from_preset(args.preset, **VARIANTS[name]),
                                                           args, autocast)
        ratio = diag_wall / step_wall
        overhead, overhead_cpu = diag_wall / (args.every * step_wall), diag_cpu / (args.every * step_cpu)
        print(f"{name:<17} {step_wall:8.3f} {diag_wall:8.3f} {ratio:9.2f} {100 * overhead:8.3f}% "
              f"{100 * overhead_cpu:8.3f}%")
    with contextlib.suppress(AttributeError):
        print(f"load average {__import__('os').getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
