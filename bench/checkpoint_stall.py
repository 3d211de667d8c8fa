"""How long a checkpoint save stalls training: async (CPU snapshot + background write) vs synchronous.

For each state and mode, `reps` saves are made; after each one a fixed matmul workload stands in for training
steps. Reported per save (medians):
  blocked   time the caller spends inside save() (snapshot, plus the write itself in sync mode)
  write     time the write takes (serialize + fsync + rename + link), wherever it runs
  work      time of the fixed workload run right after save(), vs the same workload with no write running:
            the background write competes for CPU and memory bandwidth, which is a stall too
  tail      time wait() still blocks after the workload (0 when the write finished first)

    python bench/checkpoint_stall.py                    # 160 MB of plain tensors + the `small` model
    python bench/checkpoint_stall.py --plain-mb 0 --optimizer   # small model + AdamW moments (~1.5 GB)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.train.checkpoint import CheckpointManager  # noqa: E402


def plain_state(mb: int) -> dict:
    """A few large tensors plus the small extras a real checkpoint carries."""
    n = mb * (1 << 20) // 4 // 4
    return {"model": {f"w{i}": torch.randn(n) for i in range(4)}, "step": 0, "config": {"kind": "plain"}}


def model_state(optimizer: bool) -> dict | None:
    """State dict of the `small` preset (124M params) and optionally its AdamW moments; None if no model."""
    try:
        from model import GPT, ModelConfig
    except ImportError as e:
        print(f"(model/ not importable: {e}; plain tensors only)")
        return None
    torch.manual_seed(0)
    gpt = GPT(ModelConfig.from_preset("small"))
    state: dict = {"model": gpt.state_dict(), "step": 0}
    if optimizer:
        opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)
        for p in gpt.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # materialises exp_avg / exp_avg_sq
        state["optimizer"] = opt.state_dict()
    return state


def state_mb(state: dict) -> float:
    seen: dict[int, int] = {}

    def walk(o: object) -> None:
        if isinstance(o, torch.Tensor):
            seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v)

    walk(state)
    return sum(seen.values()) / 1e6


def workload(iters: int) -> float:
    """Fixed compute standing in for training steps; returns its wall time."""
    a = torch.randn(512, 512)
    t0 = time.perf_counter()
    for _ in range(iters):
        a = torch.tanh(a @ a)
    return time.perf_counter() - t0


def run(state: dict, async_write: bool, reps: int, iters: int, root: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=root) as d:
        mgr = CheckpointManager(Path(d), keep_last=2, async_write=async_write)
        blocked, write, work, tail = [], [], [], []
        for step in range(reps):
            t0 = time.perf_counter()
            mgr.save(state, step=step, best=step == 0)
            blocked.append(time.perf_counter() - t0)
            work.append(workload(iters))
            t1 = time.perf_counter()
            mgr.wait()
            tail.append(time.perf_counter() - t1)
            assert mgr.last_error is None, mgr.last_error
            write.append(mgr.last_write_seconds or 0.0)
    med = statistics.median
    return {"blocked": med(blocked), "write": med(write), "work": med(work), "tail": med(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain-mb", type=int, default=160, help="size of the plain-tensor state; 0 skips it")
    ap.add_argument("--no-model", action="store_true", help="skip the `small` model state")
    ap.add_argument("--optimizer", action="store_true", help="add AdamW moments to the model state (x3 size)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=60, help="matmul iterations standing in for training")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write")
    args = ap.parse_args()

    states: list[tuple[str, dict]] = []
    if args.plain_mb:
        states.append((f"plain x4 ({args.plain_mb} MB)", plain_state(args.plain_mb)))
    if not args.no_model and (ms := model_state(args.optimizer)) is not None:
        states.append(("small model" + (" + AdamW" if args.optimizer else ""), ms))

    idle = statistics.median(workload(args.iters) for _ in range(3))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; writing under {args.dir}")
    print(f"workload alone: {idle * 1e3:.0f} ms; medians of {args.reps} saves\n")
    head = f"{'state':28s} {'MB':>6s} {'mode':5s} {'blocked ms':>10s} {'write s':>8s} {'work ms':>8s} {'tail ms':>8s}"
    print(head)
    print("-" * len(head))
    for name, state in states:
        mb = state_mb(state)
        for async_write in (False, True):
            r = run(state, async_write, args.reps, args.iters, args.dir)
            mode = "async" if async_write else "sync"
            print(
                f"{name:28s} {mb:6.0f} {mode:5s} {r['blocked'] * 1e3:10.0f} {r['write']:8.2f} "
                f"{r['work'] * 1e3:8.0f} {r['tail'] * 1e3:8.0f}"
            )


if __name__ == "__main__":
    main()
