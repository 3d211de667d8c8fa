"""`AutoModelForCausalLM` wrapper of an exported pretrain-gpt model (trust_remote_code).

The export copies this file beside model/'s own sources (config.py, variants.py, rope.py, attention.py,
gpt.py), so the network that runs here is the trained one, line for line, not a re-implementation.
No KV cache: each generation step recomputes the (at most block_size) context, which gives the same
tokens as our cached sampler. Rows of a padded batch run one at a time on their unpadded tokens, so left
or right padding (lm-eval-harness, batched generate) gives each row the logits it has alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .config import ModelConfig
from .configuration_pretrain import PretrainGPTConfig
from .gpt import GPT


class PretrainGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainGPTConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"gpt.lm_head.weight": "gpt.wte.weight"}

    def __init__(self, config: PretrainGPTConfig) -> None:
        super().__init__(config)
        self.gpt = GPT(ModelConfig.from_dict(config.model_config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        self.gpt._init_weights(module)  # only for weights a checkpoint lacks; ours holds every one

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.gpt.wte

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.gpt.lm_head

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None or bool(attention_mask.all()):
            return self.gpt(input_ids)
        logits = None
        for row, (ids, keep) in enumerate(zip(input_ids, attention_mask.bool())):
            out = self.gpt(ids[keep][None])[0]
            if logits is None:
                logits = out.new_zeros((*input_ids.shape, out.shape[-1]))
            logits[row, keep] = out
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        logits = self._logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        # The whole context every step (no cache), cropped to the trained block as our sampler does.
        block = self.gpt.config.block_size
        if attention_mask is not None:
            attention_mask = attention_mask[:, -block:]
        return {"input_ids": input_ids[:, -block:], "attention_mask": attention_mask}
