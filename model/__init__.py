"""The network: `ModelConfig` (shape, presets, parameter/FLOP/KV-cache arithmetic) and `GPT`.

Imports only torch and the standard library, so it can be used without the training package.
"""

from .config import PAPER_PRESETS, PRESETS, ModelConfig
from .gpt import GPT

__all__ = ["GPT", "ModelConfig", "PAPER_PRESETS", "PRESETS"]
