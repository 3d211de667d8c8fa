"""Validation loss at several sequence lengths (`--eval-seq-lens 512,1024,2048,4096`), and loss by position.

Lengths may exceed the model's block size: RoPE angles are computed from positions on the fly, so this
measures extrapolation (the decoupled semantic path has no RoPE at all, which is where variants differ).

Every length scores the same target tokens: fixed windows of the longest length (about as many tokens a batch
as the regular eval), spread evenly over the validation split. At length n each window is cut into consecutive
n-token pieces, each scored from its own start, so a target's context is truncated to at most n tokens (the
regular eval's convention) while the targets stay the same. The curve's shape is then the length's doing, not
which text each length happened to sample. Cost: every length scores the whole window set (the plan counts it).

For the longest length the per-position loss is kept too, in bins of consecutive positions wide enough that
each averages at least MIN_BIN_TOKENS tokens (per-position means over a few rows swing by ±0.5), with each bin's
token count and standard error, and in log2 buckets [0], [1, 2], [3, 6], [7, 14], ... (for wandb / TensorBoard
charts; a last bucket under half its width joins the one before, so none is a lone position).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from model import GPT, ModelConfig
from pretrain.data.dataset import TokenDataset
from pretrain.data.loader import ValWindows
from pretrain.errors import UserError
from pretrain.stats import standard_error
from pretrain.track.progress import Progress

CURVE_POINTS = 128
MIN_BIN_TOKENS = 2048  # tokens a per-position bin averages at least: its standard error ~ 2.5 / sqrt(2048) ~ 0.05
MIN_BINS = 8  # ... unless that leaves fewer bins than this (a small eval): then wider error bars instead
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
    """{longest length: its fixed validation windows} (about tokens_per_batch tokens a batch), which every
    length scores (see evaluate_lengths); UserError when the validation split cannot hold one such window."""
    n = max(lengths)
    have = sum(max(0, (len(seg) - 1) // n) for seg in ds.val)
    if have < 1:
        raise UserError(f"--eval-seq-lens {n}: the validation split ({ds.val_tokens:,} tokens) holds no "
                        f"window of {n + 1} tokens; drop {n} from --eval-seq-lens, or prepare more "
                        "validation data (--val-tokens) / raise --val-frac")
    return {n: ValWindows(ds, n, window_rows(tokens_per_batch, n, have), n_batches)}


def length_eval_flops(mcfg: ModelConfig, lengths: list[int], tokens_per_batch: int, n_batches: int) -> float:
    """Forward FLOPs of one multi-length eval: every length scores the longest length's windows (a forward is a
    third of ModelConfig.flops_per_token's forward + backward)."""
    longest = max(lengths)
    tokens = window_rows(tokens_per_batch, longest) * longest * n_batches
    return sum(tokens * mcfg.flops_per_token(n) / 3 for n in lengths)


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
    """Mean loss over positions [2^k - 1, 2^(k+1) - 1), keyed by the first position ("pos_0", "pos_1", ...); a
    last bucket cut to under half its width by the window's end is merged into the one before."""
    T = len(position_loss)
    starts, k = [], 0
    while (start := 2**k - 1) < T:
        starts.append(start)
        k += 1
    if len(starts) > 2 and T - starts[-1] < (starts[-1] + 1) / 2:
        starts.pop()
    ends = starts[1:] + [T]
    return {f"pos_{a}": sum(position_loss[a:b]) / (b - a) for a, b in zip(starts, ends, strict=True)}


def bins(pos_sum: list[float], pos_sq: list[float], rows: int) -> dict[str, list[float]]:
    """Per-position sums over `rows` windows -> bins of consecutive positions, each averaging at least
    MIN_BIN_TOKENS tokens when MIN_BINS bins allow it: centres `x`, mean `loss`, `se` (tokens as independent
    draws) and `tokens` per bin; a remainder under half a bin joins the last one."""
    T = len(pos_sum)
    width = max(math.ceil(T / CURVE_POINTS), math.ceil(MIN_BIN_TOKENS / max(rows, 1)))
    width = min(width, max(1, T // MIN_BINS))
    edges = list(range(0, T, width))
    if len(edges) > 1 and T - edges[-1] < width / 2:
        edges.pop()
    out: dict[str, list[float]] = {"x": [], "loss": [], "se": [], "tokens": []}
    for a, b in zip(edges, edges[1:] + [T], strict=True):
        n = (b - a) * rows
        mean = sum(pos_sum[a:b]) / n
        var = max(sum(pos_sq[a:b]) / n - mean * mean, 0.0)
        out["x"].append(a + (b - a - 1) / 2)
        out["loss"].append(mean)
        out["se"].append(math.sqrt(var / n) if n > 1 else 0.0)
        out["tokens"].append(n)
    return out


def _losses_at(model: GPT, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) losses of the window's targets with each target's context cut to its n-token piece."""
    B, T = x.shape
    full = T // n * n
    parts = []
    if full:  # the whole pieces as one batch of B * T/n rows
        parts.append(token_losses(model, x[:, :full].reshape(-1, n), y[:, :full].reshape(-1, n)).reshape(B, full))
    if full < T:
        parts.append(token_losses(model, x[:, full:], y[:, full:]))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def evaluate_lengths(model: GPT, windows: dict[int, ValWindows], lengths: list[int], device: torch.device,
                     autocast: Any, trained_len: int) -> dict[str, Any]:
    """Fields of one `eval_lengths` event: {"loss": {"512": ...}, "loss_se", "targets" (tokens each length
    scored, the same ones), "trained_len" (longest length trained so far), "position": {"seq_len", "x", "loss",
    "se", "tokens", "buckets"}} where position holds the per-position curve at the longest length."""
    was_training = model.training
    model.eval()
    longest = max(lengths)
    val = windows[longest]
    sums = {n: 0.0 for n in lengths}
    row_means: dict[int, list[float]] = {n: [] for n in lengths}
    pos_sum = pos_sq = None
    count = 0
    progress = Progress("eval at lengths", len(val), "batches")
    for x, y in val:
        x, y = x.to(device), y.to(device)
        count += y.numel()
        for n in lengths:
            with autocast:
                per_token = _losses_at(model, x, y, n).float()
            sums[n] += float(per_token.sum())
            row_means[n] += per_token.mean(1).tolist()
            if n == longest:
                s1, s2 = per_token.sum(0).double(), per_token.double().pow(2).sum(0)
                pos_sum, pos_sq = (s1, s2) if pos_sum is None else (pos_sum + s1, pos_sq + s2)
        progress.step(progress.done + 1)
    progress.close()
    model.train(was_training)
    rows = val.batch_size * len(val)
    position = bins(pos_sum.tolist(), pos_sq.tolist(), rows)
    # loss_se over windows: the tokens of one window are not independent draws.
    return {"loss": {str(n): sums[n] / max(count, 1) for n in lengths},
            "loss_se": {str(n): standard_error(row_means[n]) for n in lengths},
            "targets": count, "trained_len": trained_len,
            "position": {"seq_len": longest, **position, "buckets": log2_buckets((pos_sum / rows).tolist())}}
