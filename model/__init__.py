"""The network: `ModelConfig` (shape, presets, parameter/FLOP/KV-cache arithmetic) and `GPT`.

Imports only torch and the standard library, so it can be used without the training package.
"""

from typing import TYPE_CHECKING, Any

from .config import PAPER_PRESETS, PRESETS, ModelConfig

if TYPE_CHECKING:
    from .gpt import GPT

__all__ = ["GPT", "ModelConfig", "PAPER_PRESETS", "PRESETS"]


def __getattr__(name: str) -> Any:
    # GPT (torch) loads on first use, so ModelConfig's arithmetic and the CLIs' --help stay torch-free.
    if name == "GPT":
        from .gpt import GPT

        return GPT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
