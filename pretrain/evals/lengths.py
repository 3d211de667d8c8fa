"""Validation loss at several sequence lengths (`--eval-seq-lens 512,1024,2048,4096`), and loss by position.

Lengths may exceed the model's block size: RoPE angles are computed from positions on the fly, so this
measures extrapolation (the decoupled semantic path has no RoPE at all, which is where variants differ).
Each length scores about the same number of tokens as the regular eval (fewer rows for longer windows),
over fixed windows spread evenly over the validation split, so every eval sees the same text.

For the longest length the per-position loss is kept too: mean loss at each position in the window, as
up to CURVE_POINTS averaged bins (for plots) and in log2 buckets [0], [1, 2], [3, 6], [7, 14], ... (for
wandb / TensorBoard charts, few enough to read, fine enough to show where past-trained positions begin).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from model import GPT
from pretrain.cli import UserError
from pretrain.data.dataset import TokenDataset
from pretrain.data.loader import ValWindows
from pretrain.track.progress import Progress

CURVE_POINTS = 128
LOGIT_ROWS = 2048  # token rows of logits alive at once while scoring


def parse_eval_lengths(text: str) -> list[int]:
    """"512,1024" -> [512, 1024] (sorted, unique); UserError naming the bad item otherwise."""
    lengths: list[int] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            n = int(item)
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"--eval-seq-lens: {item!r} is not a positive whole number of tokens; "
                            "give lengths like 512,1024,2048")
        lengths.append(n)
    return sorted(set(lengths))


def length_windows(ds: TokenDataset, lengths: list[int], tokens_per_batch: int,
                   n_batches: int) -> dict[int, ValWindows]:
    """Fixed validation windows per length (about tokens_per_batch tokens a batch); UserError when the
    validation split cannot hold one window of some length."""
    out: dict[int, ValWindows] = {}
    for n in lengths:
        have = sum(max(0, (len(seg) - 1) // n) for seg in ds.val)
        if have < 1:
            raise UserError(f"--eval-seq-lens {n}: the validation split ({ds.val_tokens:,} tokens) holds no "
                            f"window of {n + 1} tokens; drop {n} from --eval-seq-lens, or prepare more "
                            "validation data (--val-tokens) / raise --val-frac")
        out[n] = ValWindows(ds, n, window_rows(tokens_per_batch, n, have), n_batches)
    return out


def window_rows(tokens_per_batch: int, n: int, have: int | None = None) -> int:
    """Windows of length n per eval batch: about tokens_per_batch tokens, at least one, at most `have` (the
    validation split's windows; None: not known, as when the planner bounds the eval's memory)."""
    rows = max(1, tokens_per_batch // n)
    return rows if have is None else max(1, min(have, rows))


def token_losses(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 cross-entropy of every position; any T (past block_size too), logits a slice at a time."""
    h = model.hidden_states(x)
    B, T, _ = h.shape
    step = max(1, LOGIT_ROWS // B)
    out = torch.empty(B, T, dtype=torch.float32, device=h.device)
    vocab = model.config.vocab_size
    for i in range(0, T, step):
        logits = model.lm_head(h[:, i:i + step])[..., :vocab].float()
        out[:, i:i + step] = F.cross_entropy(logits.transpose(1, 2), y[:, i:i + step].long(), reduction="none")
    return out


def log2_buckets(position_loss: list[float]) -> dict[str, float]:
    """Mean loss over positions [2^k - 1, 2^(k+1) - 1), keyed by the first position ("pos_0", "pos_1", ...)."""
    out, k = {}, 0
    while (start := 2**k - 1) < len(position_loss):
        part = position_loss[start: 2 ** (k + 1) - 1]
        out[f"pos_{start}"] = sum(part) / len(part)
        k += 1
    return out


def curve(position_loss: list[float], points: int = CURVE_POINTS) -> tuple[list[float], list[float]]:
    """Average consecutive positions into at most `points` bins: (bin centre positions, mean losses)."""
    T = len(position_loss)
    width = math.ceil(T / points)
    xs, ys = [], []
    for i in range(0, T, width):
        part = position_loss[i:i + width]
        xs.append(i + (len(part) - 1) / 2)
        ys.append(sum(part) / len(part))
    return xs, ys


@torch.no_grad()
def evaluate_lengths(model: GPT, windows: dict[int, ValWindows], device: torch.device, autocast: Any,
                     trained_len: int) -> dict[str, Any]:
    """Fields of one `eval_lengths` event: {"loss": {"512": ...}, "trained_len", "position": {"seq_len",
    "x", "loss", "buckets"}} where position holds the per-position curve at the longest length."""
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    longest = max(windows)
    pos_sum = None
    progress = Progress("eval at lengths", sum(len(v) for v in windows.values()), "batches")
    for n, val in windows.items():
        total, count = 0.0, 0
        for x, y in val:
            with autocast:
                per_token = token_losses(model, x.to(device), y.to(device))
            total += float(per_token.sum())
            count += per_token.numel()
            if n == longest:
                batch_sum = per_token.sum(0).double()
                pos_sum = batch_sum if pos_sum is None else pos_sum + batch_sum
            progress.step(progress.done + 1)
        losses[str(n)] = total / max(count, 1)
    progress.close()
    model.train(was_training)
    rows = windows[longest].batch_size * len(windows[longest])
    position_loss = (pos_sum / rows).tolist()
    xs, ys = curve(position_loss)
    return {"loss": losses, "trained_len": trained_len,
            "position": {"seq_len": longest, "x": xs, "loss": ys, "buckets": log2_buckets(position_loss)}}
