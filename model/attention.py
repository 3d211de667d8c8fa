"""Causal self-attention: the registered variants' modules (model/variants.py), one SDPA call per layer.

  baseline    H heads of d/H; q, k, v: d -> d; RoPE on q and k.
  gqa         k, v: d -> n_kv_head * d/H (Ainslie et al. 2023); SDPA broadcasts each k/v head over
              its group of query heads (enable_gqa=True), so K/V are never copied per query head.
  bottleneck  q, k, v: d -> attn_dim (heads of attn_dim/H); out attn_dim -> d.
  decoupled   semantic q_s, k_s: d -> sem_dim, no RoPE (content); geometric q_g, k_g: d -> geo_dim,
              with RoPE (position); v: d -> attn_dim. score = q_s.k_s/sqrt(hd_s) + q_g.k_g/sqrt(hd_g),
              done as ONE SDPA call of cat[q_s/sqrt(hd_s), q_g/sqrt(hd_g)] against cat[k_s, k_g] with
              scale=1, so each path is scaled exactly once, by its own head dim.

CausalSelfAttention serves the first three (one q and one k projection, sized by cfg.head_dims);
DecoupledAttention overrides only how q/k are built and how a score splits into its two paths.

Options: null_attn (a learned per-layer null key/value every query may attend to, an "attention
sink": prepended to K/V and admitted by the mask; see "null key and position" below), tie_qk (k reuses
q's projection), learned_temp (per-head log-scale on q, initialised to 0 = no change).

Null key and position: the null key is stored unrotated while queries are rotated, and RoPE's rotation at
position 0 is the identity, so the null key scores exactly like a real key at position 0: a query at
position m sees it at relative distance m (a BOS-like sink whose score may depend on how far back it is),
as in the original code. Kept deliberately, so results compare with the original; for decoupled the
semantic half of its score is position-free, only the geometric half sees the distance. The optimizer
gives the null key/value no weight decay (pretrain/train/optim.py).

Kernel: SDPA (flash / cuDNN / memory-efficient on a card, the flash kernel on CPU), except bf16 on a CPU with native
bf16 GEMMs, where model/cpu_attention.py computes the same attention in 0.5-0.65x the flash kernel's CPU time (with
AMX its forward is the flash kernel's, its backward blocked GEMMs), and fp32 causal self-attention where the
library's fp32 kernel is built (AVX2), 0.55-0.66x (fake tensors, dispatch modes, compiled graphs and every other device
keep SDPA).

Reference path: forward(x, on_trace=f) computes the same attention with an explicit softmax (after the same
projection code) and hands f an AttentionTrace of probabilities and score parts, for diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_attention import causal_attention_cpu, cpu_attention_applies
from .kv_formats import KVSetting
from .kv_quant import QuantKVCache, new_kv_cache
from .rope import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:  # config.py imports the registry, which imports this file
    from .config import ModelConfig

try:  # FlexAttention appeared in torch 2.5; the floor is 2.6, but a stripped build may lack it.
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # pragma: no cover - depends on the torch build
    _flex = None

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class KVCache:
    """Keys and values of the tokens seen so far, for one layer, preallocated to max_len.

    k holds what the variant scores against: rotated keys, or for decoupled the per-head
    concatenation [k_s | rotated k_g]; v the values. Queries are never cached.
    """

    def __init__(self, batch: int, n_kv_head: int, max_len: int, k_dim: int, v_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch, n_kv_head, max_len, k_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, n_kv_head, max_len, v_dim, device=device, dtype=dtype)
        self.pos = 0  # number of tokens stored

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, Hkv, T, *) keys/values; return views over everything stored so far."""
        end = self.pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} tokens; {end} requested")
        self.k[:, :, self.pos:end] = k
        self.v[:, :, self.pos:end] = v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds (model/kv_quant.py's caches answer the same)."""
        return self.k.nbytes + self.v.nbytes


@dataclass
class AttentionTrace:
    """What one layer's reference attention saw, for diagnostics (pretrain/evals/diagnostics.py).

    probs (B, H, T, S') softmax probabilities, S' = keys incl. the null slot at column 0 when null_slot;
    mask (T, S') True where a query may attend; keys / values (B, Hkv, S', *) as the KV cache holds them
    (rotated keys; decoupled: [k_s | rotated k_g] per head), null slot included; sem_scores / geo_scores
    (B, H, T, S') the two paths' parts of the pre-softmax score (decoupled only, else None).
    """

    probs: torch.Tensor
    mask: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    sem_scores: torch.Tensor | None
    geo_scores: torch.Tensor | None
    null_slot: bool


class CausalSelfAttention(nn.Module):
    """Attention with one q and one k projection (baseline, gqa, bottleneck: widths from cfg.head_dims)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.qk_head_dim, self.v_head_dim, rotary_dim = cfg.head_dims
        self.tie_qk = cfg.tie_qk
        d, h, kv = cfg.d_model, cfg.n_head, cfg.n_kv_head
        # Parameters are created in this order (q/k, v, o, null, temp): it fixes the init RNG stream and
        # the checkpoint's keys, so a subclass builds its q/k in _build_qk and nowhere else.
        self._build_qk(cfg)
        if "qkv_proj" not in self._modules:
            self.v_proj = nn.Linear(d, kv * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=False)
        self.o_proj.is_residual_out = True  # GPT scales its init by 1/sqrt(2 * n_layer)
        self.rope = RotaryEmbedding(rotary_dim, cfg.rope_base)
        if cfg.null_attn:
            # Learned key/value of a virtual token. Left unrotated, i.e. at position 0 (module docstring).
            self.null_k = nn.Parameter(torch.zeros(kv, 1, self.qk_head_dim))
            self.null_v = nn.Parameter(torch.zeros(kv, 1, self.v_head_dim))
        else:
            self.null_k = self.null_v = None
        self.log_temp = nn.Parameter(torch.zeros(h)) if cfg.learned_temp else None

    def _build_qk(self, cfg: ModelConfig) -> None:
        """The query/key projections: with tie_qk one q_proj (k is q); otherwise q, k and v fused into one
        qkv_proj, rows [q; k; v], so the block runs one wider GEMM instead of three (issue 23.5).
        pretrain/llama.py splits it into Llama's q_proj/k_proj/v_proj."""
        if self.tie_qk:
            self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.qk_head_dim, bias=False)
            return
        self.qkv_widths = (cfg.n_head * self.qk_head_dim, cfg.n_kv_head * self.qk_head_dim,
                           cfg.n_kv_head * self.v_head_dim)
        self.qkv_proj = nn.Linear(cfg.d_model, sum(self.qkv_widths), bias=False)

    def projections(self) -> dict[str, torch.Tensor]:
        """Each projection's weight by short name (q, k, v, o, q_sem, ...), the fused qkv_proj cut into its
        q/k/v rows (views), so per-projection metrics and tests read the same matrices either layout."""
        out = {}
        for name, m in self.named_children():
            if name == "qkv_proj":
                out |= dict(zip("qkv", m.weight.split(self.qkv_widths), strict=True))
            elif isinstance(m, nn.Linear):
                out[name.removesuffix("_proj")] = m.weight
        return out

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n*hd) -> (B, n, T, hd)."""
        B, T, _ = t.shape
        return t.view(B, T, n, -1).transpose(1, 2)

    def _qk(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Queries and keys (tie_qk: k is q) in head layout with RoPE applied, plus the scale SDPA should use."""
        cos, sin = self.rope(positions)
        q = apply_rotary(self._heads(self.q_proj(x), self.n_head), cos, sin)
        return q, q, None  # SDPA's default scale 1/sqrt(head_dim)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k (RoPE applied) and v in head layout, plus the scale SDPA should use."""
        if "qkv_proj" not in self._modules:
            q, k, scale = self._qk(x, positions)
            return q, k, self._heads(self.v_proj(x), self.n_kv_head), scale
        q, k, v = self.qkv_proj(x).split(self.qkv_widths, dim=-1)
        cos, sin = self.rope(positions)
        q = apply_rotary(self._heads(q, self.n_head), cos, sin)
        k = apply_rotary(self._heads(k, self.n_kv_head), cos, sin)
        return q, k, self._heads(v, self.n_kv_head), None  # SDPA's default scale 1/sqrt(head_dim)

    def _score_parts(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
        """Pre-softmax scores of (B, H, T, hd) q against (B, H, S, hd) k, plus the semantic and geometric
        parts of them (None here: one path)."""
        return q @ k.transpose(-1, -2) * scale, None, None

    def _project(self, x: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, ...]:
        """The shared front half of attention: q (B, H, T, *), k and v (B, Hkv, S[+1], *) with the cache and
        null slot applied, the scale SDPA should use (None = 1/sqrt(head dim)), and the mask (None = causal)."""
        B, T, _ = x.shape
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=x.device)
        q, k, v, scale = self._qkv(x, positions)
        if self.log_temp is not None:
            q = q * self.log_temp.exp().to(q.dtype).view(1, -1, 1, 1)
        if cache is not None:
            k, v = cache.append(k, v)
        S = k.shape[2]  # keys: cached + new
        mask = None
        if self.null_k is not None:
            k = torch.cat((self.null_k.to(k.dtype).expand(B, -1, -1, -1), k), dim=2)
            v = torch.cat((self.null_v.to(v.dtype).expand(B, -1, -1, -1), v), dim=2)
            mask = causal_mask(T, S, start, x.device, null_slot=True)
        elif start > 0 and T > 1:
            mask = causal_mask(T, S, start, x.device)
        return q, k, v, scale, mask

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                on_trace: Callable[[AttentionTrace], None] | None = None,
                block_mask: BlockMask | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d). With a cache, x holds the tokens after the cached ones.

        With `on_trace`, attention runs through the explicit reference path (`_attend_reference`) and on_trace
        receives the probabilities and score parts; the projections are the same code either way. `block_mask`
        (shared_block_mask, built once per forward for every layer) selects FlexAttention with that mask."""
        B, T, _ = x.shape
        start = cache.pos if cache is not None else 0
        q, k, v, scale, mask = self._project(x, cache)
        gqa = self.n_kv_head != self.n_head
        if on_trace is not None:
            y = self._attend_reference(q, k, v, scale, mask, start, on_trace)
        elif block_mask is not None or (self.null_k is not None and attention_backend(
                x.device.type, True, torch.compiler.is_compiling()) == "flex"):
            y = null_slot_flex_attention(q, k, v, start, scale, gqa, block_mask)
        else:
            # Decided without T: under torch.compile with a dynamic T, `T > 1` would be a symbolic bool and
            # break every block's graph. start == 0 is causal for any T (one query at 0 sees its one key); a
            # cached single new token (start > 0, no mask) sees every key. No explicit mask keeps flash eligible.
            is_causal = mask is None and start == 0
            if cpu_attention_applies(q, k, v, mask):  # GEMMs + fused softmax on CPU, not the flash kernel
                y = causal_attention_cpu(q, k, v, mask, scale)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                                   enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _attend_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                          mask: torch.Tensor | None, start: int,
                          on_trace: Callable[[AttentionTrace], None]) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v written out, in at least fp32, so the probabilities can be seen.

        Equals the SDPA path up to rounding (tests/test_model_attention.py). For decoupled, q and k are the
        per-head concatenations [semantic | geometric] with each half already scaled, so splitting the dot
        product at sem_head_dim gives the two paths' exact shares of every score.
        """
        T = q.shape[2]
        if mask is None:
            mask = causal_mask(T, k.shape[2], start, q.device)
        group = self.n_head // self.n_kv_head
        kh = k.repeat_interleave(group, dim=1) if group > 1 else k  # (B, H, S, hd): one k per query head
        vh = v.repeat_interleave(group, dim=1) if group > 1 else v
        dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 scores would blur small probabilities
        qf, kf = q.to(dtype), kh.to(dtype)
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        with torch.autocast(q.device.type, enabled=False):  # autocast would run these matmuls in bf16
            scores, sem, geo = self._score_parts(qf, kf, scale)
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = probs @ vh.to(dtype)
        on_trace(AttentionTrace(probs=probs, mask=mask, keys=k, values=v, sem_scores=sem, geo_scores=geo,
                             null_slot=self.null_k is not None))
        return y.to(q.dtype)

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                  setting: KVSetting | None = None) -> KVCache | QuantKVCache:
        """The layer's cache in the model's dtype, or in a KV setting's formats (model/kv_quant.py)."""
        quant = None if setting is None else new_kv_cache(batch, self.n_kv_head, max_len, self.qk_head_dim,
                                                          self.v_head_dim, device, dtype, setting,
                                                          getattr(self, "sem_head_dim", None))
        return quant or KVCache(batch, self.n_kv_head, max_len, self.qk_head_dim, self.v_head_dim, device, dtype)


class DecoupledAttention(CausalSelfAttention):
    """decoupled: semantic q_s/k_s (no RoPE) and geometric q_g/k_g (RoPE) projections, one SDPA call."""

    def _build_qk(self, cfg: ModelConfig) -> None:
        d, h = cfg.d_model, cfg.n_head
        self.sem_head_dim, self.geo_head_dim = cfg.sem_dim // h, cfg.geo_dim // h
        self.q_sem_proj = nn.Linear(d, cfg.sem_dim, bias=False)
        self.q_geo_proj = nn.Linear(d, cfg.geo_dim, bias=False)
        if not self.tie_qk:
            self.k_sem_proj = nn.Linear(d, cfg.sem_dim, bias=False)
            self.k_geo_proj = nn.Linear(d, cfg.geo_dim, bias=False)

    def _qk(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Per-head [q_s | q_g] and [k_s | k_g], geometric halves rotated, each path pre-scaled (scale 1)."""
        h, kv = self.n_head, self.n_kv_head
        cos, sin = self.rope(positions)
        q_s = self._heads(self.q_sem_proj(x), h)
        q_g = apply_rotary(self._heads(self.q_geo_proj(x), h), cos, sin)
        if self.tie_qk:
            k_s, k_g = q_s, q_g
        else:
            k_s = self._heads(self.k_sem_proj(x), kv)
            k_g = apply_rotary(self._heads(self.k_geo_proj(x), kv), cos, sin)
        # Scale each path by its own head dim here, and tell SDPA not to scale again.
        q = torch.cat((q_s / math.sqrt(self.sem_head_dim), q_g / math.sqrt(self.geo_head_dim)), dim=-1)
        k = torch.cat((k_s, k_g), dim=-1)
        return q, k, 1.0

    def _score_parts(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
        """Splitting each per-head dot product at sem_head_dim gives the two paths' exact shares of the score."""
        h_s = self.sem_head_dim
        sem = q[..., :h_s] @ k[..., :h_s].transpose(-1, -2) * scale
        geo = q[..., h_s:] @ k[..., h_s:].transpose(-1, -2) * scale
        return sem + geo, sem, geo


def causal_mask(T: int, S: int, start: int, device: torch.device, null_slot: bool = False) -> torch.Tensor:
    """Boolean (T, S[+1]) mask, True = may attend. Query i sits at position start + i and sees keys
    0..start+i; with null_slot an always-visible column 0 is prepended for the null key."""
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)
    if null_slot:
        mask = torch.cat((torch.ones(T, 1, dtype=torch.bool, device=device), mask), dim=1)
    return mask


def attention_backend(device_type: str, null_attn: bool, compiling: bool) -> str:
    """Which kernel null-attn uses: "flex" or "sdpa".

    SDPA with the explicit null-slot mask loses the flash/cuDNN kernels' causal block skipping (and on
    CUDA usually falls back to the memory-efficient kernel). FlexAttention expresses causal + null slot
    as a block mask and keeps the skipping, but only as a compiled kernel: eager it materialises the
    whole score matrix. So: flex inside a compiled CUDA graph, SDPA everywhere else (CPU keeps its flash
    kernel path through SDPA). Without null-attn there is no mask and SDPA's is_causal is used.
    """
    if not null_attn or device_type != "cuda" or not compiling or _flex is None:
        return "sdpa"
    return "flex"


def _null_slot_visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    # Module level, not a closure: a compiled block guards on the mask function it is handed, and this one is the
    # same object every forward (one graph for all steps).
    return (kv_idx == 0) | (kv_idx - 1 <= q_idx)


def null_slot_block_mask(T: int, S: int, start: int, device: torch.device) -> BlockMask:
    """FlexAttention's block mask for T queries at positions start.. over S slots [null | keys]: slot 0 (the null
    key) is visible to every query, slot j >= 1 (key position j - 1) to queries at positions >= j - 1."""
    def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx == 0) | (kv_idx - 1 <= q_idx + start)

    return _flex.create_block_mask(_null_slot_visible if start == 0 else visible, None, None, T, S, device=device)


def shared_block_mask(x: torch.Tensor, null_attn: bool, compiled: bool) -> BlockMask | None:
    """The block mask every layer of one forward over x (B, T, d), no cache, hands to FlexAttention, or None where
    the layers use SDPA (attention_backend). Built once per forward instead of once per layer: inside each
    compiled block it was n_layer (2 n_layer with checkpointing) rounds of the same small kernels per micro-step."""
    if attention_backend(x.device.type, null_attn, compiled) != "flex":
        return None
    return null_slot_block_mask(x.shape[1], x.shape[1] + 1, 0, x.device)


def null_slot_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                             scale: float | None, enable_gqa: bool,
                             block_mask: BlockMask | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, hd) over [null | keys] (S + 1 slots) with FlexAttention.

    Same result as SDPA with causal_mask(T, S, start, null_slot=True). `block_mask` is null_slot_block_mask's for
    these shapes when the caller built it once for all layers; None builds it here.
    """
    if block_mask is None:
        block_mask = null_slot_block_mask(q.shape[2], k.shape[2], start, q.device)
    return _flex.flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
