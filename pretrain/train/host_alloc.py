"""The CPU allocator setting of every process that trains or times a step: large tensors on transparent huge pages.

Torch takes CPU memory from glibc, which serves blocks above its mmap threshold (at most 32 MB) with mmap and
returns them with munmap: each step's large tensors (the tied embedding's fp32 gradient, its bf16 cast and dW,
activations) are page-faulted and zero-filled again, 4 KiB at a time. Config S on CPU took ~120,000 minor faults
(~470 MB) per step, ~8 % of a bf16 step (AVX-512-BF16 host, 1 thread). With THP_MEM_ALLOC_ENABLE=1, c10's CPU
allocator advises huge pages (madvise MADV_HUGEPAGE) for large blocks: 2 MiB per fault, ~7,000 faults a step.

c10 reads the variable once, at its first CPU allocation, so it is set here before torch allocates anything:
the trainer's and launcher's entries (flags before torch) and the probe's child environment. A value the user set
(0 to turn it off) is kept. Kernels with THP set to "never" ignore the advice; nothing else changes then. It only
concerns host memory: CUDA memory comes from the caching allocator (pretrain/train/speed.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with huge pages for torch's large CPU tensors, unless it already says otherwise (for a child process)."""
    return {**env, THP_ENV: env.get(THP_ENV, "1")}


def use_huge_pages() -> None:
    """Turn huge pages on for this process; effective only before torch's first CPU allocation."""
    os.environ.setdefault(THP_ENV, "1")
