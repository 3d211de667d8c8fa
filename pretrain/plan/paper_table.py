"""docs/paper_presets.md: the paper's configurations (one per attention variant), what each sets and what differs
between them, with their parameters and KV-cache bytes at the `small` and `1b` sizes, every number computed by
ModelConfig (none typed by hand).

    python -m pretrain.plan.paper_table            # rewrite docs/paper_presets.md
    python -m pretrain.plan.paper_table --check    # exit 1 if the file is out of date (tests run this)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from model import PAPER_PRESETS, ModelConfig
from model.config import PAPER_ATTENTION, PAPER_OPTIONS
from model.variants import ATTENTION_VARIANTS
from pretrain.plan.generated_doc import generated_doc_main

DOC = Path(__file__).resolve().parents[2] / "docs" / "paper_presets.md"
SIZES = ("small", "1b")
# Rows: the plain variants for reference, then the paper's presets (name -> ModelConfig fields).
ROWS: dict[str, dict] = {**{name: {"attn": name} for name in ATTENTION_VARIANTS}, **PAPER_PRESETS}
FLAGS = {"attn": "--attn", "tie_qk": "--tie-qk", "null_attn": "--null-attn", "learned_temp": "--learned-temp"}
OPTIONS = ("tie_qk", "null_attn", "learned_temp")  # the ModelConfig switches a preset may set


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


def _flags(fields: dict) -> str:
    return " ".join(f"{FLAGS[k]} {v}" if k == "attn" else FLAGS[k] for k, v in fields.items() if v)


def _differs() -> list[str]:
    """Which option each preset sets, and a sentence naming exactly what differs between them."""
    out = ["| preset | attention | " + " | ".join(f"`{FLAGS[o]}`" for o in OPTIONS) + " | flags |",
           "|---|---|" + "---|" * len(OPTIONS) + "---|"]
    for name, fields in PAPER_PRESETS.items():
        marks = " | ".join("on" if fields.get(o) else "off" for o in OPTIONS)
        out.append(f"| `{name}` | {ATTENTION_VARIANTS[fields['attn']].summary} | {marks} | `{_flags(fields)}` |")
    shared = ", ".join(f"`{FLAGS[k]}`" for k, v in PAPER_OPTIONS.items() if v)
    own = "; ".join(f"{name} also {_flags(fields)}" for name, fields in PAPER_ATTENTION.items())
    return out + ["", f"Every preset sets {shared} (PAPER_OPTIONS in `model/config.py`): the original research code "
                  "trained every mode, standard and gqa included, with its learned per-head temperature (a log-scale "
                  "on q, initialised to 0) and the null key/value. **What differs is the attention alone**: "
                  f"`--attn`, and what belongs to a variant's own attention (PAPER_ATTENTION: {own}, its "
                  "original form). With no budget given, the launcher trains every variant of a size on the same "
                  "tokens (20 per parameter of the plain baseline of that shape), so the presets also share their "
                  "steps and data."]


def render(_current: str = "") -> str:
    """The whole markdown page."""
    out = ["# The paper's configurations", "",
           "One preset per attention variant, accepted by the trainer as `--exp NAME` and by the launcher as "
           "`--variant NAME`, generated from one table (`model/config.py`) over the variant registry "
           "(`model/variants.py`):", ""]
    out += _differs()
    out += ["", "An explicit flag contradicting a preset (e.g. `--exp paper_decoupled --no-null-attn`) is refused: "
            "name the flags yourself for an ablation.", "",
            "Attention widths come from the size preset (`model/config.py`); KV bytes are per generated token over "
            "all layers in bf16 (`ModelConfig.kv_cache_bytes_per_token(2)`; the null key/value is per layer, "
            "not per token), and per sequence at the full context (block size). Regenerate with "
            "`python -m pretrain.plan.paper_table`.", ""]
    for size in SIZES:
        base = ModelConfig.from_preset(size, attn="baseline")
        out += [f"## `{size}` (d_model {base.d_model}, {base.n_layer} layers, {base.n_head} heads, "
                f"context {base.block_size})", "",
                "| configuration | flags | params | non-embedding | KV B/token | KV vs baseline | KV per sequence |",
                "|---|---|---:|---:|---:|---:|---:|"]
        base_kv = base.kv_cache_bytes_per_token(2)
        for name, fields in ROWS.items():
            cfg = ModelConfig.from_preset(size, **fields)
            kv = cfg.kv_cache_bytes_per_token(2)
            out.append(f"| `{name}` | `{_flags(fields)}` | {_m(cfg.num_params())} | "
                       f"{_m(cfg.num_params(non_embedding=True))} | {kv:,} | {kv / base_kv:.3f} | "
                       f"{kv * cfg.block_size / 2**20:,.1f} MiB |")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    return generated_doc_main(argv, "pretrain.plan.paper_table", __doc__.splitlines()[0], DOC, render)


if __name__ == "__main__":
    sys.exit(main())
