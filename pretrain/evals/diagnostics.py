"""Attention diagnostics (`--analysis-every N`): what each layer's attention does on one fixed validation batch.

Per layer, from the model's own reference attention path (`GPT.probe`, the same projections as training with
an explicit softmax), reduced to numbers as each layer passes so only one layer's probabilities are alive:

  entropy       mean over queries of -sum p log p (nats) of the attention row; ln(keys) would be uniform
  null_mass     mean probability on the null slot (null_attn only): how often heads "attend to nothing"
  sem_share     decoupled only: sum|semantic score| / (sum|semantic| + sum|geometric|) over visible pairs;
                the geometric (RoPE) share is 1 - sem_share
  key_erank     effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular values)
  value_erank   of the keys / values as the KV cache holds them, tokens x (kv heads * head dim), null slot
                excluded; compare with key_width / value_width, the most it could be
  cos_in_out    mean cosine similarity of each token's residual stream before and after the block
  grad_norm     L2 norm of the block's gradient of the val loss on this batch (embedding: embed_grad_norm),
                from a separate ordinary forward/backward; .grad of the training step is left untouched

Per head (entropy, null_mass) as well when n_layer * n_head <= HEAD_DETAIL_MAX, so small models show which
heads sink. Everything is computed in at least fp32 whatever the autocast / parameter dtype.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from model import GPT
from model.attention import AttentionTrace

HEAD_DETAIL_MAX = 64  # layers x heads up to this get per-head series (each is a wandb chart)
SCORE_BUDGET = 2**28  # bytes of one (rows, H, T, S) fp32 score tensor the probe may hold


def probe_rows(n_head: int, seq_len: int, batch_size: int) -> int:
    """Sequences in the fixed batch: up to 4, fewer when one layer's scores would pass SCORE_BUDGET."""
    per_row = n_head * seq_len * (seq_len + 1) * 4
    return max(1, min(4, batch_size, SCORE_BUDGET // per_row))


def effective_rank(m: torch.Tensor) -> float:
    """exp(H(sigma / sum sigma)) of a 2-D matrix: 1 for rank one, its width for equal singular values."""
    s = torch.linalg.svdvals(m.to(torch.promote_types(m.dtype, torch.float32)))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(torch.exp(torch.special.entr(p).sum()))


def _tokens_by_features(t: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S, hd) -> (B*S, Hkv*hd): one row per cached token, every head's features side by side."""
    B, H, S, hd = t.shape
    return t.permute(0, 2, 1, 3).reshape(B * S, H * hd)


def layer_stats(trace: AttentionTrace, x_in: torch.Tensor, x_out: torch.Tensor) -> dict[str, Any]:
    """One layer's diagnostics (see the module docstring); per-head values under "heads"."""
    p = trace.probs
    entropy = torch.special.entr(p).sum(-1)  # (B, H, T); masked keys have p = 0 and add 0
    stats: dict[str, Any] = {"entropy": float(entropy.mean())}
    heads: dict[str, Any] = {"entropy": entropy.mean(dim=(0, 2)).tolist()}
    keys, values = trace.keys, trace.values
    if trace.null_slot:
        null = p[..., 0].mean(dim=(0, 2))
        stats["null_mass"] = float(null.mean())
        heads["null_mass"] = null.tolist()
        keys, values = keys[:, :, 1:], values[:, :, 1:]
    if trace.sem_scores is not None and trace.geo_scores is not None:
        visible = trace.mask.to(trace.sem_scores.dtype)
        sem = (trace.sem_scores.abs() * visible).sum()
        geo = (trace.geo_scores.abs() * visible).sum()
        stats["sem_share"] = float(sem / (sem + geo)) if sem + geo > 0 else None
    k2, v2 = _tokens_by_features(keys), _tokens_by_features(values)
    stats.update(key_erank=effective_rank(k2), key_width=min(k2.shape), value_erank=effective_rank(v2),
                 value_width=min(v2.shape))
    stats["cos_in_out"] = float(F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).mean())
    stats["heads"] = heads
    return stats


def gradient_norms(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast: Any) -> tuple[list[float], float]:
    """Per-block and embedding L2 norms of d(val loss)/d(params) on (x, y), without touching any .grad."""
    groups = [list(b.parameters()) for b in model.blocks] + [[model.wte.weight]]
    flat = [p for g in groups for p in g]
    with torch.enable_grad(), autocast:
        loss = model(x, y)
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    norms, i = [], 0
    for g in groups:
        sq = sum(float(grads[i + j].float().pow(2).sum()) for j in range(len(g)) if grads[i + j] is not None)
        norms.append(math.sqrt(sq))
        i += len(g)
    return norms[:-1], norms[-1]


@torch.no_grad()
def diagnose(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast: Any) -> dict[str, Any]:
    """Every diagnostic of `model` on the batch (x, y), as the fields of one `diagnostics` event:

    {"layer": {"00": {"entropy": ..., ...}, ...}, "mean": {metric: mean over layers}, "head": {"00":
    {"entropy": {"h0": ...}}} (small models only), "embed_grad_norm", "seq_len", "rows", "seconds"}.
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    per_layer: list[dict[str, Any]] = []
    with autocast:
        model.probe(x, lambda i, trace, x_in, x_out: per_layer.append(layer_stats(trace, x_in, x_out)))
    block_norms, embed_norm = gradient_norms(model, x, y, autocast)
    model.train(was_training)
    cfg = model.config
    detail = cfg.n_layer * cfg.n_head <= HEAD_DETAIL_MAX
    layers, heads = {}, {}
    for i, stats in enumerate(per_layer):
        head = stats.pop("heads")
        stats["grad_norm"] = block_norms[i]
        layers[f"{i:02d}"] = stats
        if detail:
            heads[f"{i:02d}"] = {k: {f"h{h}": v for h, v in enumerate(vals)} for k, vals in head.items()}
    means = {}
    for key in per_layer[0]:
        vals = [s[key] for s in per_layer if isinstance(s.get(key), float)]
        if vals and not key.endswith("width"):
            means[key] = sum(vals) / len(vals)
    fields: dict[str, Any] = {"layer": layers, "mean": means, "embed_grad_norm": embed_norm,
                              "seq_len": int(x.shape[1]), "rows": int(x.shape[0])}
    if heads:
        fields["head"] = heads
    fields["seconds"] = time.perf_counter() - t0
    return fields
