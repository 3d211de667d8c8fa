"""fp32 GEMMs at config S's shapes in torch (MKL) with MKL's own CPU branch and with its vendor check answered
(pretrain/train/host_blas.py), beside numpy's BLAS (OpenBLAS in its wheels) on the same arrays; each side in a
fresh process, since MKL picks its branch once, when torch loads. On an Intel CPU both torch columns match.

    .venv/bin/python bench/blas_branch.py [--threads 1] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.train.host_blas import ENV, amd_x86_linux, with_mkl_on_amd  # noqa: E402

# (m, k, n): config S's qkv, gate/up and down projections (8 x 256 rows), one LM-head column block, and 2048^3.
SHAPES = [(2048, 384, 1152), (2048, 384, 2048), (2048, 1024, 384), (2048, 384, 6288), (2048, 2048, 2048)]


def _best(f, reps: int) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def child(reps: int) -> dict:
    """GFLOP/s of each shape (best of `reps`) in torch and numpy, and MKL's branch (None without MKL)."""
    import ctypes

    import torch

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    detect = getattr(lib, "mkl_serv_cpu_detect", None)
    rows = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        an, bn = a.numpy(), b.numpy()
        flops = 2 * m * k * n
        rows.append({"shape": [m, k, n], "torch": flops / _best(lambda a=a, b=b: a @ b, reps) / 1e9,
                     "numpy": flops / _best(lambda a=an, b=bn: a @ b, reps) / 1e9})
    return {"branch": detect() if detect else None, "rows": rows}


def run(on: bool, threads: int, reps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env |= {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    env = with_mkl_on_amd(env) if on else {**env, ENV: "0"}
    done = subprocess.run([sys.executable, __file__, "--child", str(reps)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=20, help="timed runs per shape, best kept (default 20)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    from bench.gemm_floor import host_isa

    off, on = run(False, args.threads, args.reps), run(True, args.threads, args.reps)
    print(f"fp32 GEMMs, {args.threads} threads, host ISA: {host_isa()}, {'AMD' if amd_x86_linux() else 'not AMD'}; "
          f"MKL's branch {off['branch']} on its own, {on['branch']} with the vendor check answered")
    print(f"{'m x k x n':>18}  {'MKL own':>8}  {'answered':>8}  {'numpy':>8}  GFLOP/s")
    for a, b in zip(off["rows"], on["rows"]):
        print(f"{' x '.join(map(str, a['shape'])):>18}  {a['torch']:8.0f}  {b['torch']:8.0f}  "
              f"{max(a['numpy'], b['numpy']):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
