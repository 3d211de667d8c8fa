"""CPU attention per call at config S's shapes: torch's SDPA (flash kernel, and its math backend) against
model/cpu_attention.py's causal_attention_cpu (its kernel call where it applies, and its blocks), forward and
forward + backward, per variant and precision.

    .venv/bin/python bench/attention_cpu.py                         # all variants, bf16 (where native) + fp32
    .venv/bin/python bench/attention_cpu.py --variants baseline --precisions bf16 --rounds 9 --threads 1
    .venv/bin/python bench/attention_cpu.py --step --rounds 6 --threads 2   # the whole config S step, A/B

Inputs are what a block hands attention: q and k contiguous (RoPE writes new tensors), v a strided view of the
fused QKV projection's output. The kernels alternate within each round (load from other processes shifts them
alike); reported is the best round per kernel in CPU milliseconds (process CPU time, so time-slicing stays out),
with the ratio to SDPA, and each kernel's relative error against a float64 reference for the output and q's,
k's and v's gradients. Shapes: micro-batch 8 x T 256, heads from ModelConfig (6 heads, d 384).

--step: the trainer-like config S step in the host's native precision (bench/train_step.py's Step: bf16 autocast,
or fp32 where bf16 is emulated; forward + backward, clipping, fused AdamW), alternating in one process between
attention on SDPA (what main ran) and on the CPU path: median CPU seconds and tok/s per step, and from one profiled
step each, the attention records' time (forward + backward, 6 layers). Same process, same weights and batch, so
load from other processes shifts both alike.

On a shared host, CPU time is not immune to load: OpenMP threads spin while a descheduled partner is waited for,
once per parallel region. The flash kernel is one region per call, the CPU path ~100 (GEMMs and passes per block),
so with more runnable threads than cores the CPU path's time inflates far more; run with --threads 1 or
OMP_WAIT_POLICY=PASSIVE there (bench/README.md shows all three; the product itself sets GOMP_SPINCOUNT=3000,
pretrain/train/host_threads.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.train.host_blas import configure_host_blas  # noqa: E402

configure_host_blas()  # as the trainer: before torch loads MKL (fp32 GEMMs on AMD CPUs)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.gemm_floor import host_isa, native_bf16  # noqa: E402
from model import ModelConfig, cpu_attention  # noqa: E402
from model.cpu_attention import causal_attention_cpu  # noqa: E402
from model.variants import ATTENTION_VARIANTS  # noqa: E402
from pretrain.train.host_alloc import configure_host_memory, keep_large_blocks  # noqa: E402

S_CONFIG = dict(vocab_size=50304, block_size=256, n_layer=6, n_head=6, d_model=384, d_ff=1024)


def inputs(cfg: ModelConfig, batch: int, T: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Leaf q, k, v shaped as a block hands them to attention (v a view into a fused projection output)."""
    g = torch.Generator().manual_seed(seed)
    hd_qk, hd_v, _ = cfg.head_dims
    h, kv = cfg.n_head, cfg.n_kv_head
    q = torch.randn(batch, h, T, hd_qk, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, kv, T, hd_qk, generator=g).to(dtype).requires_grad_()
    fused = torch.randn(batch, T, (h + 2 * kv) * hd_qk + kv * hd_v, generator=g).to(dtype)
    v = fused[..., -kv * hd_v:].view(batch, T, kv, hd_v).transpose(1, 2).detach().requires_grad_()
    return q, k, v


def kernels(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    gqa = cfg.n_kv_head != cfg.n_head
    scale = 1.0 if cfg.attn == "decoupled" else None

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v)

    def blocks(q, k, v):  # the CPU path with its kernel call turned off
        kernel = cpu_attention.attention_applies
        cpu_attention.attention_applies = lambda q, k, v: False
        try:
            return causal_attention_cpu(q, k, v, None, scale)
        finally:
            cpu_attention.attention_applies = kernel

    fns = {"sdpa (flash)": sdpa, "sdpa math": math, "cpu blocks": blocks,
           "cpu_attention": lambda q, k, v: causal_attention_cpu(q, k, v, None, scale)}
    if dtype == torch.float32:  # fp32 has the kernel only (built for AVX2 without AVX-512), no blocked form
        del fns["cpu blocks"]
        if not cpu_attention.cpu_attention_applies(*inputs(cfg, 1, 64, dtype)):
            del fns["cpu_attention"]
    return fns


def reference(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    T = q.shape[2]
    s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return q, k, v, s.softmax(-1) @ v.repeat_interleave(group, 1)


def timed(fn, q, k, v, go, backward: bool) -> float:
    c0 = time.process_time()
    y = fn(q, k, v)
    if backward:
        y.backward(go)
    cpu = time.process_time() - c0
    for t in (q, k, v):
        t.grad = None
    return cpu


def step_ab(rounds: int, amp: bool) -> None:
    """The config S training step (bf16 autocast, or fp32), SDPA vs the CPU path, alternating in this process."""
    import statistics

    from torch.profiler import profile

    import model.attention as attention
    from bench.train_step import Step

    applies = attention.cpu_attention_applies
    step = Step("S", 8, 256, False, False, amp)
    for _ in range(2):  # the first step allocates the optimizer state
        step()
    paths = {"sdpa (flash)": lambda *args: False, "cpu_attention": applies}
    cpu: dict[str, list[float]] = {n: [] for n in paths}
    wall: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, rule in paths.items():
            attention.cpu_attention_applies = rule
            wall[name].append(step())
            cpu[name].append(step.cpu_s)
    records = {"sdpa (flash)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
               "cpu_attention": ("_CausalAttention", "_CausalAttentionBackward", "_KernelAttention",
                                 "_KernelAttentionBackward")}
    for name, rule in paths.items():
        attention.cpu_attention_applies = rule
        with profile() as prof:
            step()
        ev = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
        fwd, bwd = (sum(ev.get(r, 0.0) for r in records[name][i::2]) for i in (0, 1))
        print(f"  {name:<14} step {statistics.median(cpu[name]):.3f} CPU-s (median of {rounds}), "
              f"{step.tokens / statistics.median(wall[name]):.0f} tok/s; profiled step: attention fwd {fwd:.0f} + "
              f"bwd {bwd:.0f} = {fwd + bwd:.0f} ms (6 layers)")
    attention.cpu_attention_applies = applies
    ratio = statistics.median(cpu["cpu_attention"]) / statistics.median(cpu["sdpa (flash)"])
    print(f"  step CPU time, cpu_attention / sdpa: {ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(ATTENTION_VARIANTS))
    ap.add_argument("--precisions", default="bf16,fp32" if native_bf16() else "fp32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--step", action="store_true",
                    help="the whole config S step in the host's native precision, SDPA vs the CPU path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The trainer's host memory setting: without it every multi-MB buffer a kernel allocates is page-faulted in again
    # on each call, which inflated the blocked kernel's time (many buffers) far more than flash's (few).
    configure_host_memory()
    keep_large_blocks()  # as the trainer's CPU device setup
    if args.step:
        amp = native_bf16()
        print(f"host ISA: {host_isa()}, {args.threads} threads, {'bf16' if amp else 'fp32'} config S step (8 x 256), "
              f"load {os.getloadavg()[0]:.1f}")
        step_ab(args.rounds, amp)
        return 0
    print(f"host ISA: {host_isa()}, {args.threads} threads, B {args.batch} x T {args.seq_len}, causal; "
          f"best of {args.rounds} alternating rounds, CPU ms per layer call")
    for name in args.variants.split(","):
        cfg = ModelConfig(**S_CONFIG, attn=name)
        for prec in args.precisions.split(","):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[prec]
            q, k, v = inputs(cfg, args.batch, args.seq_len, dtype)
            go = torch.randn(args.batch, cfg.n_head, args.seq_len, cfg.head_dims[1]).to(dtype)
            fns = kernels(cfg, dtype)
            best = {(n, b): float("inf") for n in fns for b in (False, True)}
            for _ in range(args.rounds + 1):  # the first round warms up
                for n, fn in fns.items():
                    for b in (False, True):
                        best[n, b] = min(best[n, b], timed(fn, q, k, v, go, b))
            qr, kr, vr, yr = reference(q, k, v, 1.0 if name == "decoupled" else None)
            yr.backward(go.double())
            print(f"{name} (H {cfg.n_head}, Hkv {cfg.n_kv_head}, head dims {cfg.head_dims[:2]}), {prec}:")
            base = best["sdpa (flash)", True]
            for n, fn in fns.items():
                y = fn(q, k, v)
                y.backward(go)
                errs = [(a.double() - r).norm() / r.norm() for a, r in
                        ((y, yr), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad))]
                for t in (q, k, v):
                    t.grad = None
                print(f"  {n:<14} fwd {best[n, False] * 1e3:7.1f}  fwd+bwd {best[n, True] * 1e3:7.1f} CPU-ms "
                      f"({best[n, True] / base:4.2f}x sdpa)   rel. err y/dq/dk/dv "
                      + " ".join(f"{e:.1e}" for e in errs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
