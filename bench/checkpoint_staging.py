"""What streaming a checkpoint snapshot through the bounded staging buffer costs, vs one plain copy per tensor.

    python bench/checkpoint_staging.py                      # 512 MB of fp32 tensors on CPU (staging in ordinary memory)
    python bench/checkpoint_staging.py --device cuda        # on a GPU: a pinned 64 MiB buffer, GPU -> host

Per mode, the median over `--reps` snapshots of the whole state: seconds, GB/s, and host bytes kept pinned for
the run (the old code pinned a copy of every tensor: the state's size, rounded up to powers of two).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.train.staging import STAGING_BYTES, HostStaging  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--tensors", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--staging-mb", type=int, default=STAGING_BYTES >> 20)
    a = p.parse_args()
    n = a.mb * (1 << 20) // 4 // a.tensors
    state = [torch.randn(n, device=a.device) for _ in range(a.tensors)]
    total = sum(t.numel() * t.element_size() for t in state)
    staging = HostStaging(a.staging_mb << 20)

    def timed(copy) -> float:
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            out = [copy(t) for t in state]
            times.append(time.perf_counter() - t0)
            assert all(torch.equal(o, t.cpu()) for o, t in zip(out, state))
            del out
        return statistics.median(times)

    print(f"state {total / 2**20:.0f} MiB in {a.tensors} tensors on {a.device}; torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for name, copy, pinned in (("plain copy (t.to('cpu', copy=True))", lambda t: t.to("cpu", copy=True), 0),
                               (f"staged ({a.staging_mb} MiB buffer)", staging.copy, a.staging_mb << 20)):
        s = timed(copy)
        print(f"  {name:40s} {s:7.3f} s  {total / s / 1e9:6.2f} GB/s  "
              f"staging kept for the run: {pinned / 2**20:.0f} MiB (pinned on CUDA)")


if __name__ == "__main__":
    main()
