"""The attention variants, registered once: what each is, from which everything else derives.

An entry names the module a block builds, how the variant splits its widths into heads (per-head q/k, v and
rotary dims), which ModelConfig widths must split evenly over the heads, how many key/value heads it keeps,
whether Llama's layout holds it (the export: pretrain/llama.py), and a one-line summary. ModelConfig's
validation, parameter / FLOP / KV-cache arithmetic, the trainer's --attn choices, the launcher's --variant
names, the demo, the paper table, benches and the tests' parametrization all read ATTENTION_VARIANTS. The KV
cache holds n_kv_head keys and values per layer and token, so an entry's head dims and kv heads are its KV-
bytes rule (ModelConfig.kv_cache_bytes_per_token).

Adding a variant is one entry here (plus its module in attention.py when its projections differ).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from .config import ModelConfig


@dataclass(frozen=True)
class AttentionVariant:
    """One attention variant. `head_dims(cfg)` gives per-head (qk dim, v dim, rotary dim); `widths` the
    ModelConfig fields split over n_head, each with whether RoPE rotates it (then its head dim must be even)."""

    name: str
    summary: str  # one line for --help and docs
    module_name: str  # class in model/attention.py, built once per block as module(cfg)
    head_dims: Callable[[ModelConfig], tuple[int, int, int]]
    widths: tuple[tuple[str, bool], ...]
    default_kv_heads: Callable[[int], int] = lambda n_head: n_head  # n_kv_head when unset, from n_head
    kv_heads_settable: bool = False  # n_kv_head may be set to any divisor of n_head
    ties_qk: bool = True  # tie_qk is possible: k can have q's shape
    llama_layout: bool = False  # q/k/v are Llama's (d_model/n_head heads): exports as LlamaForCausalLM

    @property
    def module(self) -> type[nn.Module]:
        # Imported on use: the registry (--attn's choices, --help) must load without torch.
        return getattr(importlib.import_module(".attention", __package__), self.module_name)


def _model_heads(cfg: ModelConfig) -> tuple[int, int, int]:
    hd = cfg.d_model // cfg.n_head
    return hd, hd, hd


def _bottleneck_heads(cfg: ModelConfig) -> tuple[int, int, int]:
    hd = cfg.attn_dim // cfg.n_head
    return hd, hd, hd


def _decoupled_heads(cfg: ModelConfig) -> tuple[int, int, int]:
    # q/k heads hold [semantic | geometric] side by side; only the geometric part is rotated.
    h = cfg.n_head
    return (cfg.sem_dim + cfg.geo_dim) // h, cfg.attn_dim // h, cfg.geo_dim // h


def _gqa_kv_heads(n_head: int) -> int:
    # 4 query heads per key/value head, or one shared k/v head (MQA) when 4 does not divide n_head.
    return n_head // 4 if n_head % 4 == 0 else 1


_ENTRIES = (
    AttentionVariant("baseline", "multi-head, q/k/v d -> d",
                     "CausalSelfAttention", _model_heads, (("d_model", True),), llama_layout=True),
    AttentionVariant("gqa", "n_kv_head k/v heads, each shared by a group of query heads",
                     "CausalSelfAttention", _model_heads, (("d_model", True),),
                     default_kv_heads=_gqa_kv_heads, kv_heads_settable=True, llama_layout=True),
    AttentionVariant("bottleneck", "q/k/v d -> attn_dim",
                     "CausalSelfAttention", _bottleneck_heads, (("attn_dim", True),)),
    AttentionVariant("decoupled", "q/k of sem_dim without RoPE + geo_dim with RoPE, v of attn_dim",
                     "DecoupledAttention", _decoupled_heads,
                     (("sem_dim", False), ("geo_dim", True), ("attn_dim", False))),
)
ATTENTION_VARIANTS: dict[str, AttentionVariant] = {v.name: v for v in _ENTRIES}


def attention_variant(name: str) -> AttentionVariant:
    """The registered variant `name`; ValueError naming the known ones otherwise."""
    if name not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attn={name!r}; use one of {', '.join(ATTENTION_VARIANTS)}")
    return ATTENTION_VARIANTS[name]
