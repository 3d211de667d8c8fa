"""Benchmark prepare: end-to-end tokens/s of pretrain.data.prepare on the shared FineWeb sample against
raw tiktoken `encode_ordinary_batch` on the same texts in the same run (aim: ratio >= 0.8, i.e.
reading, process fan-out and shard writing cost at most 20% on top of tokenizing).

    .venv/bin/python bench/prepare.py [--copies 4] [--repeat 3] [--workers N]

The ~1.4M-token sample is repeated `--copies` times (symlinks) so worker start-up is amortised.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402

from pretrain.data.prepare import prepare  # noqa: E402
from pretrain.data.tokenizer import resolve_tokenizer  # noqa: E402
from pretrain.data.workers import default_workers  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "fineweb-sample" / "sample" / "10BT"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=default_workers())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        files = sorted(SAMPLE.glob("*.parquet"))
        for c in range(args.copies):
            for f in files:
                (src / f"{c:03d}_{f.name}").symlink_to(f)
        texts = [t for f in sorted(src.glob("*.parquet"))
                 for t in pq.read_table(f, columns=["text"]).column(0).to_pylist()]
        enc = resolve_tokenizer("gpt2").build()

        raw: dict[int, list[float]] = {}
        rates, secs = [], []
        for rep in range(args.repeat):  # interleaved, medians: this machine's load varies a lot
            for threads in sorted({1, args.workers}):
                t0 = time.perf_counter()
                n = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(texts, num_threads=threads))
                raw.setdefault(threads, []).append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            m = prepare(n, Path(tmp) / f"out{rep}", [str(src)], shard_tokens=1_000_000,
                        val_tokens=100_000, workers=args.workers, progress="none")
            secs.append(time.perf_counter() - t0)
            rates.append(sum(s["tokens"] for s in m["shards"]) / secs[-1])
        best = max(statistics.median(v) for v in raw.values())
        rate, dt = statistics.median(rates), statistics.median(secs)
    print(f"sample x{args.copies}: {len(texts):,} documents, {n:,} tokens (incl. EOTs), {args.workers} workers, "
          f"{os.cpu_count()} CPUs")
    for threads, r in raw.items():
        print(f"raw tiktoken encode_ordinary_batch, {threads} thread(s): {statistics.median(r) / 1e6:.2f}M tok/s")
    print(f"prepare end-to-end (read + tokenize + write {len(m['shards'])} shards, worker start-up included): "
          f"{rate / 1e6:.2f}M tok/s in {dt:.1f}s (medians of {args.repeat})")
    print(f"ratio prepare / best raw = {rate / best:.2f} (aim >= 0.8)")


if __name__ == "__main__":
    main()
