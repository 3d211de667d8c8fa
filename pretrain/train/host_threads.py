"""OpenMP's idle threads in every process that trains or times a step on CPU: asleep between parallel regions.

Torch's CPU kernels and its GEMMs (oneDNN, MKL) run on libgomp's thread team. Unless told otherwise, a team thread
that finishes a parallel region spins (GOMP_SPINCOUNT, 300,000 pauses: milliseconds) waiting for the next one. A
training step is thousands of parallel regions separated by Python, autograd and ops too small to split, so with
2 threads the idle one spins through nearly every gap: config S's bf16 step took ~2.5-3 CPU-s at 2 threads against
~1.5 with idle threads asleep (AVX-512-BF16 host, 2 cores), the difference all spinning. On a host whose cores are
shared (other processes, a second rank, the data loader) a spinning thread also takes a core from work that could
run: the same step took 3-18 s of wall time spinning against ~3 s asleep at load 5-8 on 2 cores. With
OMP_WAIT_POLICY=PASSIVE a team thread sleeps as soon as its region ends and is woken for the next; the GEMMs
themselves run as fast (bench/train_step.py --floor times them in the same process).

libgomp reads the variable once, when it loads with torch: `configure_host_threads` runs in the trainer's and the
launcher's entries before torch loads, and processes started to time steps get it in their environment
(`with_idle_threads_asleep`). A policy the user set (ACTIVE to spin) is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def with_idle_threads_asleep(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with OpenMP's idle threads asleep, unless it already sets a wait policy (for a child process)."""
    return {**env, WAIT_POLICY_ENV: env.get(WAIT_POLICY_ENV, "PASSIVE")}


def configure_host_threads() -> None:
    """The setting for this process; takes effect only before torch (and with it libgomp) loads."""
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")
