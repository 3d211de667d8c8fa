"""The GEMM floor of a training step: every matmul of forward + backward, each timed alone at its real shape.

A 2048^3 matmul is the wrong limit for a small model: a (2048 x 384) @ (384 x 1024) GEMM runs far below the
square peak. The floor here is the sum of the step's own GEMMs, each timed alone (the median of a few runs, CPU
seconds of this process, so time-slicing by other processes stays out) in the same process as the step.
bench/train_step.py --floor prints the step (the median of its timed steps) against it, in fp32 and (on a host
with native bf16) in bf16, and beside that the best step against the sum of each GEMM's best run.

GEMMs of a baseline/gqa/bottleneck block (M = micro-batch x T rows), linear y = x W^T (K -> N):
  forward  (M, K) @ (K, N);   backward dX = dY W: (M, N) @ (N, K);   dW = dY^T X: (N, M) @ (M, K)
for the projections as the model runs them: qkv (one fused GEMM; q and v when tie_qk), o, gate_up (fused), down,
and the LM head (chunked loss: logits, grad_h, grad_w). Attention per layer
as (B*H) batched matmuls: forward QK^T and PV, backward dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q,
full T x S (no causal halving, as ModelConfig.flops_per_token counts; a causal kernel may skip half).
A GEMM is timed in the faster of its forms the step could run: the LM head's forward, as one call and in the
column blocks model/loss_chunk.py runs it in on CPU (half the time on an AMX host), and its bf16 weight gradient
also by the CPU kernels' GEMM where it is built (model/csrc/cpu_lm_head.cpp, which the step runs there), so the floor
is no easier to approach than what the GEMMs can do. A weight gradient is timed with dY^T contiguous, the form
torch's GEMM does fastest, though the step multiplies dY^T as a transposed view: bench/dw_layouts.py prints what
those layouts cost (config S, Zen 5, 2 threads: +15-18 ms a step before the LM head's kernel, most of it the LM
head's).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model import ModelConfig, cpu_gemms
from model.cpu_attention import native_bf16 as cpu_native_bf16
from model.loss_eager import lm_head_kernel_applies

try:
    from model.loss_chunk import VOCAB_BLOCK
except ImportError:  # a --ref checkout from before the LM head's column blocks: its floor is timed the same way
    VOCAB_BLOCK = 8192


@dataclass(frozen=True)
class Gemm:
    """One (batched) matmul of the step: `count` of (batch, m, k) @ (batch, k, n)."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    count: int  # how often the step runs it (layers)

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.count


def _linear(name: str, rows: int, k: int, n: int, count: int) -> list[Gemm]:
    return [Gemm(f"{name} fwd", 1, rows, k, n, count), Gemm(f"{name} dX", 1, rows, n, k, count),
            Gemm(f"{name} dW", 1, n, rows, k, count)]


def step_gemms(cfg: ModelConfig, batch: int, seq_len: int) -> list[Gemm]:
    """Every GEMM of one forward + backward of GPT(cfg) on a (batch, seq_len) micro-batch (not decoupled)."""
    if cfg.attn == "decoupled":  # two q/k paths: its own shapes, not listed here
        raise ValueError("the GEMM list covers baseline, gqa and bottleneck attention, not decoupled")
    rows, d, L = batch * seq_len, cfg.d_model, cfg.n_layer
    hd_qk, hd_v, _ = cfg.head_dims
    h, kv = cfg.n_head, cfg.n_kv_head
    keys = seq_len + (1 if cfg.null_attn else 0)
    out: list[Gemm] = []
    if cfg.tie_qk:  # k is q: q and v are two projections
        out += _linear("q", rows, d, h * hd_qk, L) + _linear("v", rows, d, kv * hd_v, L)
    else:  # one fused qkv_proj (model/attention.py): one wider GEMM per direction, not three
        out += _linear("qkv", rows, d, (h + kv) * hd_qk + kv * hd_v, L)
    out += _linear("o", rows, h * hd_v, d, L)
    out += _linear("gate_up", rows, d, 2 * cfg.d_ff, L)  # fused in model/gpt.py SwiGLU
    out += _linear("down", rows, cfg.d_ff, d, L)
    bh = batch * h
    out += [Gemm("attn QK^T", bh, seq_len, hd_qk, keys, L), Gemm("attn PV", bh, seq_len, keys, hd_v, L),
            Gemm("attn dV=P^T dO", bh, keys, seq_len, hd_v, L), Gemm("attn dP=dO V^T", bh, seq_len, hd_v, keys, L),
            Gemm("attn dQ=dS K", bh, seq_len, keys, hd_qk, L), Gemm("attn dK=dS^T Q", bh, keys, seq_len, hd_qk, L)]
    out += _linear("lm_head", rows, d, cfg.padded_vocab_size, 1)
    return out


class Forms:
    """Forms of one product (callables), each run once here (the warm-up); `run` times each once, in turn, so load
    from other processes shifts them alike. runs[i]: form i's (wall, CPU) seconds per run."""

    def __init__(self, forms: list[Callable[[], object]]) -> None:
        self.forms = forms
        for form in forms:
            form()
        self.runs: list[list[tuple[float, float]]] = [[] for _ in forms]

    def run(self) -> None:
        for form, timed in zip(self.forms, self.runs, strict=True):
            t0, c0 = time.perf_counter(), time.process_time()
            form()
            timed.append((time.perf_counter() - t0, time.process_time() - c0))


class _Shape(Forms):
    """One GEMM shape's operands, allocated once, and its forms (time_gemm)."""

    def __init__(self, g: Gemm, dtype: torch.dtype) -> None:
        a = torch.randn(g.batch, g.m, g.k, dtype=dtype).squeeze(0)
        b = torch.randn(g.batch, g.k, g.n, dtype=dtype).squeeze(0)
        out = torch.empty(g.batch, g.m, g.n, dtype=dtype).squeeze(0)

        def whole() -> None:
            (torch.bmm if g.batch > 1 else torch.mm)(a, b, out=out)

        def column_blocks() -> None:
            for v in range(0, g.n, VOCAB_BLOCK):
                torch.mm(a, b[:, v:v + VOCAB_BLOCK], out=out[:, v:v + VOCAB_BLOCK])

        forms = [whole, column_blocks] if g.batch == 1 and g.n > VOCAB_BLOCK else [whole]
        # The LM head's weight gradient (V x rows) @ (rows x d) also as the step runs it where the kernel is built:
        # from the logit gradient row-major (rows x V), into fp32 V x d.
        # `grad` is filled only where the kernel applies (206 MB at config S; empty memory is never touched).
        grad = torch.empty(g.k, g.m, dtype=dtype) if g.name == "lm_head dW" and g.batch == 1 else None
        if grad is not None and lm_head_kernel_applies(grad, b):
            grad.normal_()
            valid, dw = torch.ones(g.k, dtype=torch.bool), torch.empty(g.m, g.n)

            def lm_head_kernel() -> None:
                cpu_gemms.lm_head_weight_grad(grad, b, valid, dw)

            forms.append(lm_head_kernel)
        super().__init__(forms)

    def result(self) -> dict:
        medians = [statistics.median(c for _, c in timed) for timed in self.runs]
        best = self.runs[min(range(len(self.forms)), key=medians.__getitem__)]
        return {"wall_s": statistics.median(w for w, _ in best), "cpu_s": min(medians),
                "best_wall_s": min(w for w, _ in best), "best_cpu_s": min(c for _, c in best),
                "forms": {form.__name__: m for form, m in zip(self.forms, medians, strict=True)}, "runs": best}


def time_gemm(g: Gemm, dtype: torch.dtype, reps: int = 5) -> dict:
    """One run of `g` (count 1) over `reps` runs after a warm-up: median and best wall and CPU seconds. A GEMM wider
    than the LM head's column blocks (model/loss_chunk.py VOCAB_BLOCK) is timed both whole and in those blocks,
    and the faster form (by median CPU time) counts: the floor is what the GEMMs can do, not what one call of them
    does."""
    shape = _Shape(g, dtype)
    for _ in range(reps):
        shape.run()
    return shape.result()


class FloorTimer:
    """The step's GEMMs, each distinct shape's operands allocated and warmed up once. `run()` times every GEMM once;
    `floor()` sums the runs so far (gemm_floor), and also each run's own floor (`runs_cpu_s`, `runs_wall_s`), so a
    bench can time the step and one run of its GEMMs side by side: on a host whose speed moves by 2x within
    minutes, the ratio of a step to the GEMMs run next to it is steadier than a median against a median taken
    a minute apart.

    Each distinct shape is timed once per run and reused: forward and dX of a square projection share a shape, and
    timing it twice only adds noise between identical GEMMs."""

    def __init__(self, cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> None:
        self.gemms = step_gemms(cfg, batch, seq_len)
        self.shapes: dict[tuple[int, int, int, int], _Shape] = {}
        for g in self.gemms:
            key = (g.batch, g.m, g.k, g.n)
            if key not in self.shapes:
                self.shapes[key] = _Shape(g, dtype)

    def run(self) -> None:
        for shape in self.shapes.values():
            shape.run()

    def floor(self) -> dict:
        timed = {key: shape.result() for key, shape in self.shapes.items()}
        rows = []
        for g in self.gemms:
            key = (g.batch, g.m, g.k, g.n)
            t = timed[key]
            rows.append({"name": g.name, "shape": "x".join(map(str, key if g.batch > 1 else key[1:])),
                         "count": g.count, "flops": g.flops, "forms": t["forms"],
                         **{k: t[k] * g.count for k in ("wall_s", "cpu_s", "best_wall_s", "best_cpu_s")}})
        n_runs = len(next(iter(timed.values()))["runs"])
        per_run = [[sum(timed[(g.batch, g.m, g.k, g.n)]["runs"][i][j] * g.count for g in self.gemms)
                    for i in range(n_runs)] for j in (0, 1)]
        return {"rows": rows, "flops": sum(r["flops"] for r in rows),
                "runs_wall_s": per_run[0], "runs_cpu_s": per_run[1],
                **{k: sum(r[k] for r in rows) for k in ("wall_s", "cpu_s", "best_wall_s", "best_cpu_s")}}


def gemm_floor(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype, reps: int = 5) -> dict:
    """The step's GEMMs timed alone: per-GEMM rows and the floor (sum over GEMMs x count), wall and CPU s, each
    GEMM's median over `reps` runs (wall_s, cpu_s) and its best (best_wall_s, best_cpu_s).

    The median is the floor's figure because the step's is a median too: on a shared host one GEMM's runs spread
    up to 2.5x (config S's LM-head dX, the same tensors, 2 threads: 42-112 ms), and a sum of each GEMM's best run
    against a typical step would count that spread as the step's overhead."""
    timer = FloorTimer(cfg, batch, seq_len, dtype)
    for _ in range(reps):
        timer.run()
    return timer.floor()


# --isa: the variables that cap what torch's own kernels (ATen), oneDNN (bf16 and some fp32 GEMMs) and MKL (fp32
# GEMMs) may use, so this host runs a step as a host with only that ISA would (its caches and memory stay this host's).
CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
ISA_CAPS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


def host_isa() -> str:
    """The host's matmul-relevant ISA flags (x86 /proc/cpuinfo; bf16 is native with avx512_bf16 or amx_bf16), the
    kernels torch runs, and the caps in force (ISA_CAPS) where a bench emulates a smaller host."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    caps = [f"{k}={os.environ[k]}" for k in CAP_VARS if k in os.environ]
    capped = f", capped by {' '.join(caps)}" if caps else ""
    return (f"{' '.join(keep) or 'unknown (no x86 flags)'}; torch's kernels {torch.backends.cpu.get_cpu_capability()},"
            f" bf16 {'native' if native_bf16() else 'emulated'}{capped}")


def native_bf16() -> bool:
    """Whether the host multiplies bf16 natively: model/'s answer (oneDNN's), the one the step's own paths use."""
    return cpu_native_bf16()
