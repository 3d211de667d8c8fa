"""CPU-time of one training step (bf16 autocast forward + backward) with no checkpointing, full checkpointing and
selective checkpointing (--checkpoint-policy selective), in one process, plus each one's fake-tensor peak memory
(the planner's estimate) and the plan's recompute factor.

    .venv/bin/python bench/selective_checkpoint.py                 # config S (8 x 256, vocab 50304), 3 rounds
    .venv/bin/python bench/selective_checkpoint.py --batch 4 --rounds 2

The three settings are timed in alternating rounds (a, b, c, a, b, c, ...) so background load affects them alike;
reported is the median CPU seconds per step (process CPU time, which time-slicing by other processes leaves mostly
unchanged) and its ratio to the no-checkpointing step. Write the host ISA next to the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import GPT, ModelConfig
from pretrain.plan.memory import estimate_step_memory
from pretrain.plan.plan import recompute_factor
from pretrain.train.config import TrainConfig

CONFIG_S = dict(vocab_size=50304, block_size=256, n_layer=6, n_head=6, d_model=384, d_ff=1024)
SETTINGS = {"none": {}, "full": {"grad_checkpoint": True},
            "selective": {"grad_checkpoint": True, "checkpoint_policy": "selective"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    mcfg = ModelConfig(**CONFIG_S)
    torch.manual_seed(0)
    model = GPT(mcfg).train()
    idx = torch.randint(0, mcfg.vocab_size, (args.batch, mcfg.block_size))
    cfgs = {k: TrainConfig(batch_size=args.batch, **kw) for k, kw in SETTINGS.items()}

    def step(cfg: TrainConfig) -> float:
        model.grad_checkpoint, model.checkpoint_policy = cfg.grad_checkpoint, cfg.checkpoint_policy
        model.zero_grad(set_to_none=True)
        t0 = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx)
        loss.backward()
        return time.process_time() - t0

    for cfg in cfgs.values():  # warm-up: allocator, kernels
        step(cfg)
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    for _ in range(args.rounds):
        for k, cfg in cfgs.items():
            times[k].append(step(cfg))
    base = statistics.median(times["none"])
    print(f"config S ({args.batch} x {mcfg.block_size}, vocab {mcfg.vocab_size}), bf16 autocast, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"{'policy':<10} {'CPU s/step':>10} {'vs none':>8} {'peak (fake) MiB':>16} {'plan factor':>12}")
    for k, cfg in cfgs.items():
        med = statistics.median(times[k])
        peak = estimate_step_memory(mcfg, cfg, mcfg.block_size).tensor_peak_bytes / 2**20
        print(f"{k:<10} {med:>10.3f} {med / base:>8.3f} {peak:>16.1f} {recompute_factor(cfg):>12.3f}")


if __name__ == "__main__":
    main()
