"""OpenMP's idle threads in every process that trains or times a step on CPU: a short spin, then asleep.

Torch's CPU kernels and its GEMMs (oneDNN, MKL) run on libgomp's thread team. Unless told otherwise, a team thread
that finishes a parallel region spins for GOMP_SPINCOUNT (300,000) pauses, about a millisecond, waiting for the next
one. A training step is thousands of parallel regions separated by Python, autograd and ops too small to split, so
with 2 threads the idle one spins through nearly every gap, and on a host whose cores are shared (other processes, a
second rank, the data loader) it takes a core from work that could run. Sleeping at once (OMP_WAIT_POLICY=PASSIVE)
fixes the CPU time but pays a futex wake-up per region: config S's step at 2 threads on an idle host ran ~8 %
slower in wall time than spinning. A spin of 3,000 pauses (tens of microseconds) covers the gaps between the
kernels of one op and sleeps through Python's: on that host (AMD EPYC, AVX-512-BF16, 2 cores) bf16 0.69-0.72 s wall
per step against 0.73-0.78 spinning and 0.81-0.84 asleep, and under two busy processes 1.50 s against 2.13 and
1.83 (bench/README.md). The GEMMs themselves run as fast (bench/train_step.py --floor times them in-process).

libgomp reads the variables once, when it loads with torch: `configure_host_threads` runs in the trainer's and the
launcher's entries before torch loads, and processes started to time steps get it in their environment
(`with_idle_threads_asleep`). A wait policy or spin count the user set is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_ENV = "GOMP_SPINCOUNT"
SPIN = "3000"


def _setting(env: Mapping[str, str]) -> dict[str, str]:
    """What to add to `env`: nothing when the user chose how OpenMP threads wait."""
    return {} if WAIT_POLICY_ENV in env or SPIN_ENV in env else {SPIN_ENV: SPIN}


def with_idle_threads_asleep(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with OpenMP's idle threads asleep after a short spin, unless it sets how they wait (a child process)."""
    return {**env, **_setting(env)}


def configure_host_threads() -> None:
    """The setting for this process; takes effect only before torch (and with it libgomp) loads."""
    os.environ.update(_setting(os.environ))
