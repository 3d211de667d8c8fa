"""Optimizer state bytes per parameter and the loss gap of adamw, adamw8bit and lion on a tiny CPU run.

    .venv/bin/python bench/optim_state.py                    # 60 steps each, ~2-5 minutes on 2 busy cores
    .venv/bin/python bench/optim_state.py --steps 200 --lr 1e-3

Each optimizer trains the same small model (seed 1337, data/sample, the same batches) through the trainer
(train_v29.py, a subprocess each) with its registry default LR unless --lr is given, then this prints:

  state B/param    the optimizer state in the run's last.pt, bytes per parameter (measured, not declared)
  1b B/param       the same for the 1b preset, as the planner's fake-tensor estimate builds it (no memory used)
  val loss         the run's final eval loss, and its gap to adamw's

The 8-bit figure is ~2.03 B/param on tensors of >= 4096 values that are a multiple of 256 (1 byte per moment
and an fp32 scale per 256 values); smaller tensors (norms, gains) keep fp32 moments.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig  # noqa: E402
from pretrain.plan.memory import _steady_state  # noqa: E402
from pretrain.train.config import TrainConfig, model_config_from  # noqa: E402

OPTIMIZERS = ("adamw", "adamw8bit", "lion")
MODEL = ["--size", "tiny", "--d-model", "128", "--n-head", "4", "--n-layer", "2", "--d-ff", "256",
         "--block-size", "128"]


def run(optimizer: str, out: Path, steps: int, lr: float | None) -> tuple[float, float]:
    """(final eval loss, optimizer state bytes per parameter) of one trainer run."""
    argv = [sys.executable, str(ROOT / "train_v29.py"), "--data", str(ROOT / "data" / "sample"), "--out-dir",
            str(out), *MODEL, "--batch-size", "8", "--train-seq-len", "128", "--steps", str(steps),
            "--warmup-steps", str(max(1, steps // 10)), "--eval-every", str(steps), "--eval-iters", "4",
            "--seed", "1337", "--device", "cpu", "--optimizer", optimizer, "--live", "basic", "--save-minutes", "0"]
    if lr is not None:
        argv += ["--lr", str(lr)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    evals = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines() if '"eval"' in line]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    n_params = sum(t.numel() for t in {t.data_ptr(): t for t in ckpt["model"].values()}.values())  # tied: once
    state = sum(t.numel() * t.element_size() for st in ckpt["optimizer"]["state"].values() for t in st.values()
                if torch.is_tensor(t))
    return evals[-1]["loss"], state / n_params


def planned_1b(optimizer: str) -> float:
    """State bytes per parameter of the 1b preset's optimizer as the planner builds it on fake tensors (bf16)."""
    cfg = TrainConfig(size="1b", optimizer=optimizer, param_dtype="bf16")
    mcfg: ModelConfig = model_config_from(cfg, 50257)
    _, model, opt = _steady_state(mcfg, cfg, fake=True)
    params = list(model.parameters())
    state = sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values() if torch.is_tensor(t))
    return state / sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=None, help="one LR for all (default: each optimizer's own)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {' '.join(MODEL)}, "
          f"{args.steps} steps, batch 8 x 128, seed 1337, data/sample")
    print(f"{'optimizer':<10} {'state B/param':>13} {'1b B/param':>10} {'val loss':>9} {'gap vs adamw':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for name in OPTIMIZERS:
            loss, per_param = run(name, Path(tmp) / name, args.steps, args.lr)
            base = loss if base is None else base
            print(f"{name:<10} {per_param:>13.3f} {planned_1b(name):>10.3f} {loss:>9.4f} {loss - base:>+12.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
