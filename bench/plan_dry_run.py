"""What a dry run of the 1b plan costs per tier, against a bare `import torch` (issue 20.8: at most about twice).

    .venv/bin/python bench/plan_dry_run.py                  # every tier, cold and warm estimate cache (~2-3 min)
    .venv/bin/python bench/plan_dry_run.py --tiers 80 16 --no-cold
    .venv/bin/python bench/plan_dry_run.py --tiers 24 --ref main     # before (git ref `main`) and after (this tree)
    .venv/bin/python bench/plan_dry_run.py --tiers 16 --no-shipped   # cold = every estimate traced, in this tree too

Each figure is one fresh process (`python run_1b_launch.py --vram T --target-tokens 10B --data data/sample --json`),
timed as wall seconds and as CPU seconds (user + sys of the child: on a shared machine the CPU figure is the one to
compare). "cold" runs with an empty estimate cache (a user's first dry run: each tier's own cache dir): the GPU tiers'
estimates then come from the file shipped in the repo (pretrain/plan/shipped_estimates.json), or are all traced on
fake tensors with --no-shipped (the first dry run of settings the repo does not ship); "warm" is the same command
again, served from the cache that run filled (pretrain/plan/estimate_cache.py). The cpu tier's time estimate is
the FLOP estimate (this CPU's matmul rate x MFU) unless --probe kept a measured rate (pretrain/plan/cpu_rate.py):
a dry run of this tree times no step (a ref before that change timed them on a cold run).
With --ref, the same commands also run in a copy of that git ref (`git archive`), printed as rows "<ref>" above
this tree's, so a change to the estimate is timed before and after on the same load; the --json output of both is
compared and any difference reported (on the cpu tier, the fields derived from this CPU's measured speed aside:
MEASURED).
Write the host's ISA next to the figures (e.g. AMD EPYC, AVX-512-BF16, 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("80", "48", "40", "24", "16", "cpu")
# --json fields the cpu tier derives from this CPU's measured speed (its matmul rate, or steps a ref before the change
# timed: they differ run to run; everything else must not), and where its rate came from.
MEASURED = ("seconds", "tokens_per_second", "flops_tokens_per_second", "peak_flops", "rate_how")


def plan_of(out: bytes, tier: str) -> object:
    """The --json plan, without the cpu tier's measured fields."""
    def strip(x: object) -> object:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if tier != "cpu" or k not in MEASURED}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(json.loads(out))


def timed(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[float, float, bytes]:
    """(wall seconds, CPU seconds, stdout) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.PIPE).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out


def checkout(ref: str, dest: Path) -> Path:
    """The tree of git `ref` extracted under `dest` (its own estimate cache keys: a different code fingerprint)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    p.add_argument("--no-cold", action="store_true", help="skip the cold runs (every estimate computed)")
    p.add_argument("--repeat", type=int, default=3, help="bare import torch runs (the best is the reference)")
    p.add_argument("--ref", help="also time this git ref (e.g. main), for before/after figures")
    p.add_argument("--no-shipped", action="store_true", help="cold runs trace every estimate (shipped file off)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | ({"PRETRAIN_SHIPPED_ESTIMATES": "off"} if args.no_shipped else {})
        base = [timed([sys.executable, "-c", "import torch"], env) for _ in range(args.repeat)]
        ref_wall, ref_cpu = min(w for w, _, _ in base), min(c for _, c, _ in base)
        print(f"bare import torch: {ref_wall:.2f} s wall, {ref_cpu:.2f} s CPU (best of {args.repeat})")
        trees = [("this", ROOT)] + ([(args.ref, checkout(args.ref, Path(tmp) / "ref"))] if args.ref else [])
        print(f"{'tier':>5} {'tree':>8} {'run':>5} {'wall s':>8} {'CPU s':>8} {'CPU / import torch':>19}")
        for tier in args.tiers:
            env["PRETRAIN_CACHE_DIR"] = str(Path(tmp) / f"cache-{tier}")  # cold: nothing another tier estimated
            outputs = {}
            for name, tree in reversed(trees):
                argv = [sys.executable, "run_1b_launch.py", "--vram", tier, "--target-tokens", "10B", "--data",
                        "data/sample", "--run-root", str(Path(tmp) / "runs"), "--json"]
                for run in (("warm",) if args.no_cold else ("cold", "warm")):
                    if run == "warm" and args.no_cold:
                        timed(argv, env, tree)  # fill the cache first
                    wall, cpu, outputs[name] = timed(argv, env, tree)
                    print(f"{tier:>5} {name[:8]:>8} {run:>5} {wall:8.2f} {cpu:8.2f} {cpu / ref_cpu:18.1f}x", flush=True)
            if args.ref and len({json.dumps(plan_of(o, tier)) for o in outputs.values()}) > 1:
                print(f"{tier:>5} --json differs between {args.ref} and this tree", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
