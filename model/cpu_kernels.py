"""Fused CPU kernels (model/csrc/*.cpp), built on first use with the host's C++ compiler (issue 23.1).

Why: on a CPU with native bf16 GEMMs (AVX-512-BF16, AMX) the eager step's time outside its GEMMs is a few thousand
elementwise ops, each its own pass, most with a bf16 <-> fp32 conversion copy around it and a Python dispatch in
front of it: the loss's softmax over 50K-wide rows ran as ~300 blocks of 7 torch ops a chunk. Here the loss's
cross-entropy and logit gradient, RMSNorm, SwiGLU and the rotary embedding are one pass each way, one call per
tensor (config S, bf16, Zen 5: 70-72 % -> 77-80 % of the GEMM floor at 1 thread; bench/README.md); where the
compiler targets AVX-512-BF16, causal attention is one call each way too, and the LM head's weight gradient one GEMM
of the library's own; where it targets AVX2 without AVX-512, fp32 causal attention is (model/cpu_gemms.py wraps them).

How: the sources are compiled once per host into one shared library (`c++ -O3 -march=native -fopenmp`, ~1 s; capped
to AVX2 or SSE4.2 where torch's own kernels are, by ATEN_CPU_CAPABILITY), cached under $PRETRAIN_KERNELS_DIR
(default ~/.cache/pretrain-kernels) by a hash of the sources, the compiler, the flags and the CPU's flags, and loaded
with ctypes. Its OpenMP is torch's own libgomp (loaded first, same soname), run with torch's thread count. No
compiler, a failed build (one warning line) or PRETRAIN_CPU_KERNELS=0: kernels() is None and every caller keeps
its torch ops. Callers take the kernels only for plain CPU tensors, eager, outside dispatch modes but selective
checkpointing's (enabled_for): fake tensors, the planner's memory trace (which models the GPU's step) and every
other device keep torch's ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .native_build import build, cache_dir

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-std=c++17", "-O3", "-fopenmp", "-fPIC", "-shared")
# torch's own vector-ISA cap (ATEN_CPU_CAPABILITY), which a bench sets to run as a smaller host would
# (bench/gemm_floor.py ISA_CAPS), caps these kernels too: AVX2 + FMA, or SSE4.2; otherwise the host's own ISA.
_MARCH = {"avx2": "x86-64-v3", "default": "x86-64-v2"}
WIDTH = 16  # the kernels' vector width: row lengths must be multiples of it
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def enabled_for(*tensors: torch.Tensor) -> bool:
    """Whether these tensors may take the kernels: plain CPU tensors (not fake, functional or other subclasses) of
    one supported dtype, eager, the library built, and no dispatch mode active but selective checkpointing's (which
    only keeps and replays op outputs: its gradients stay those of the run without it). Any other mode (a memory
    tracker modelling the GPU's step, an op counter) sees torch's ops."""
    if torch.compiler.is_compiling() or not _only_replay_modes():
        return False
    dtype = tensors[0].dtype
    if not all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == dtype for t in tensors):
        return False
    return dtype in _DTYPES and kernels() is not None


# torch.utils.checkpoint's selective-checkpoint modes (by name: private classes).
_REPLAY_MODES = frozenset({"_CachingTorchDispatchMode", "_CachedTorchDispatchMode"})


def _only_replay_modes() -> bool:
    return all(type(m).__name__ in _REPLAY_MODES for m in _get_current_dispatch_mode_stack())


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The built library, or None (disabled, no compiler, build failed: see the module docstring)."""
    if os.environ.get("PRETRAIN_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler or not _sources():
        return None
    path = cache_dir() / f"cpu_kernels-{_key(compiler)}.so"
    torch.get_num_threads()  # torch's OpenMP runtime is loaded before the library that links against it
    for attempt in range(2):  # a cached library that does not load (damaged) is built again, once
        try:
            if attempt or not path.is_file():
                build(path, [compiler, *_flags(), *map(str, _sources())])
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as e:
            if attempt == 0 and path.is_file():
                continue
            detail = getattr(e, "stderr", "") or str(e)
            first = detail.strip().splitlines()[0] if detail.strip() else type(e).__name__
            print(f"warning: CPU kernels not built ({first}); using torch's ops (slower on CPU). "
                  "Set PRETRAIN_CPU_KERNELS=0 to skip the build.", file=sys.stderr)
            return None
        _declare(lib)
        return lib
    return None


def _flags() -> tuple[str, ...]:
    march = _MARCH.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower(), "native")
    return (*FLAGS, f"-march={march}")


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def _key(compiler: str) -> str:
    """Sources (and their shared header), compiler, flags and CPU flags (-march=native code runs only where it was
    built)."""
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*.[ch]*")):
        h.update(path.name.encode() + path.read_bytes())
    h.update(" ".join((compiler, *_flags())).encode())
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        import platform
        flags = platform.processor() + platform.machine()
    h.update(flags.encode())
    return h.hexdigest()[:16]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for name in _DTYPES.values():
        getattr(lib, f"ce_grad_{name}").argtypes = [p, i64, i64, i64, i64, p, p, i32, p, i32]
        getattr(lib, f"swiglu_fwd_{name}").argtypes = [p, p, i64, i64, i32]
        getattr(lib, f"swiglu_bwd_{name}").argtypes = [p, p, p, i64, i64, i32]
        getattr(lib, f"rotate_{name}").argtypes = [p, p, *[i64] * 10, p, p, f32, i32]
        for fn in ("ce_grad", "swiglu_fwd", "swiglu_bwd", "rotate"):
            getattr(lib, f"{fn}_{name}").restype = None
        getattr(lib, f"sum_squares_{name}").argtypes = [p, p, i64, i32]
        getattr(lib, f"sum_squares_{name}").restype = ctypes.c_double
    lib.add_f32_bf16.argtypes, lib.add_f32_bf16.restype = [p, p, p, i64, i32], None
    d = ctypes.c_double
    lib.adamw_f32.argtypes, lib.adamw_f32.restype = [p, p, p, p, p, p, p, i64, d, d, d, d, d, f32, i32], None
    for name in ("f32_f32", "f32_bf16", "bf16_bf16"):
        getattr(lib, f"rms_norm_fwd_{name}").argtypes = [p, p, p, p, i64, i64, f32, i32]
        getattr(lib, f"rms_norm_bwd_{name}").argtypes = [p, p, p, p, p, p, i64, i64, i32]
        getattr(lib, f"rms_norm_fwd_{name}").restype = getattr(lib, f"rms_norm_bwd_{name}").restype = None
    # Compiled only for some targets (built): transpose_to_f32 with AVX-512, bf16 attention and lm_head_dw with
    # AVX-512-BF16, fp32 attention with AVX2 and without AVX-512.
    optional = {"transpose_to_f32_bf16": [p, i64, p, i64, i64, i32, f32, i32],
                **{f"attn_fwd_{t}": [p, p, p, p, p, p, f32, i32] for t in ("bf16", "f32")},
                **{f"attn_bwd_{t}": [p, p, p, p, p, p, p, p, p, f32, i32] for t in ("bf16", "f32")},
                "lm_head_dw_bf16": [p, i64, p, i64, p, p, i64, i64, i64, i32, f32, i32]}
    for name, argtypes in optional.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None


def built(name: str, *dtypes: torch.dtype) -> bool:
    """Whether the library has `name` for these dtypes (as _fn names it): some kernels are compiled only where the
    target has their instructions."""
    lib = kernels()
    return lib is not None and hasattr(lib, "_".join((name, *(_DTYPES[d] for d in dtypes))))


def _fn(name: str, *dtypes: torch.dtype) -> ctypes._CFuncPtr:
    """The library's `name` for these dtypes (swiglu_fwd, torch.bfloat16 -> swiglu_fwd_bf16)."""
    lib = kernels()
    assert lib is not None
    return getattr(lib, "_".join((name, *(_DTYPES[d] for d in dtypes))))


def ce_applies(logits: torch.Tensor) -> bool:
    """logits (n, V): rows contiguous, V a multiple of WIDTH."""
    return logits.dim() == 2 and logits.stride(1) == 1 and logits.shape[1] % WIDTH == 0 and enabled_for(logits)


def ce_and_logit_grad_(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, vocab_size: int,
                       want_grad: bool) -> torch.Tensor:
    """Per row of `logits` (n, V; rows contiguous, V a multiple of WIDTH): fp32 cross-entropy against `target`
    (int64 below vocab_size, else IndexError), 0 where not `valid`; with want_grad the rows are overwritten by
    softmax - onehot(target) (the softmax alone where not valid), columns >= vocab_size by 0."""
    n, V = logits.shape
    assert logits.stride(1) == 1 and V % WIDTH == 0 and target.dtype == torch.int64
    target, valid8 = target.contiguous(), valid.to(torch.uint8).contiguous()
    nv = min(vocab_size, V)
    # The kernel reads x[target] and its exp unchecked, and has exps only of the first nv columns.
    if n and not 0 <= int(target.min()) <= int(target.max()) < nv:
        raise IndexError(f"target out of range for a vocab of {nv} ({V} logits): "
                         f"{int(target.min())}..{int(target.max())}")
    ce = torch.empty(n, dtype=torch.float32)
    _fn("ce_grad", logits.dtype)(logits.data_ptr(), n, V, logits.stride(0), nv, target.data_ptr(),
                                 valid8.data_ptr(), int(want_grad), ce.data_ptr(), torch.get_num_threads())
    return ce


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a contiguous (..., 2f) [gate | up] tensor, f a multiple of WIDTH."""
    f = gate_up.shape[-1] // 2
    out = torch.empty(gate_up.shape[:-1] + (f,), dtype=gate_up.dtype)
    _fn("swiglu_fwd", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * f), f,
                                     torch.get_num_threads())
    return out


def swiglu_backward(gate_up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """The gradient of swiglu_forward with respect to gate_up, given dh (both contiguous)."""
    f = gate_up.shape[-1] // 2
    grad = torch.empty_like(gate_up)
    _fn("swiglu_bwd", gate_up.dtype)(gate_up.data_ptr(), dh.data_ptr(), grad.data_ptr(), gate_up.numel() // (2 * f),
                                     f, torch.get_num_threads())
    return grad


def swiglu_applies(gate_up: torch.Tensor) -> bool:
    return gate_up.is_contiguous() and (gate_up.shape[-1] // 2) % WIDTH == 0 and enabled_for(gate_up)


def rotate_applies(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """x (A, B, T, 2h) with contiguous rows and h a multiple of WIDTH; cos/sin fp32 (T, h)."""
    return (x.dim() == 4 and x.stride(-1) == 1 and (x.shape[-1] // 2) % WIDTH == 0 and cos.dtype == torch.float32
            and cos.shape == (x.shape[2], x.shape[3] // 2) and cos.device.type == "cpu" and enabled_for(x))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x (A, B, T, d) rotated by sign * angle (rotate half), in x's dtype: contiguous, or laid out (A, T, B, d) as x
    is when x is (attention's gradients for the projections' head views: autograd's view backward then copies
    nothing)."""
    a, b, t, d = x.shape
    if x.transpose(1, 2).is_contiguous():
        out = torch.empty((a, t, b, d), dtype=x.dtype).transpose(1, 2)
    else:
        out = torch.empty((a, b, t, d), dtype=x.dtype)
    cos, sin = cos.contiguous(), sin.contiguous()
    _fn("rotate", x.dtype)(x.data_ptr(), out.data_ptr(), a, b, t, d // 2, *x.stride()[:3], *out.stride()[:3],
                           cos.data_ptr(), sin.data_ptr(), sign, torch.get_num_threads())
    return out


def transpose_applies(src: torch.Tensor) -> bool:
    """src (d, n) bf16, rows contiguous, d and n multiples of WIDTH, and a library built with AVX-512."""
    return (src.dim() == 2 and src.dtype == torch.bfloat16 and src.stride(1) == 1 and src.shape[0] % WIDTH == 0
            and src.shape[1] % WIDTH == 0 and enabled_for(src) and built("transpose_to_f32", src.dtype))


def transpose_to_f32(src: torch.Tensor, out: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """src^T (n, d) in fp32, times `scale`: a new tensor, or `out` (contiguous fp32 (n, d)) plus it, times scale (the
    sum rounded, then the product)."""
    d, n = src.shape
    dst = torch.empty((n, d), dtype=torch.float32) if out is None else out
    assert dst.is_contiguous() and dst.shape == (n, d) and dst.dtype == torch.float32
    _fn("transpose_to_f32", src.dtype)(src.data_ptr(), src.stride(0), dst.data_ptr(), n, d, int(out is not None),
                                       scale, torch.get_num_threads())
    return dst


def sum_squares_applies(tensors: list[torch.Tensor]) -> bool:
    """Contiguous fp32 or bf16 tensors the library can sum the squares of."""
    return (bool(tensors) and all(t.dtype in _DTYPES and t.is_contiguous() for t in tensors)
            and all(enabled_for(t) for t in tensors))


def sum_squares(tensors: list[torch.Tensor]) -> float:
    """The sum of the squares of every value of `tensors`, accumulated in fp64 in blocks of a fixed size (fp32 tensors
    first, then bf16, each in order): the same number whatever the thread count."""
    total = 0.0
    for dtype in _DTYPES:
        group = [t for t in tensors if t.dtype == dtype]
        if group:
            ptrs = (ctypes.c_void_p * len(group))(*(t.data_ptr() for t in group))
            sizes = (ctypes.c_int64 * len(group))(*(t.numel() for t in group))
            total += _fn("sum_squares", dtype)(ptrs, sizes, len(group), torch.get_num_threads())
    return total


def adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], casts: list[torch.Tensor | None], steps: list[float], lr: float,
          betas: tuple[float, float], weight_decay: float, eps: float, factor: float) -> None:
    """torch's fused AdamW step, in place, on contiguous fp32 tensors of multiples of 16 values, each gradient read
    times `factor`, and each new weight's bf16 cast written into `casts` where given (pretrain/train/cpu_adamw.py)."""
    def ptrs(ts: list[torch.Tensor | None]) -> ctypes.Array:
        return (ctypes.c_void_p * len(ts))(*(None if t is None else t.data_ptr() for t in ts))

    n = len(params)
    _fn("adamw", torch.float32)(ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(casts),
                                (ctypes.c_int64 * n)(*(p.numel() for p in params)), (ctypes.c_double * n)(*steps), n,
                                lr, betas[0], betas[1], weight_decay, eps, factor, torch.get_num_threads())


def residual_add_applies(x: torch.Tensor, y: torch.Tensor) -> bool:
    """x fp32 and y bf16 of one shape, both contiguous, a whole number of WIDTH elements."""
    return (x.dtype == torch.float32 and y.dtype == torch.bfloat16 and x.shape == y.shape and x.is_contiguous()
            and y.is_contiguous() and x.numel() % WIDTH == 0 and enabled_for(x) and enabled_for(y))


def residual_add_forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y (fp32 x, bf16 y) in fp32, in one pass: torch's x + y's values (y's conversion is exact)."""
    out = torch.empty_like(x)
    _fn("add", x.dtype, y.dtype)(x.data_ptr(), y.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


def rms_norm_applies(x: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """x contiguous (..., d), d a multiple of WIDTH; fp32 in (fp32 or bf16 out) or bf16 in and out."""
    pair = (_DTYPES.get(x.dtype), _DTYPES.get(out_dtype))
    return (pair in (("f32", "f32"), ("f32", "bf16"), ("bf16", "bf16")) and x.is_contiguous()
            and x.shape[-1] % WIDTH == 0 and enabled_for(x))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x r w in out_dtype, r (..., 1) fp32) with r = 1/sqrt(mean(x^2) + eps) per row: model/fused.py's _RMSNorm."""
    d = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype)
    rstd = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32)
    w = weight.detach().float().contiguous()
    _fn("rms_norm_fwd", x.dtype, out_dtype)(
        x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads())
    return y, rstd


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw in weight's dtype) of rms_norm_forward, given dy (contiguous, its output's dtype)."""
    d, threads = x.shape[-1], torch.get_num_threads()
    dx = torch.empty_like(x)
    parts = torch.zeros(threads, d, dtype=torch.float32)
    w = weight.detach().float().contiguous()
    _fn("rms_norm_bwd", x.dtype, dy.dtype)(
        x.data_ptr(), w.data_ptr(), dy.data_ptr(), rstd.data_ptr(), dx.data_ptr(), parts.data_ptr(), x.numel() // d, d,
        threads)
    return dx, parts.sum(0).to(weight.dtype)
