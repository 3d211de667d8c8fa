"""How much gradient accuracy bf16 weights lose when micro-batch gradients accumulate in bf16.

    .venv/bin/python bench/bf16_grad_accum.py                       # accum 1..128, ~1-3 minutes on 2 cores
    .venv/bin/python bench/bf16_grad_accum.py --accum 1 2 8 --d-model 128

With --param-dtype bf16 each parameter's .grad is bf16, so autograd adds every micro-batch's gradient into a
bf16 buffer (round-to-nearest after each add), as the trainer's accumulation loop does. For one batch of
`accum` micro-batches this script computes, on the same bf16 model and data:

  reference   the per-micro-batch bf16 gradients summed in float64
  bf16 accum  what the trainer gets today: autograd's in-place bf16 accumulation
  one round   the reference rounded to bf16 once (the floor for any bf16 gradient)
  fp32 accum  the micro-batch gradients summed into an fp32 buffer (what fp32 accumulation would give)

and prints each one's relative error ||g - reference|| / ||reference|| over all parameters (and the worst
single tensor). Real text when ../shared/data holds the sample, else random tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import GPT, ModelConfig  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "fineweb-sample" / "sample" / "10BT"


def byte_tokens(n: int, seed: int) -> tuple[np.ndarray, str]:
    files = sorted(SAMPLE.glob("*.parquet"))
    if files:
        import pyarrow.parquet as pq

        text = "\x00".join(pq.read_table(files[0], columns=["text"]).column("text").to_pylist())
        data = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
        if len(data) > n:
            return data, "FineWeb-Edu-layout sample, bytes"
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8), "random bytes"


def relative(g: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(global relative L2 error, worst per-tensor relative error)."""
    num = sum(float((a.double() - b).pow(2).sum()) for a, b in zip(g, ref, strict=True))
    den = sum(float(b.pow(2).sum()) for b in ref)
    per = [float((a.double() - b).norm() / b.norm()) for a, b in zip(g, ref, strict=True) if b.norm() > 0]
    return (num / den) ** 0.5, max(per)


def measure(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[float, float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    accum = len(batches)
    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    fp32 = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for x, y in batches:  # each micro-batch's own bf16 gradient, summed exactly and in fp32
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (model(x, y) / accum).backward()
        for r, f, p in zip(ref, fp32, params, strict=True):
            r += p.grad.double()
            f += p.grad.float()
    model.zero_grad(set_to_none=True)
    for x, y in batches:  # the trainer's loop: backward after backward into the same bf16 .grad
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (model(x, y) / accum).backward()
    acc = [p.grad for p in params]
    return {"bf16 accum": relative(acc, ref), "one round": relative([r.to(torch.bfloat16) for r in ref], ref),
            "fp32 accum": relative(fp32, ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accum", type=int, nargs="+", default=[1, 2, 8, 32, 128])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warm-steps", type=int, default=30, help="fp32 AdamW steps first, so gradients are not "
                    "those of a random init")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=args.d_model, n_layer=args.layers,
                                  n_head=max(1, args.d_model // 64), d_ff=4 * args.d_model, block_size=args.seq_len)
    need = max(args.accum) * args.batch_size * (args.seq_len + 1) * 2 + args.warm_steps * 8 * (args.seq_len + 1)
    data, source = byte_tokens(need, args.seed)
    rng = np.random.default_rng(args.seed)

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = rng.integers(0, len(data) - args.seq_len - 1, b)
        rows = torch.from_numpy(np.stack([data[s:s + args.seq_len + 1] for s in starts]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.warm_steps):
        opt.zero_grad(set_to_none=True)
        model(*batch(8)).backward()
        opt.step()
    model.to(torch.bfloat16)
    print(f"model: d_model {args.d_model}, {args.layers} layers, {cfg.num_params() / 1e6:.1f}M params, bf16 "
          f"weights, bf16 autocast; micro-batch {args.batch_size} x {args.seq_len} tokens; data: {source}; "
          f"after {args.warm_steps} fp32 AdamW steps")
    print(f"{'accum':>6} | {'bf16 accum (trainer)':>22} | {'one bf16 rounding':>20} | {'fp32 accum':>20}")
    print(f"{'':>6} | {'global / worst tensor':>22} | {'global / worst':>20} | {'global / worst':>20}")
    for accum in args.accum:
        errs = measure(model, [batch(args.batch_size) for _ in range(accum)])
        cells = [f"{100 * g:.3f} % / {100 * w:.2f} %" for g, w in errs.values()]
        print(f"{accum:>6} | {cells[0]:>22} | {cells[1]:>20} | {cells[2]:>20}", flush=True)


if __name__ == "__main__":
    main()
