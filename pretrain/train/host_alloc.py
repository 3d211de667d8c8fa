"""Host memory settings of every process that trains or times a step: freed CPU tensors are reused, not re-faulted.

Torch takes CPU memory from glibc, which serves blocks above its mmap threshold (adaptive, 128 KiB up to 32 MiB)
with mmap and returns them with munmap, and trims the top of its heap whenever 128 KiB+ is free there. A training
step frees and re-allocates the same tensors every step (gradients are set to None, activations die in backward),
so each step page-faulted and zero-filled them again, 4 KiB at a time: config S on CPU took ~100,000 minor faults
(~400 MB) and 0.15-0.25 s of system time per ~1.6 CPU-s bf16 step (AVX-512-BF16 host, 1 thread). Two settings:
  * glibc (mallopt): blocks up to 32 MiB (its largest threshold) come from the heap and the heap is not trimmed,
    so a step reuses the previous step's memory: ~38,000 faults, ~0.07 s of system time.
  * THP_MEM_ALLOC_ENABLE=1: c10's CPU allocator advises transparent huge pages for large blocks, so those still
    mapped per step (above 32 MiB: the tied embedding's gradient and casts) fault 2 MiB at a time: ~2,000 faults.
Memory freed by a step stays with the process for the next one (the peak step's, as CUDA's caching allocator keeps).
Training on the CPU, where host memory is the device's, also takes blocks above 32 MiB from the heap
(keep_large_blocks, at device setup): config S's tied embedding gradient (77 MB) was otherwise mapped anew each step,
and its first touch, faulting in huge pages out of a fragmented host, took 60-90 ms of system time a step at 2
threads (the copy that fills it: ~100 ms wall, ~9 ms in reused memory). GPU runs keep glibc's mapping of large blocks,
so the host copies a checkpoint save makes go back to the system after it.

c10 reads its variable once, at its first CPU allocation: `configure_host_memory` runs in the trainer's and the
launcher's entries before torch loads; child processes that time steps get it through `with_huge_pages` and call
`configure_host_memory` themselves. A THP value the user set (0 to turn it off) is kept; without glibc (macOS,
musl) only the THP variable applies; kernels with THP "never" ignore the advice. CUDA memory is the caching
allocator's (pretrain/train/speed.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

THP_ENV = "THP_MEM_ALLOC_ENABLE"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim a step's worth of freed memory


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with huge pages for torch's large CPU tensors, unless it already says otherwise (for a child process)."""
    return {**env, THP_ENV: env.get(THP_ENV, "1")}


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Each (parameter, value) through glibc's mallopt; False where there is no glibc or it refused one."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([bool(mallopt(param, value)) for param, value in settings])


def keep_freed_memory() -> bool:
    """glibc: serve blocks up to MMAP_THRESHOLD from the heap and never trim it. False where there is no glibc."""
    return _mallopt((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def keep_large_blocks() -> bool:
    """glibc: serve every block from the (never trimmed) heap, none with mmap: for processes whose training step
    runs on the CPU (module docstring). False where there is no glibc."""
    return keep_freed_memory() and _mallopt((_M_MMAP_MAX, 0))


def configure_host_memory() -> None:
    """Both settings for this process; the huge pages only take effect before torch's first CPU allocation."""
    os.environ.setdefault(THP_ENV, "1")
    keep_freed_memory()
