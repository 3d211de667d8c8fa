"""The chunked loss with each chunk compiled (--compile) vs eager: tok/s, kernels per step (issue 23.5).

    .venv/bin/python bench/compiled_loss.py                  # config S's loss alone: 8 x 256 rows, d 384, vocab 50304
    .venv/bin/python bench/compiled_loss.py --step           # config S's whole step (fwd + bwd), blocks compiled
    .venv/bin/python bench/compiled_loss.py --device cuda --rows 8192 --d 2048   # on a card: the 1b's loss, 80 tier
    .venv/bin/python bench/compiled_loss.py --ref ../parent --fp32 --reps 8   # eager: this checkout's against DIR's

Forward + backward of model/gpt.py's chunked_cross_entropy (LM head + CE, chunks of 2048 rows) under bf16
autocast, eager (in place into kept buffers on CPU) against compiled (one inductor graph per chunk shape),
alternating (ABBA) in one process, best of --reps, in CPU seconds on CPU (time-slicing by other processes stays
out) or CUDA-synced wall seconds on a card. With --step: a model of 6 layers of width --d (heads of 64, T 256,
micro-batch rows/256) built as the trainer builds it with --compile (pretrain/train/speed.py), model.compile_loss
switched per step. Page faults: minor faults per step (the median), memory the allocator handed back and faults
in again. Kernels per step: profiler events, with inductor's CPU kernels recorded (cpp.enable_kernel_profile); on
CUDA the device kernels launched.

--ref DIR: instead of compiled, DIR's eager loss (its model/ loaded as a package of its own, e.g. from `git archive
HEAD~1 | tar -x -C DIR`) against this checkout's, alternating in one process: a before/after of the eager loop too
small to see through a whole step's noise. --fp32: no autocast (the loss of a host without native bf16).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm_floor import host_isa  # noqa: E402
from model.gpt import LossWorkspace, chunked_cross_entropy  # noqa: E402


def loss_step(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, vocab: int, ws: LossWorkspace | None,
              compiled: bool, amp: bool = True, ce: Callable[..., torch.Tensor] = chunked_cross_entropy) -> None:
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = ce(h, w, t, vocab, workspace=ws, compiled=compiled)
    loss.backward()


def ref_loss(root: str) -> tuple[Callable[..., torch.Tensor], type]:
    """chunked_cross_entropy and LossWorkspace of the checkout at `root`: its model/ imported as package
    `ref_model` (model/ imports only itself and torch)."""
    spec = importlib.util.spec_from_file_location("ref_model", Path(root) / "model" / "__init__.py",
                                                  submodule_search_locations=[str(Path(root) / "model")])
    assert spec is not None and spec.loader is not None
    sys.modules["ref_model"] = pkg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pkg)
    gpt = importlib.import_module("ref_model.gpt")
    return gpt.chunked_cross_entropy, gpt.LossWorkspace


def model_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool) -> None:
    model.compile_loss = compiled
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = model(x, y)
    loss.backward()


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
    # Leaf events that compute: aten ops that run a kernel themselves (not views, allocations or no-op casts), and
    # inductor's generated kernels (graph_N_cpp_fused_*).
    return sum(1 for e in events if not e.cpu_children and ("cpp_fused" in e.name or (
        e.name.startswith("aten::") and e.name.removeprefix("aten::") not in _NO_KERNEL)))


_NO_KERNEL = {"view", "as_strided", "resolve_conj", "resolve_neg", "empty", "empty_strided", "empty_like", "t",
              "transpose", "slice", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "expand", "detach", "alias",
              "select", "split", "split_with_sizes", "narrow", "chunk", "permute", "_unsafe_view", "to", "lift_fresh",
              "contiguous", "set_", "result_type"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=8 * 256)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--step", action="store_true", help="the whole model step, not the loss alone")
    ap.add_argument("--ref", help="the loss alone, eager: this checkout's against the checkout at REF's")
    ap.add_argument("--fp32", action="store_true", help="the loss alone without bf16 autocast")
    args = ap.parse_args(argv)
    if args.ref and args.step:
        ap.error("--ref times the loss alone; drop --step")
    if args.ref and not (Path(args.ref) / "model" / "__init__.py").is_file():
        ap.error(f"--ref {args.ref} has no model/ package; pass a checkout's root (git archive REV | tar -x -C DIR)")
    dev = torch.device(args.device)
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's CPU kernels as profiler events
    torch.manual_seed(0)
    if args.step:
        from model import ModelConfig
        from pretrain.train.config import TrainConfig
        from pretrain.train.speed import build_model

        mcfg = ModelConfig(vocab_size=args.vocab, block_size=256, n_layer=6, n_head=args.d // 64, d_model=args.d,
                           d_ff=int(args.d * 8 / 3) // 64 * 64)
        model = build_model(mcfg, TrainConfig(compile=True), dev)
        x = torch.randint(0, args.vocab, (args.rows // 256, 256), device=dev)
        y = torch.randint(0, args.vocab, (args.rows // 256, 256), device=dev)
        params = list(model.parameters())
        run = lambda c: model_step(model, x, y, c)  # noqa: E731
        grads = lambda: [p.grad for p in params[:1] + params[-1:]]  # noqa: E731
    else:
        h = torch.randn(args.rows, args.d, device=dev, requires_grad=True)
        w = (torch.randn(args.vocab, args.d, device=dev) * 0.02).requires_grad_()
        t = torch.randint(0, args.vocab, (args.rows,), device=dev)
        amp = not args.fp32
        ws = LossWorkspace() if dev.type == "cpu" else None
        params = [h, w]
        run = lambda c: loss_step(h, w, t, args.vocab, ws, c, amp)  # noqa: E731
        if args.ref:  # "compiled" (True) is the ref's eager loss, in its own workspace
            ref_ce, ref_ws = ref_loss(args.ref)
            ws_ref = ref_ws() if dev.type == "cpu" else None
            run = lambda c: (loss_step(h, w, t, args.vocab, ws_ref, False, amp, ref_ce) if c  # noqa: E731
                             else loss_step(h, w, t, args.vocab, ws, False, amp))
        grads = lambda: [h.grad, w.grad]  # noqa: E731
    results = {}
    for compiled in (False, True):
        for p in params:
            p.grad = None
        run(compiled)  # warm-up (and the compile)
        results[compiled] = {"grads": [g.clone() for g in grads()], "best": float("inf"), "faults": []}
    for rep in range(args.reps):
        for compiled in ((False, True) if rep % 2 == 0 else (True, False)):  # ABBA: neither always runs first
            for p in params:
                p.grad = None
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, clock(dev)
            run(compiled)
            results[compiled]["best"] = min(results[compiled]["best"], clock(dev) - t0)
            results[compiled]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    counts = {c: kernels(lambda c=c: run(c), dev) for c in (False, True)}
    e, c = results[False], results[True]
    unit = "CPU s" if dev.type == "cpu" else "s"
    what = "config S step (fwd + bwd, blocks compiled)" if args.step else "loss (LM head + CE, fwd + bwd)"
    precision = "fp32" if args.fp32 and not args.step else "bf16"
    print(f"host: {host_isa() if dev.type == 'cpu' else torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {what}: rows {args.rows}, d {args.d}, vocab {args.vocab}, "
          f"{precision}")
    names = ("this", f"ref {args.ref}") if args.ref else ("eager", "compiled")
    for name, r, k in ((names[0], e, counts[False]), (names[1], c, counts[True])):
        print(f"{name:9s} {r['best'] * 1e3:8.1f} ms ({unit})  {args.rows / r['best']:9.0f} tok/s  "
              f"kernels/step {k}  page faults/step {sorted(r['faults'])[len(r['faults']) // 2]}")
    diffs = ", ".join(f"{(a - b).abs().max().item():.2e}" for a, b in zip(c["grads"], e["grads"], strict=True))
    ratio = f"this/ref time {e['best'] / c['best']:.3f}" if args.ref else \
        f"compiled/eager time {c['best'] / e['best']:.3f}"
    print(f"{ratio}; max |grad diff| (first, last param) {diffs}")


if __name__ == "__main__":
    main()
