"""ModelConfig: the shape of the network, its presets, and the numbers derived from it.

Everything here is arithmetic on the config (no tensors are built), so the launcher can plan a run,
count parameters, FLOPs and KV-cache bytes for a 1B model instantly. Each formula is tested against
the real `GPT` built from the same config (tests/test_model_config.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .variants import ATTENTION_VARIANTS, AttentionVariant, attention_variant

ATTN_VARIANTS = tuple(ATTENTION_VARIANTS)  # the registered names (model/variants.py), in order

# Presets. For bottleneck/decoupled the dims are chosen so every per-head size is a multiple of 8
# (small and 1b: semantic 8, geometric 16, value 24 per head), which fast SDPA kernels (flash / memory-efficient)
# need; and sem_dim + geo_dim == attn_dim, so decoupled q/k and v have the same head dim and the
# flash kernel applies. The plain d/16, d/8 defaults would give 4-wide semantic heads at these shapes.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU smoke tests: ~3.3M params, 3.2M of them in the GPT-2-vocab embedding, whose LM-head matmul
    # is most of a training step. attn_dim == d_model here: too small to bottleneck at 8-wide heads.
    "tiny": dict(block_size=256, n_layer=2, n_head=4, d_model=64, d_ff=192,
                 sem_dim=32, geo_dim=32, attn_dim=64),
    # GPT-2-small shape (~124M params with a tied 50304 x 768 embedding); d_ff = 8/3 d for SwiGLU.
    "small": dict(block_size=1024, n_layer=12, n_head=12, d_model=768, d_ff=2048,
                  sem_dim=96, geo_dim=192, attn_dim=288),
    # TinyLlama-1.1B shape (d 2048, 22 layers, 32 heads, d_ff 5632); ~1.2B params with tied embeddings.
    "1b": dict(block_size=2048, n_layer=22, n_head=32, d_model=2048, d_ff=5632,
               sem_dim=256, geo_dim=512, attn_dim=768),
}


# The paper's comparison, one preset per registered variant (`paper_<variant>`): ModelConfig fields layered over a
# size preset. A comparison gives every variant the same options except the attention under study, so the options
# are one table all of them share: the original research code trained every mode, standard and gqa included, with
# its learned per-head temperature (learned_temp defaulted to True there) and the null key/value. PAPER_ATTENTION
# holds what belongs to a variant's own attention beyond `attn`: decoupled's tied q/k projections, as in the
# original's paper_decoupled (EXP_PRESETS). docs/paper_presets.md is generated from these two tables.
PAPER_OPTIONS: dict[str, Any] = dict(null_attn=True, learned_temp=True)
PAPER_ATTENTION: dict[str, dict[str, Any]] = {"decoupled": dict(tie_qk=True)}
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    f"paper_{name}": dict(attn=name, **PAPER_ATTENTION.get(name, {}), **PAPER_OPTIONS) for name in ATTENTION_VARIANTS
}

@dataclass
class ModelConfig:
    """Hyper-parameters of the decoder. Optional dims (None) are resolved in __post_init__.

    attn: a registered variant (model/variants.py): "baseline" (MHA), "gqa" (n_kv_head key/value heads),
    "bottleneck" (q, k, v: d -> attn_dim), "decoupled" (semantic q_s/k_s of sem_dim without RoPE + geometric
    q_g/k_g of geo_dim with RoPE, v of attn_dim). Defaults: sem_dim = d/16, geo_dim = d/8, attn_dim = sem_dim + geo_dim,
    n_kv_head = n_head (gqa: n_head/4, or 1 when 4 does not divide n_head). Presets keep
    bottleneck/decoupled per-head sizes multiples of 8 so fast SDPA kernels apply.
    Options: null_attn (learned null key/value per layer), tie_qk (k reuses q's projection),
    learned_temp (per-head log-scale on q), tie_embeddings (LM head = token embedding).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    d_model: int = 768
    d_ff: int = 2048
    attn: str = "baseline"
    attn_dim: int | None = None
    sem_dim: int | None = None
    geo_dim: int | None = None
    rope_base: float = 10000.0
    null_attn: bool = False
    tie_qk: bool = False
    learned_temp: bool = False
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        variant = attention_variant(self.attn)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.rope_base <= 0:
            raise ValueError(f"rope_base={self.rope_base} must be > 0 (10000 is the usual value)")
        d, h = self.d_model, self.n_head
        if self.n_kv_head is None:
            self.n_kv_head = variant.default_kv_heads(h)
        if self.sem_dim is None:
            self.sem_dim = d // 16
        if self.geo_dim is None:
            self.geo_dim = d // 8
        if self.attn_dim is None:
            self.attn_dim = self.sem_dim + self.geo_dim
        self._validate()

    def _validate(self) -> None:
        h, kv, variant = self.n_head, self.n_kv_head, self.variant
        if variant.kv_heads_settable:
            if kv <= 0 or h % kv != 0:
                raise ValueError(f"n_kv_head={kv} must divide n_head={h}; pick a divisor of {h}")
        elif kv != variant.default_kv_heads(h):
            settable = " or ".join(f"attn={v.name!r}" for v in ATTENTION_VARIANTS.values() if v.kv_heads_settable)
            raise ValueError(f"n_kv_head={kv} only applies to {settable}; set {settable} or "
                             f"n_kv_head={variant.default_kv_heads(h)}")
        if self.tie_qk and (kv != h or not variant.ties_qk):
            raise ValueError(f"tie_qk needs k shaped like q, but {self.attn} has n_kv_head={kv} != n_head={h}; "
                             f"set n_kv_head={h} or drop tie_qk")
        for name, rotary in variant.widths:
            self._check_heads(name, getattr(self, name), rotary)

    def _check_heads(self, name: str, dim: int, rotary: bool) -> None:
        h = self.n_head
        step = 2 * h if rotary else h  # the suggested fix must also pass the RoPE check below
        if dim <= 0 or dim % h != 0:
            raise ValueError(f"{name}={dim} must be a positive multiple of n_head={h}; "
                             f"use e.g. {name}={max(step, round(dim / step) * step)}")
        if rotary and (dim // h) % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim but {name}/n_head = {dim}/{h} = {dim // h}; "
                             f"use e.g. {name}={(dim // h + 1) * h}")

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset with field overrides. Changing d_model or n_head drops the preset's attention
        dims (back to the d/16, d/8 defaults); changing sem_dim or geo_dim re-derives attn_dim."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
        fields = dict(PRESETS[name])
        if "d_model" in overrides or "n_head" in overrides:
            for key in ("sem_dim", "geo_dim", "attn_dim"):
                fields.pop(key, None)
        if ("sem_dim" in overrides or "geo_dim" in overrides) and "attn_dim" not in overrides:
            fields.pop("attn_dim", None)
        fields.update(overrides)
        return cls.from_dict(fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    # ----------------------------------------------------------------------------- derived shapes
    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab rounded up to a multiple of 64 (tensor-core friendly GEMMs)."""
        return (self.vocab_size + 63) // 64 * 64

    @property
    def variant(self) -> AttentionVariant:
        """The registry entry of `attn` (model/variants.py)."""
        return ATTENTION_VARIANTS[self.attn]

    @property
    def head_dims(self) -> tuple[int, int, int]:
        """Per-head (qk dim, v dim, rotary dim), as the variant splits its widths (model/variants.py). For
        decoupled qk = hd_s + hd_g and rotary = hd_g: q/k heads hold [semantic | geometric] side by side."""
        return self.variant.head_dims(self)

    def _attn_weights(self) -> int:
        """Parameters of one layer's attention projection matrices (all used in matmuls)."""
        d, (hd_qk, hd_v, _) = self.d_model, self.head_dims
        q_width, k_width, v_width = self.n_head * hd_qk, self.n_kv_head * hd_qk, self.n_kv_head * hd_v
        k_params = 0 if self.tie_qk else d * k_width
        return d * q_width + k_params + d * v_width + self.n_head * hd_v * d

    def _matmul_params(self) -> int:
        """Weights multiplied with activations per token: block linears plus the LM head."""
        per_layer = self._attn_weights() + 3 * self.d_model * self.d_ff
        return self.n_layer * per_layer + self.padded_vocab_size * self.d_model

    def num_params(self, non_embedding: bool = False) -> int:
        """Exact parameter count of GPT(self), tied weights counted once.

        non_embedding=True leaves out the token embedding and, when untied, the LM head
        (the vocab x d tables), as in Kaplan et al. 2020.
        """
        d, (hd_qk, hd_v, _) = self.d_model, self.head_dims
        per_layer = self._attn_weights() + 3 * d * self.d_ff + 2 * d  # + two RMSNorm gains
        if self.null_attn:
            per_layer += self.n_kv_head * (hd_qk + hd_v)
        if self.learned_temp:
            per_layer += self.n_head
        body = self.n_layer * per_layer + d  # + final RMSNorm
        if non_embedding:
            return body
        tables = 1 if self.tie_embeddings else 2
        return body + tables * self.padded_vocab_size * d

    def flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Training (forward + backward) FLOPs per token at sequence length seq_len.

        6 * N_matmul + 6 * n_layer * S * (H * hd_qk + H * hd_v), where
          N_matmul = every weight multiplied with activations: the block linears plus the LM head
                     (counted even when tied: the head matmul runs; the embedding lookup is free);
          S        = keys each query is scored against = seq_len (+1 with null_attn);
          H*hd_qk  = d_model (baseline, gqa: all H query heads score), attn_dim (bottleneck),
                     sem_dim + geo_dim (decoupled); H*hd_v = d_model / d_model / attn_dim / attn_dim.
        Forward is 2 FLOPs per multiply-add (QK^T and AV each 2*S*width), backward twice the forward.
        This is PaLM's 6N + 12*L*H*Q*T (Chowdhery et al. 2022, appendix B) generalised to unequal
        q/k and v widths; Chinchilla (Hoffmann et al. 2022, appendix F) counts the same terms.
        No causal halving: the full S x S score matrix is counted, as PaLM's MFU convention and
        torch's FlopCounterMode do. Norms, softmax and activations are ignored (<1%), and so is
        recomputation (activation checkpointing, the chunked loss re-running the LM head): these
        are model FLOPs, the numerator of MFU.

        causal=True counts only the query-key pairs the causal mask keeps (what a flash kernel computes):
        query i scores i + 1 keys, (seq_len + 1) / 2 on average (+1 with null_attn). For the 1b preset at
        2048 tokens the model figure is ~7 % higher; MFU on model FLOPs is the one papers compare.
        """
        hd_qk, hd_v, _ = self.head_dims
        keys = (seq_len + 1) / 2 if causal else seq_len
        keys += 1 if self.null_attn else 0
        attention = 6 * self.n_layer * keys * self.n_head * (hd_qk + hd_v)
        return float(6 * self._matmul_params() + attention)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV-cache bytes per generated token over all layers: baseline caches d_model keys and values,
        gqa n_kv_head heads of each, bottleneck attn_dim of each, decoupled k_s + k_g (sem_dim + geo_dim)
        and v (attn_dim). The null key/value is per layer, not per token, so it is left out."""
        hd_qk, hd_v, _ = self.head_dims
        return self.n_layer * self.n_kv_head * (hd_qk + hd_v) * bytes_per_value
