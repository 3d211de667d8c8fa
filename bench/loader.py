"""Benchmark the data loader: batches/s of TrainSampler (memmap reads + Feistel order) and of the
Prefetcher, and the loader's share of a tiny-model training step (aim: < 2% of step time).

    .venv/bin/python bench/loader.py [--tokens 64M] [--steps 30]

Uses a synthetic dataset of random uint16 tokens (several shards) in a temp dir, so reads are
real memmap reads spread over the whole file set. The model is `model.GPT` with the "tiny"
preset when importable, else a small embedding + MLP stand-in (the output says which).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.data.dataset import open_dataset  # noqa: E402
from pretrain.data.loader import Prefetcher, TrainSampler  # noqa: E402
from pretrain.data.manifest import FORMAT, MANIFEST, VERSION, atomic_write_json, shard_name  # noqa: E402
from pretrain.schedule import parse_count  # noqa: E402

VOCAB = 50257


def synthetic_dataset(d: Path, tokens: int, shards: int = 8) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for split, i, n in [("val", 0, 1_000_000)] + [("train", i, tokens // shards) for i in range(shards)]:
        np.save(d / shard_name(split, i), rng.integers(0, VOCAB, n, dtype=np.uint16))
        entries.append({"file": shard_name(split, i), "split": split, "tokens": n, "documents": 0,
                        "max_id": VOCAB - 1})
    atomic_write_json(d / MANIFEST, {"format": FORMAT, "version": VERSION, "tokenizer": "gpt2",
                                     "vocab_size": VOCAB, "eot_id": VOCAB - 1, "dtype": "uint16",
                                     "shards": entries})


def tiny_model() -> tuple[torch.nn.Module, int, str]:
    try:
        from model import GPT, ModelConfig

        cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB)
        return GPT(cfg), cfg.block_size, f"model.GPT tiny preset ({cfg.num_params() / 1e6:.1f}M params)"
    except Exception as e:  # the model package is built concurrently; fall back so this bench still runs
        net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 64), torch.nn.Linear(64, 256), torch.nn.GELU(),
                                  torch.nn.Linear(256, VOCAB))

        class MLP(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, idx, targets):
                return torch.nn.functional.cross_entropy(self.net(idx).flatten(0, 1), targets.flatten())
        return MLP(), 256, f"stand-in embedding+MLP (model not importable: {type(e).__name__})"


def rate(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=parse_count, default=parse_count("64M"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        synthetic_dataset(Path(tmp), args.tokens)
        ds = open_dataset(tmp)
        print(f"dataset: {ds.train_tokens / 1e6:.0f}M train tokens in 8 memmapped shards")
        for b, t in ((16, 1024), (8, 2048), (args.batch_size, 256)):
            s = TrainSampler(ds, seed=0)
            r = rate(lambda s=s, b=b, t=t: s.next_batch(b, t), 200)
            print(f"TrainSampler.next_batch B={b:<3} T={t:<5} {r:8.0f} batches/s  {r * b * t / 1e6:7.1f}M tok/s")

        model, seq_len, what = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = Prefetcher(TrainSampler(ds, seed=0), "cpu")
        wait = 0.0
        for step in range(args.steps + 3):
            if step == 3:  # warm-up steps excluded
                wait, t_start = 0.0, time.perf_counter()
            t0 = time.perf_counter()
            x, y = loader.next(args.batch_size, seq_len)
            wait += time.perf_counter() - t0
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        total = time.perf_counter() - t_start
        loader.close()
        print(f"training with {what}: B={args.batch_size} T={seq_len}, {total / args.steps * 1e3:.1f} ms/step; "
              f"loader.next waits {wait / args.steps * 1e3:.3f} ms/step = {100 * wait / total:.2f}% of step time "
              "(aim < 2%)")


if __name__ == "__main__":
    main()
