"""Devices: picking one, autocast dtype, memory figures, and a peak-FLOPs table for MFU.

CUDA-only code lives here and is kept small; every function has a CPU answer that tests exercise.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys

import torch

from model import cpu_kernels
from model.cpu_attention import native_bf16
from pretrain.errors import UserError
from pretrain.train.host_alloc import keep_large_blocks
from pretrain.train.host_blas import mkl_on_amd
from pretrain.units import torch_dtype

# Dense bf16 tensor-core peak FLOP/s (no sparsity), from vendor datasheets. Matched by substring of
# torch.cuda.get_device_name(); the first match wins, so more specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("A40", 150e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 365e12),
    ("RTX 4090", 165e12),
    ("RTX 4080", 97e12),
    ("RTX 3090", 71e12),
    ("RTX 3080", 59e12),
    ("V100", 125e12),  # fp16 tensor cores; no bf16
    ("T4", 65e12),  # fp16 tensor cores; no bf16
]


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else mps, else cpu. Asking for a missing device is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def setup_device(device: torch.device) -> dict[str, object]:
    """Per-process speed settings (TF32 matmuls on Ampere+: bf16 runs barely notice the precision); returns
    what the run's meta event records about the device (a CPU's vector ISA decides whether bf16 is native)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return {"name": torch.cuda.get_device_name(device), "tf32": True}
    if device.type == "cpu":
        keep_large_blocks()  # the heap is the device's memory here (pretrain/train/host_alloc.py)
        # cpu_kernels.kernels(): built here (~1 s, once per host) before the first step's clock, not inside it
        return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                "native_bf16": cpu_has_fast_bf16(), "fused_kernels": cpu_kernels.kernels() is not None,
                "mkl_on_amd": mkl_on_amd()}
    return {}


# bf16 tensor cores arrived with Ampere (sm_80). torch.cuda.is_bf16_supported() also says True on a T4 (7.5) or
# V100 (7.0), where bf16 is emulated and SDPA falls back to the math kernel: the plan and the trainer both use
# this rule instead.
BF16_MIN_CAPABILITY = (8, 0)


def capability_has_bf16(capability: tuple[int, int] | None) -> bool:
    """Whether a GPU of this compute capability runs bf16 natively; None (not a CUDA device) counts as yes."""
    return capability is None or tuple(capability) >= BF16_MIN_CAPABILITY


# float8 tensor cores (e4m3/e5m2 matmuls, what torchao's float8 training runs on) arrived with Ada/Hopper (sm_89).
FLOAT8_MIN_CAPABILITY = (8, 9)


def capability_has_float8(capability: tuple[int, int] | None) -> bool:
    """Whether a GPU of this compute capability multiplies float8 natively (L4, L40S, RTX 4090, H100)."""
    return capability is not None and tuple(capability) >= FLOAT8_MIN_CAPABILITY


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability (major, minor) of `device`, None for CPU / MPS. Tests fake a card here."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def supports_bf16(device: torch.device) -> bool:
    return capability_has_bf16(compute_capability(device))


def host_staging_buffer(nbytes: int) -> torch.Tensor:
    """A byte buffer device->host copies go through: page-locked when CUDA is present, else ordinary memory.
    Raises RuntimeError when the OS refuses to pin it (rented hosts with little RAM)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


def stages_through_host(t: torch.Tensor) -> bool:
    """Whether a checkpoint snapshot copies `t` through the staging buffer (device memory) or directly (CPU)."""
    return t.device.type != "cpu"


def available_host_memory() -> int | None:
    """Bytes of host RAM available without swapping (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX). Without it (AVX2 laptops and many cloud
    hosts) bf16 is emulated and far slower than fp32, so the cpu tier trains in fp32 there. model/'s answer, the
    one its CPU attention path uses."""
    return native_bf16()


def emulated_autocast_warning(device: torch.device, amp: bool, amp_dtype: str) -> str | None:
    """The line a run prints when it autocasts to bf16 on a CPU that emulates bf16: config S's fp32 step took 3.1 s
    on an AVX2 host (AMD Zen 2, 2 threads), its bf16 step 256 s. The trainer keeps what it was given (the planner's
    cpu tier passes --no-amp there); None where nothing is emulated."""
    if device.type != "cpu" or not amp or amp_dtype != "bf16" or cpu_has_fast_bf16():
        return None
    return ("warning: this CPU has no native bf16 (AVX-512-BF16 or AMX), so bf16 autocast is emulated, ~80x slower "
            "than fp32 on an AVX2 host: pass --no-amp (run_1b_launch.py --vram cpu plans that)")


def amp_dtype(name: str) -> torch.dtype:
    return torch_dtype(name)


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of this device, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def rss_bytes() -> int:
    """Peak resident set size of this process (what CPU runs report as memory)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory figures for logs, in GB."""
    gb = 1024**3
    if device.type == "cuda":
        return {
            "mem_alloc_gb": torch.cuda.memory_allocated(device) / gb,
            "mem_reserved_gb": torch.cuda.memory_reserved(device) / gb,
            "mem_peak_gb": torch.cuda.max_memory_allocated(device) / gb,
        }
    return {"mem_rss_gb": rss_bytes() / gb}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
