"""How a bench runs one measurement in a fresh process (bench/train_step.py, step_parts.py, peers.py): the child's
environment (its thread count, its own inductor cache, the trainer's process settings, a --ref checkout's code
first, ISA caps) and the JSON result it prints last.

Imported by the parent only: a --ref child runs with the other checkout first on sys.path, which may not have this
module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.gemm_floor import ISA_CAPS


def child_env(threads: int, inductor_cache: str, ref: str | None = None,
              trainer_settings: bool = True, isa: str | None = None) -> dict[str, str]:
    """The environment of a child that times a step: `threads` OpenMP threads, its own inductor cache, and (with
    `trainer_settings`) the process settings this project's trainer makes before torch loads, where the checkout
    timed (`ref`, else this one) has them: huge pages (pretrain/train/host_alloc.py), OpenMP's short spin
    (pretrain/train/host_threads.py) and MKL's optimized paths on AMD CPUs (pretrain/train/host_blas.py). `ref` also
    puts that checkout's code first (BENCH_CODE_ROOT). `isa` caps the kernels to that ISA (bench/gemm_floor.py:
    ISA_CAPS), emulating a smaller host."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": inductor_cache,
           **(ISA_CAPS[isa] if isa else {})}
    if ref:
        env["BENCH_CODE_ROOT"] = str(Path(ref).resolve())
    if trainer_settings and (ref is None or (Path(ref) / "pretrain/train/host_alloc.py").exists()):
        from pretrain.train.host_alloc import with_huge_pages

        env = with_huge_pages(env)
    if trainer_settings and (ref is None or (Path(ref) / "pretrain/train/host_threads.py").exists()):
        from pretrain.train.host_threads import with_idle_threads_asleep

        env = with_idle_threads_asleep(env)
    if trainer_settings and (ref is None or (Path(ref) / "pretrain/train/host_blas.py").exists()):
        from pretrain.train.host_blas import with_mkl_on_amd

        env = with_mkl_on_amd(env)
    return env


def run_child(kind: str, spec: dict[str, Any], threads: int, script: str, ref: str | None = None,
              isa: str | None = None) -> dict[str, Any]:
    """One measurement in a fresh process: clean memory peak, cold inductor cache, fixed thread count; with `ref`,
    of that checkout's code (its process environment as its trainer sets it: none of this checkout's settings).
    `script` (a bench that takes `--child KIND SPEC`) prints the result as its last line of JSON."""
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        env = child_env(threads, cache, ref, isa=isa)
        proc = subprocess.run([sys.executable, script, "--child", kind, json.dumps(spec)], env=env,
                              stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
