"""MKL's optimized GEMMs on AMD CPUs, in every process that trains or times a step: loaded before torch.

Torch's fp32 matmuls on x86 are MKL's sgemm, linked into libtorch_cpu. MKL takes its optimized code paths only
where its vendor check, `mkl_serv_intel_cpu_true`, says the CPU is Intel; on an AMD CPU it runs a slower generic
path whatever the CPU's ISA. On an AMD EPYC (Zen 2, AVX2) at 1 thread, config S's GEMMs ran 64-74 GFLOP/s against
98-101 with the check answered yes, as fast as OpenBLAS on the same host (bench/README.md). The check is an exported
function that libtorch_cpu finds through the dynamic linker's global scope, so a library loaded with RTLD_GLOBAL
before torch whose `mkl_serv_intel_cpu_true` returns 1 is the one MKL asks; MKL then picks its kernels by the CPU's
feature bits (AVX2, AVX-512) as on an Intel CPU with those. The library is one line of C, built once per host with
the system's C compiler (~0.1 s) and cached beside model/cpu_kernels.py's library ($PRETRAIN_KERNELS_DIR).

Only on x86-64 Linux with an AMD CPU, and only before torch loads (afterwards MKL has asked already: nothing is
done; a child process that imports torch at once gets it preloaded instead, with_mkl_on_amd). PRETRAIN_MKL_ON_AMD=0
keeps MKL's own choice; no compiler, or a build that fails, keeps it too. bf16 matmuls are oneDNN's, which has no
vendor check; CUDA runs do not use MKL for their model.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping

from model.native_build import build, cache_dir

ENV = "PRETRAIN_MKL_ON_AMD"
SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
_loaded: list[str] = []  # the library's path once this process loaded it (this module's copy)


def amd_x86_linux() -> bool:
    """An AMD x86-64 CPU under Linux (/proc/cpuinfo's vendor_id)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


def _library() -> str | None:
    """The library's path (built now unless cached) where it applies (module docstring), else None."""
    if os.environ.get(ENV, "1") == "0" or not amd_x86_linux():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    path = cache_dir() / f"mkl_on_amd-{hashlib.sha256((compiler + SOURCE).encode()).hexdigest()[:16]}.so"
    try:
        if not path.is_file():
            build(path, [compiler, "-shared", "-fPIC", "-O2", "-x", "c", "-"], stdin=SOURCE, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return str(path)


def configure_host_blas() -> bool:
    """MKL's optimized paths for this process where they apply, before torch loads; True when they are on."""
    if not _loaded and "torch" not in sys.modules and (path := _library()):
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            _loaded.append(path)
        except OSError:
            pass
    return bool(_loaded)


def with_mkl_on_amd(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child process that imports torch before it could call configure_host_blas (a bench's or the
    probe's): the library preloaded (LD_PRELOAD) where it applies."""
    path = _library() if env.get(ENV, "1") != "0" else None
    preload = env.get("LD_PRELOAD", "").split()
    if path is None or path in preload or any(c in path for c in " :"):  # LD_PRELOAD splits at both
        return dict(env)
    return {**env, "LD_PRELOAD": " ".join([*preload, path])}


def mkl_on_amd() -> bool:
    """Whether MKL's vendor check is answered yes on this AMD CPU (what a run's meta records): asked of the process's
    global scope, where the library sits whoever loaded it (a process forked after it was loaded, too)."""
    if not amd_x86_linux():
        return False
    try:
        check = ctypes.CDLL(None).mkl_serv_intel_cpu_true  # absent there unless loaded: libtorch_cpu's is local
    except AttributeError:
        return False
    check.restype = ctypes.c_int
    return check() == 1
