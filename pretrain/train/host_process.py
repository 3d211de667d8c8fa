"""The process settings every entry that trains or times a training step makes before torch loads, in one place:
huge pages and the freed-memory setting (host_alloc.py), OpenMP's short spin (host_threads.py) and MKL's optimized
branch on AMD CPUs (host_blas.py). The trainer's, the launcher's and the demo's entries call configure_host_process;
a child that imports torch at once (the launcher's probe) gets the same through its environment
(with_host_settings)."""

from __future__ import annotations

from collections.abc import Mapping

from pretrain.train.host_alloc import configure_host_memory, with_huge_pages
from pretrain.train.host_blas import configure_host_blas, with_mkl_on_amd
from pretrain.train.host_threads import configure_host_threads, with_idle_threads_asleep


def configure_host_process() -> None:
    """This process's settings; each takes effect only before torch loads (or its first CPU allocation)."""
    configure_host_memory()
    configure_host_threads()
    configure_host_blas()


def with_host_settings(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child process with the same settings."""
    return with_mkl_on_amd(with_idle_threads_asleep(with_huge_pages(dict(env))))
