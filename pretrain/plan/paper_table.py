"""docs/paper_presets.md: the paper's configurations next to the plain variants, with their parameters and
KV-cache bytes at the `small` and `1b` sizes, every number computed by ModelConfig (none typed by hand).

    python -m pretrain.plan.paper_table            # rewrite docs/paper_presets.md
    python -m pretrain.plan.paper_table --check    # exit 1 if the file is out of date (tests run this)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from model import PAPER_PRESETS, ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.cli import ArgumentParser
from pretrain.fsio import atomic_write_text

DOC = Path(__file__).resolve().parents[2] / "docs" / "paper_presets.md"
SIZES = ("small", "1b")
# Rows: the plain variants for reference, then the paper's presets (name -> ModelConfig fields).
ROWS: dict[str, dict] = {**{name: {"attn": name} for name in ATTENTION_VARIANTS}, **PAPER_PRESETS}
FLAGS = {"attn": "--attn-mode", "tie_qk": "--tie-qk", "null_attn": "--null-attn", "learned_temp": "--learned-temp"}


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


def _flags(fields: dict) -> str:
    return " ".join(f"{FLAGS[k]} {v}" if k == "attn" else FLAGS[k] for k, v in fields.items() if v)


def render() -> str:
    """The whole markdown page."""
    out = ["# The paper's configurations", "",
           "Named presets of the original research code (its `EXP_PRESETS`), accepted by the trainer as "
           "`--exp NAME` and by the launcher as `--variant NAME`:", ""]
    for name, fields in PAPER_PRESETS.items():
        out.append(f"- `{name}` = `{_flags(fields)}`")
    out += ["", "Learned temperature is on in both, as the original trainer had it by default (a per-head "
            "log-scale on q, initialised to 0). An explicit flag contradicting a preset (e.g. `--exp "
            "paper_decoupled --no-null-attn`) is refused: name the flags yourself for an ablation.", "",
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
    p = ArgumentParser(prog="python -m pretrain.plan.paper_table", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the file is current")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run python -m pretrain.plan.paper_table", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(DOC, text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
