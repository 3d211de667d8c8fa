"""What a dry run of the 1b plan costs per tier, against a bare `import torch` (issue 20.8: at most about twice).

    .venv/bin/python bench/plan_dry_run.py                  # every tier, cold and warm estimate cache (~2-3 min)
    .venv/bin/python bench/plan_dry_run.py --tiers 80 16 --no-cold

Each figure is one fresh process (`python run_1b_launch.py --vram T --target-tokens 10B --data data/sample --json`),
timed as wall seconds and as CPU seconds (user + sys of the child: on a shared machine the CPU figure is the one to
compare). "cold" runs with an empty estimate cache, so every fake-tensor memory estimate is computed (what the first
dry run of a model and settings costs); "warm" is the same command again, served from the cache that run filled
(pretrain/plan/estimate_cache.py). The cpu tier also times real steps (measured_rate), which no cache serves.
Write the host's ISA next to the figures (e.g. AMD EPYC, AVX-512-BF16, 2 cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("80", "40", "24", "16", "cpu")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    p.add_argument("--no-cold", action="store_true", help="skip the cold runs (every estimate computed)")
    p.add_argument("--repeat", type=int, default=3, help="bare import torch runs (the best is the reference)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"PRETRAIN_CACHE_DIR": str(Path(tmp) / "cache")}
        base = [timed([sys.executable, "-c", "import torch"], env) for _ in range(args.repeat)]
        ref_wall, ref_cpu = min(w for w, _ in base), min(c for _, c in base)
        print(f"bare import torch: {ref_wall:.2f} s wall, {ref_cpu:.2f} s CPU (best of {args.repeat})")
        print(f"{'tier':>5} {'run':>5} {'wall s':>8} {'CPU s':>8} {'CPU / import torch':>19}")
        for tier in args.tiers:
            argv = [sys.executable, "run_1b_launch.py", "--vram", tier, "--target-tokens", "10B", "--data",
                    "data/sample", "--run-root", str(Path(tmp) / "runs"), "--json"]
            for run in (("warm",) if args.no_cold else ("cold", "warm")):
                if run == "warm" and args.no_cold:
                    timed(argv, env)  # fill the cache first
                wall, cpu = timed(argv, env)
                print(f"{tier:>5} {run:>5} {wall:8.2f} {cpu:8.2f} {cpu / ref_cpu:18.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
