"""Attention diagnostics (`--analysis-every N`): what each layer's attention does on one fixed validation batch.

Per layer, from the model's own reference attention path (`GPT.trace_attention`, the same projections as training with
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
                from a separate forward/backward in training mode (so with --grad-checkpoint it recomputes
                activations as the training step does, and needs no more memory); .grad is left untouched

The original paper's instruments (top-k mass, local-window mass, attention rank and effective rank, its
mean-squared-logit semantic share `share_sem_msq`, projection stable ranks `stable_rank_<proj>`) are defined in
pretrain/evals/paper_metrics.py; `diagnose` also hands back chosen heads' attention maps (--attn-map-layers/-heads).

Per head (entropy, null_mass, topk_mass, local_mass, attn_rank, attn_erank) as well when
n_layer * n_head <= HEAD_DETAIL_MAX, so small models show which heads sink. Everything is computed in at least
fp32 whatever the autocast / parameter dtype.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from model import GPT, cpu_kernels
from model.attention import AttentionTrace
from pretrain.evals import paper_metrics as pm

HEAD_DETAIL_MAX = 64  # layers x heads up to this get per-head series (each is a wandb chart)
SCORE_BUDGET = 2**28  # bytes of one (rows, H, T, S) fp32 score tensor the reference attention may hold


def diagnostic_rows(n_head: int, seq_len: int, batch_size: int) -> int:
    """Sequences in the fixed batch: up to 4, fewer when one layer's scores would pass SCORE_BUDGET."""
    per_row = n_head * seq_len * (seq_len + 1) * 4
    return max(1, min(4, batch_size, SCORE_BUDGET // per_row))


def _erank(m: torch.Tensor) -> torch.Tensor:
    """effective_rank as a 0-d tensor (no host sync)."""
    s = torch.linalg.svdvals(m.to(torch.promote_types(m.dtype, torch.float32)))
    total = s.sum()
    return torch.where(total > 0, torch.exp(torch.special.entr(s / total).sum()), 0.0)


def effective_rank(m: torch.Tensor) -> float:
    """exp(H(sigma / sum sigma)) of a 2-D matrix: 1 for rank one, its width for equal singular values."""
    return float(_erank(m))


def _tokens_by_features(t: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S, hd) -> (B*S, Hkv*hd): one row per cached token, every head's features side by side."""
    B, H, S, hd = t.shape
    return t.permute(0, 2, 1, 3).reshape(B * S, H * hd)


def layer_tensors(trace: AttentionTrace, x_in: torch.Tensor, x_out: torch.Tensor, topk: int = pm.TOPK,
                  window: int = pm.LOCAL_WINDOW, map_heads: Sequence[int] = ()) -> dict[str, Any]:
    """One layer's diagnostics as small tensors (per-head vectors, 0-d sums); `_numbers` turns them into numbers.

    Tensors, not floats: nothing here waits for the device, and the planner's memory estimate
    (pretrain/plan/instrument_memory.py) runs this very code on fake tensors, which hold no values.
    """
    p = trace.probs
    entropy = torch.special.entr(p).sum(-1).mean(dim=(0, 2))  # (H,); masked keys have p = 0 and add 0
    out: dict[str, Any] = {"entropy": entropy, "topk_mass": pm.topk_mass(p, topk),
                           "local_mass": pm.local_mass(p, window, trace.null_slot)}
    out["attn_rank"], out["attn_erank"] = pm.rank_and_erank(pm.corner(p, trace.null_slot))
    if map_heads:  # rows sum to 1: the null column stays in the map
        out["maps"] = {h: pm.corner(p, trace.null_slot, keep_null=True)[h].to(torch.float16) for h in map_heads}
    keys, values = trace.keys, trace.values
    if trace.null_slot:
        out["null_mass"] = p[..., 0].mean(dim=(0, 2))
        keys, values = keys[:, :, 1:], values[:, :, 1:]
    if trace.sem_scores is not None and trace.geo_scores is not None:
        visible = trace.mask.to(trace.sem_scores.dtype)
        out["sem_geo"] = torch.stack(((trace.sem_scores.abs() * visible).sum(),
                                      (trace.geo_scores.abs() * visible).sum()))
        out["share_sem_msq"] = pm.share_msq(trace.sem_scores, trace.geo_scores, trace.null_slot)
    k2, v2 = _tokens_by_features(keys), _tokens_by_features(values)
    out.update(key_erank=_erank(k2), key_width=min(k2.shape), value_erank=_erank(v2), value_width=min(v2.shape))
    out["cos_in_out"] = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).mean()
    return out


def _numbers(t: dict[str, Any]) -> dict[str, Any]:
    """layer_tensors' output as one layer's numbers (see the module docstring), per-head lists under "heads"."""
    heads = {k: t[k].tolist() for k in ("entropy", "topk_mass", "local_mass", "attn_rank", "attn_erank")}
    stats: dict[str, Any] = {k: float(v.mean()) for k, v in t.items() if k in heads}
    if "null_mass" in t:
        heads["null_mass"] = t["null_mass"].tolist()
        stats["null_mass"] = float(t["null_mass"].mean())
    if "sem_geo" in t:
        sem, geo = t["sem_geo"].tolist()
        stats["sem_share"] = sem / (sem + geo) if sem + geo > 0 else None
        stats["share_sem_msq"] = float(t["share_sem_msq"])
    stats.update({k: float(v) for k, v in t.items() if k.startswith("stable_rank_")})
    stats.update(key_erank=float(t["key_erank"]), key_width=t["key_width"], value_erank=float(t["value_erank"]),
                 value_width=t["value_width"], cos_in_out=float(t["cos_in_out"]), heads=heads)
    return stats


def gradient_sq_norms(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast: Any) -> torch.Tensor:
    """Squared L2 norms of d(val loss)/d(params) on (x, y) per block, then the embedding's, without touching .grad.

    The pass runs in training mode, so it recomputes activations exactly as training does (--grad-checkpoint):
    in eval mode every block's activations would be kept, more memory than the training step it sits beside.
    """
    groups = [list(b.parameters()) for b in model.blocks] + [[model.wte.weight]]
    flat = [p for g in groups for p in g]
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), autocast:
            loss = model(x, y)
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        model.train(was_training)
    del loss
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    sq, i = [], 0
    for g in groups:
        present = [t for t in grads[i:i + len(g)] if t is not None]
        if cpu_kernels.sum_squares_applies(present):  # on CPU in fp64, as the clip's norm (pretrain/train/grad_clip.py)
            sq.append(torch.tensor(cpu_kernels.sum_squares(present), dtype=torch.float32))
        else:  # vector_norm accumulates in fp32 without an fp32 copy of each (bf16) gradient
            sq.append(sum((torch.linalg.vector_norm(t, dtype=torch.float32).square() for t in present), zero))
        i += len(g)
    return torch.stack(sq)


@torch.no_grad()
def diagnostic_tensors(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast: Any, topk: int = pm.TOPK,
                       window: int = pm.LOCAL_WINDOW, maps: Mapping[int, Sequence[int]] | None = None,
                       ) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The device work of `diagnose`: per-layer `layer_tensors` (with the attention maps of `maps`, layer ->
    heads, and the projections' stable ranks) and `gradient_sq_norms`, small tensors only."""
    maps = maps or {}
    per_layer: list[dict[str, Any]] = []

    def on_layer(i: int, trace: AttentionTrace, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        t = layer_tensors(trace, x_in, x_out, topk, window, maps.get(i, ()))
        per_layer.append(t | pm.projection_stable_ranks(model.blocks[i].attn))

    was_training = model.training
    model.eval()
    try:
        with autocast:
            model.trace_attention(x, on_layer)
    finally:
        model.train(was_training)
    return per_layer, gradient_sq_norms(model, x, y, autocast)


@torch.no_grad()
def diagnose(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast: Any, topk: int = pm.TOPK,
             window: int = pm.LOCAL_WINDOW, maps: Mapping[int, Sequence[int]] | None = None,
             maps_out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every diagnostic of `model` on the batch (x, y), as the fields of one `diagnostics` event
    (`maps`: layer -> heads whose attention maps go into `maps_out` as {"L0_H1": float16 array}):

    {"layer": {"00": {"entropy": ..., ...}, ...}, "mean": {metric: mean over layers}, "head": {"00":
    {"entropy": {"h0": ...}}} (small models only), "embed_grad_norm", "seq_len", "rows", "seconds"}.
    """
    t0 = time.perf_counter()
    tensors, grad_sq = diagnostic_tensors(model, x, y, autocast, topk, window, maps)
    for i, t in enumerate(tensors):
        for h, a in t.pop("maps", {}).items():
            if maps_out is not None:
                maps_out[f"L{i}_H{h}"] = a.float().cpu().numpy().astype("float16")
    per_layer = [_numbers(t) for t in tensors]
    norms = [math.sqrt(v) for v in grad_sq.tolist()]
    block_norms, embed_norm = norms[:-1], norms[-1]
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
