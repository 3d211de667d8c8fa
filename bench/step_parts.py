"""Where a training step's CPU time goes, by part, each part beside the GEMMs it runs (issue 23.1).

    .venv/bin/python bench/step_parts.py                               # config S, native precision, all threads
    .venv/bin/python bench/step_parts.py --threads 1 --iters 8         # the same on one thread
    .venv/bin/python bench/step_parts.py --wall --iters 8              # by wall time (several threads, see below)
    .venv/bin/python bench/step_parts.py --isa avx512 --precision fp32 # as an AVX-512 host without BF16 would
    .venv/bin/python bench/step_parts.py --preset tiny --batch 1 --seq-len 32 --iters 1   # a smoke run

The step is bench/train_step.py's Step (the trainer's: autocast forward + backward, clipping, fused AdamW with the
non-finite skip), in a fresh process with the trainer's host settings. Its parts are timed inside the real step by
process CPU time (CPU ops run synchronously): the loss (model/gpt.py's ChunkedLinearCrossEntropy forward, which on
CPU also computes its gradient, and its backward: the LM head's three GEMMs and the cross-entropy), the blocks (the
rest of the forward and the backward: blocks, embedding, final norm), clipping, and the optimizer step with
zero_grad. Beside the loss and the blocks, their own GEMMs timed alone at their shapes (bench/gemm_floor.py's
FloorTimer, one run right after each step): the LM head's three, and the block linears with attention's at full T x
S. Medians over --iters steps.

Why beside `bench/train_step.py --floor`: a step's ratio to its GEMM floor says how much of it is outside the GEMMs,
this says in which part; torch.profiler's self times misread some large copies on one host (bench/README.md,
seventh pass), while a part's CPU time is what the step spent there.

--wall times the parts, the step and the GEMMs by wall clock instead: with several threads the CPU time of a part
counts every thread's (a memory-bound pass that does not scale costs twice its wall time at 2 threads), and on some
VMs the process CPU clock lags the other threads' time (bench/README.md, tenth pass), while wall time is what the
step waits. One process: load from other processes shows in it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.children import run_child  # noqa: E402
from bench.gemm_floor import ISA_CAPS, FloorTimer, host_isa, native_bf16  # noqa: E402
from bench.train_step import Step  # noqa: E402
from model import gpt  # noqa: E402

PARTS = ("loss", "blocks", "clip", "optimizer")


@contextlib.contextmanager
def loss_timed(times: list[float], clock: Callable[[], float] = time.process_time) -> Iterator[None]:
    """While inside: each ChunkedLinearCrossEntropy forward and backward appends its seconds by `clock` (CPU time) to
    `times` (the backward makes the LM head's weight gradient on CPU: model/loss_eager.py PendingWeightGrad)."""
    cls = gpt.ChunkedLinearCrossEntropy
    forward, backward = cls.forward, cls.backward

    def timing(fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            c = clock()
            out = fn(ctx, *args, **kwargs)
            times.append(clock() - c)
            return out
        return timed

    cls.forward, cls.backward = staticmethod(timing(forward)), staticmethod(timing(backward))
    try:
        yield
    finally:
        cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Time `iters` steps by part, each followed by one run of the step's GEMMs (by CPU time, or wall time)."""
    amp, wall = spec["precision"] == "bf16", spec.get("wall", False)
    step = Step(spec["preset"], spec["batch"], spec["seq_len"], False, False, amp)
    if wall:
        step.clock = time.perf_counter
    timer = FloorTimer(step.cfg, spec["batch"], spec["seq_len"], torch.bfloat16 if amp else torch.float32)
    loss_times: list[float] = []
    with loss_timed(loss_times, step.clock):
        for _ in range(2):  # the first allocates the AdamW state and the loss's kept buffers
            step()
        rows: list[dict[str, float]] = []
        for _ in range(spec["iters"]):
            loss_times.clear()
            step_wall = step()
            loss = sum(loss_times)
            p = step.parts
            rows.append({"loss": loss, "blocks": p["forward"] + p["backward"] - loss, "clip": p["clip"],
                         "optimizer": p["optimizer"], "step": step_wall if wall else step.cpu_s})
            timer.run()
    floor = timer.floor()
    gemms = {"loss": 0.0, "blocks": 0.0}
    key = "wall_s" if wall else "cpu_s"
    for r in floor["rows"]:
        gemms["loss" if r["name"].startswith("lm_head") else "blocks"] += r[key]
    return {**spec, "isa": host_isa(), "threads": torch.get_num_threads(),
            "parts": {k: statistics.median(r[k] for r in rows) for k in (*PARTS, "step")},
            "gemms": {**gemms, "step": floor[key]}}


def report(res: dict[str, Any]) -> None:
    print(f"step by part, preset {res['preset']} {res['batch']} x {res['seq_len']}, {res['precision']}, "
          f"{res['threads']} threads, host ISA: {res['isa']}; medians of {res['iters']} steps, "
          f"{'wall ms' if res.get('wall') else 'CPU-ms'}")
    parts, gemms = res["parts"], res["gemms"]
    names = {"loss": "loss (LM head + CE, with its gradient)", "blocks": "blocks (+ embedding, final norm), fwd + bwd",
             "clip": "gradient clipping", "optimizer": "optimizer step + zero_grad", "step": "the step"}
    for key in (*PARTS, "step"):
        line = f"  {names[key]:<46}{parts[key] * 1e3:>9.1f}"
        if key in gemms:
            g = gemms[key]
            line += (f"   its GEMMs alone {g * 1e3:>8.1f}: {g / parts[key]:.1%} of it, "
                     f"{(parts[key] - g) * 1e3:.1f} outside them")
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="S", help="S (config S, default) or a model preset (e.g. tiny)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/OpenMP threads (default: all)")
    ap.add_argument("--precision", choices=("fp32", "bf16"),
                    help="default: the host's native one (bf16 where it multiplies bf16 natively)")
    ap.add_argument("--isa", choices=sorted(ISA_CAPS), help="cap the kernels as bench/train_step.py --isa does")
    ap.add_argument("--wall", action="store_true", help="wall time instead of process CPU time (see the docstring)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from pretrain.train.host_alloc import configure_host_memory, keep_large_blocks

        configure_host_memory()
        keep_large_blocks()  # as the trainer's CPU device setup
        print(json.dumps(child(json.loads(args.child[1]))), flush=True)
        return 0
    if args.iters < 1 or args.batch < 1 or args.seq_len < 1:
        ap.error("--iters, --batch and --seq-len must be at least 1")
    precision = args.precision
    if precision is None:  # the child's answer: --isa may cap bf16 away
        precision = "bf16" if native_bf16() and args.isa in (None, "avx512_bf16") else "fp32"
    spec = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "iters": args.iters,
            "precision": precision, "wall": args.wall}
    report(run_child("parts", spec, args.threads, __file__, isa=args.isa))
    return 0


if __name__ == "__main__":
    sys.exit(main())
