"""The chunked loss with each chunk compiled (--compile) vs eager: tok/s, kernels per step (issue 23.5).

    .venv/bin/python bench/compiled_loss.py                  # config S's loss: 8 x 256 rows, d 384, vocab 50304
    .venv/bin/python bench/compiled_loss.py --device cuda    # on a card (add --rows 16384 --d 2048 for the 1b)

Forward + backward of model/gpt.py's chunked_cross_entropy (LM head + CE, chunk 2048 rows) under bf16 autocast,
eager (in-place into kept buffers on CPU) against compiled (one inductor graph per chunk shape), alternating in
one process, best of --reps in CPU seconds on CPU (time-slicing by other processes stays out) or CUDA-synced wall
seconds on a card. Kernels per step: profiler events on CPU (aten ops the eager loop runs; for the compiled one the
ops left outside the graph plus inductor's generated kernels, counted by torch._inductor.metrics at compile),
launched device kernels on CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm_floor import host_isa  # noqa: E402
from model.gpt import LossWorkspace, chunked_cross_entropy  # noqa: E402


def step(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, vocab: int, ws: LossWorkspace | None,
         compiled: bool) -> torch.Tensor:
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, t, vocab, workspace=ws, compiled=compiled)
    loss.backward()
    return loss.detach()


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def kernels(fn, device: torch.device) -> int:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    # Leaf aten ops (those that run a kernel, not the ones that only dispatch to others).
    names = [e.name for e in events if e.name.startswith("aten::") and not e.cpu_children]
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=8 * 256)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    h = torch.randn(args.rows, args.d, device=dev, requires_grad=True)
    w = (torch.randn(args.vocab, args.d, device=dev) * 0.02).requires_grad_()
    t = torch.randint(0, args.vocab, (args.rows,), device=dev)
    ws = LossWorkspace() if dev.type == "cpu" else None
    results = {}
    for compiled in (False, True):
        h.grad = w.grad = None
        loss = step(h, w, t, args.vocab, ws, compiled)  # warm-up (and the compile)
        results[compiled] = {"loss": loss.item(), "gh": h.grad.clone(), "gw": w.grad.clone(), "best": float("inf")}
    for _ in range(args.reps):
        for compiled in (False, True):
            h.grad = w.grad = None
            t0 = clock(dev)
            step(h, w, t, args.vocab, ws, compiled)
            results[compiled]["best"] = min(results[compiled]["best"], clock(dev) - t0)
    from torch._inductor import metrics

    metrics.reset()
    torch._dynamo.reset()
    step(h, w, t, args.vocab, ws, True)  # compile afresh to count the generated kernels
    generated = metrics.generated_kernel_count
    counts = {c: kernels(lambda c=c: step(h, w, t, args.vocab, ws, c), dev) for c in (False, True)}
    e, c = results[False], results[True]
    unit = "CPU s" if dev.type == "cpu" else "s"
    print(f"host: {host_isa() if dev.type == 'cpu' else torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; rows {args.rows}, d {args.d}, vocab {args.vocab}, bf16 autocast")
    for name, r, k in (("eager", e, counts[False]), ("compiled", c, counts[True])):
        extra = f" (+{generated} inductor kernels)" if name == "compiled" and dev.type == "cpu" else ""
        print(f"{name:9s} {r['best'] * 1e3:8.1f} ms ({unit})  {args.rows / r['best']:9.0f} tok/s  "
              f"kernels/step {k}{extra}")
    print(f"compiled/eager time {c['best'] / e['best']:.3f}; |loss diff| {abs(c['loss'] - e['loss']):.2e}; "
          f"max |grad h diff| {(c['gh'] - e['gh']).abs().max().item():.2e}, "
          f"max |grad w diff| {(c['gw'] - e['gw']).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
