"""Null-attn's FlexAttention block mask built once per forward vs once per layer: time, kernels (issue 23.5).

    .venv/bin/python bench/block_mask.py                     # CPU: forward only (FlexAttention has no CPU backward)
    .venv/bin/python bench/block_mask.py --device cuda --layers 16 --d 2048 --seq 2048 --batch 4   # on a card

A null-attn model (config S's widths by default: 6 layers, d 384, 6 heads, T 256, micro-batch 8, bf16 autocast),
run with the mask shared by every layer (GPT.hidden_states, the product) and with each layer building its own (the
layout before: model.gpt.shared_block_mask answering None), alternating (ABBA) in one process, best of --reps.
On CUDA the blocks are compiled as the trainer compiles them (FlexAttention's kernel is only fast compiled) and a
step is forward + backward, in CUDA-synced wall seconds; on CPU FlexAttention is forced on (the trainer uses SDPA there)
and runs eagerly, forward only, in CPU seconds. Printed: time and tok/s per mode, create_block_mask calls per
forward (compiled per layer, the calls happen at trace time only: there the kernels show them), kernels per
step (device kernels on CUDA, computing aten ops on CPU), and one create_block_mask's time.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.nn.attention import flex_attention as flex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.attention as attention  # noqa: E402
import model.gpt as gpt  # noqa: E402
from bench.compiled_loss import clock, kernels  # noqa: E402
from bench.gemm_floor import host_isa  # noqa: E402
from model import ModelConfig  # noqa: E402
from pretrain.train.config import TrainConfig  # noqa: E402
from pretrain.train.speed import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                       d_model=args.d, d_ff=int(args.d * 8 / 3) // 64 * 64, null_attn=True)
    model = build_model(mcfg, TrainConfig(compile=cuda), dev)
    if not cuda:  # as on a card: FlexAttention for null-attn
        attention.attention_backend = lambda device_type, null_attn, compiling: "flex" if null_attn else "sdpa"
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    builds = []
    real_build = flex.create_block_mask
    flex.create_block_mask = lambda *a, **k: builds.append(1) or real_build(*a, **k)
    shared = gpt.shared_block_mask

    def step(per_layer: bool) -> None:
        gpt.shared_block_mask = (lambda *a: None) if per_layer else shared
        with torch.autocast(dev.type, dtype=torch.bfloat16), (contextlib.nullcontext() if cuda else torch.no_grad()):
            out = model(x, x)
        if cuda:
            out.backward()

    best = {False: float("inf"), True: float("inf")}
    calls = {}
    for per_layer in (False, True):
        step(per_layer)  # warm-up (and on CUDA the compile)
        builds.clear()
        step(per_layer)
        calls[per_layer] = len(builds)
    for rep in range(args.reps):
        for per_layer in ((False, True) if rep % 2 == 0 else (True, False)):  # ABBA: neither always runs first
            t0 = clock(dev)
            step(per_layer)
            best[per_layer] = min(best[per_layer], clock(dev) - t0)
    counts = {p: kernels(lambda p=p: step(p), dev) for p in (False, True)}
    t0 = clock(dev)
    for _ in range(10):
        real_build(attention._null_slot_visible, None, None, args.seq, args.seq + 1, device=dev)
    one = (clock(dev) - t0) / 10
    unit = "CPU s" if not cuda else "s"
    what = "fwd + bwd, blocks compiled" if cuda else "forward only, eager FlexAttention"
    print(f"host: {torch.cuda.get_device_name() if cuda else host_isa()}, torch {torch.__version__}; null-attn "
          f"{args.layers} layers, d {args.d}, {args.batch} x {args.seq}, bf16 autocast, {what}")
    tokens = args.batch * args.seq
    for per_layer, name in ((False, "once per forward"), (True, "once per layer")):
        print(f"mask {name:17s} {best[per_layer] * 1e3:8.1f} ms ({unit})  {tokens / best[per_layer]:8.0f} tok/s  "
              f"create_block_mask calls/forward {calls[per_layer]}  kernels/step {counts[per_layer]}")
    print(f"one create_block_mask (eager) at T {args.seq}: {one * 1e3:.2f} ms ({unit}); "
          f"per-layer/once time {best[True] / best[False]:.3f}")


if __name__ == "__main__":
    main()
