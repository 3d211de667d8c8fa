"""Exports Llama cannot hold (bottleneck / decoupled, null_attn, learned_temp) as a `trust_remote_code` model.

The export folder gets model/'s own sources (every module but `__init__.py`, copied byte for byte) plus two
small wrappers from `pretrain/hf_remote/` (a PretrainedConfig and an `AutoModelForCausalLM` class around
`GPT`), and config.json's `auto_map` points transformers at them. So
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs the very network that was trained,
and lm-eval-harness (`--model hf --model_args pretrained=DIR,trust_remote_code=True`) scores it; no copy of
the model code can drift from model/ because there is none in the repo.
Weights are stored under the wrapper's names (`gpt.` + ours); with tied embeddings only `gpt.wte.weight`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import model
from model import ModelConfig

if TYPE_CHECKING:  # torch is not needed to name the format (export's --help imports this file)
    import torch

MODEL_DIR = Path(model.__file__).resolve().parent  # wherever the package is installed
WRAPPER_DIR = Path(__file__).resolve().parent / "hf_remote"
WRAPPERS = ("configuration_pretrain.py", "modeling_pretrain.py")
FORMAT = "pretrain-gpt"  # config.json's "format": what load_exported recognises
PREFIX = "gpt."  # the wrapper holds the GPT as .gpt
MODEL_TYPE = "pretrain_gpt"
ARCHITECTURE = "PretrainGPTForCausalLM"


def model_sources() -> list[Path]:
    """model/'s modules the wrapper imports (directly or through each other): all of them but the package init."""
    return sorted(p for p in MODEL_DIR.glob("*.py") if p.name != "__init__.py")


def write_remote_code(out: Path) -> list[str]:
    """Copy model/'s sources and the wrappers into `out`; the names written."""
    names = []
    for src in [*model_sources(), *(WRAPPER_DIR / w for w in WRAPPERS)]:
        shutil.copyfile(src, out / src.name)
        names.append(src.name)
    return names


def remote_config(mcfg: ModelConfig, dtype: torch.dtype, why: str, extra: dict[str, Any]) -> dict[str, Any]:
    """config.json: the wrapper's config (our ModelConfig under model_config, flat HF names for tools)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_pretrain.PretrainGPTConfig",
                     "AutoModelForCausalLM": "modeling_pretrain.PretrainGPTForCausalLM"},
        "format": FORMAT, "model_config": mcfg.to_dict(), "llama_compatible": False, "reason": why,
        "vocab_size": mcfg.vocab_size, "max_position_embeddings": mcfg.block_size, "hidden_size": mcfg.d_model,
        "num_hidden_layers": mcfg.n_layer, "num_attention_heads": mcfg.n_head,
        "tie_word_embeddings": mcfg.tie_embeddings, "use_cache": False,
        "torch_dtype": dtype_name, "dtype": dtype_name, **extra,
    }


def to_remote(weights: dict[str, torch.Tensor], mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict under the wrapper's names; a tied lm_head is left to the wrapper's tie."""
    skip = {"lm_head.weight"} if mcfg.tie_embeddings else set()
    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in weights.items() if k not in skip}


def from_remote(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapper's names back to ours (exports before the wrapper stored ours unprefixed: kept as they are)."""
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}
