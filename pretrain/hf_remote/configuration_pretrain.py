"""Hugging Face config of an exported pretrain-gpt model (written into the export by pretrain/export_remote.py).

`model_config` is our model.ModelConfig as a dict; the flat Hugging Face names (vocab_size,
max_position_embeddings, ...) are copies that tools such as lm-eval-harness read.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class PretrainGPTConfig(PretrainedConfig):
    model_type = "pretrain_gpt"

    def __init__(self, model_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.model_config = dict(model_config or {})
        mc = self.model_config
        kwargs.setdefault("vocab_size", mc.get("vocab_size"))
        kwargs.setdefault("max_position_embeddings", mc.get("block_size"))
        kwargs.setdefault("hidden_size", mc.get("d_model"))
        kwargs.setdefault("num_hidden_layers", mc.get("n_layer"))
        kwargs.setdefault("num_attention_heads", mc.get("n_head"))
        kwargs.setdefault("tie_word_embeddings", bool(mc.get("tie_embeddings", True)))
        super().__init__(**kwargs)
