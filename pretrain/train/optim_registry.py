"""The --optimizer registry: names, summaries, default beta2 and peak LRs; the optimizers live in optim.py.

Torch-free, so the trainer's and launcher's parsers (--optimizer's choices, --help) load without torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def default_lr(size: str, optimizer: str) -> float:
    """The peak LR a run of this preset and optimizer gets when --lr is not given."""
    return PEAK_LR[(size, optimizer)][0]


def default_lr_source(size: str, optimizer: str) -> str:
    return PEAK_LR[(size, optimizer)][1]


@dataclass(frozen=True)
class OptimizerSpec:
    """One --optimizer: its builder (param groups, lr, betas, cfg, device, stochastic-rounding generator or None
    for fp32 weights), default beta2, and peak LR per model preset with where the figure comes from."""

    name: str
    summary: str  # one line for --help
    builder: str  # function in pretrain/train/optim.py
    beta2: float
    peak_lr: dict[str, tuple[float, str]]
    requires: str = ""  # an optional package the optimizer needs ("" = torch alone)

    def check_available(self) -> None:
        """UserError (one line, naming the install) when the package this optimizer needs is missing."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            from pretrain.errors import UserError

            raise UserError(f"--optimizer {self.name} needs {self.requires}, which is not installed: "
                            f"pip install {self.requires} (or choose --optimizer adamw or lion)")

    @property
    def build(self) -> Callable[..., torch.optim.Optimizer]:
        # Imported on use: --optimizer's choices (config.py, --help) must load without torch.
        return getattr(importlib.import_module("pretrain.train.optim"), self.builder)


# The peak LRs are cited in docs/tiers.md too; the trainer (run directly) and the launcher's plan both read this
# one table. Lion takes ~6x less than AdamW at every size: its sign update has a larger norm per element
# (Chen et al. 2023 advise 3-10x lower).
_LION_LR_SOURCE = "(Lion: 3-10x lower, Chen et al. 2023)"
OPTIMIZERS: dict[str, OptimizerSpec] = {o.name: o for o in (
    OptimizerSpec("adamw", "AdamW, 8 bytes of fp32 state per parameter", "_build_adamw", 0.95, {
        "tiny": (6e-4, "GPT-3 Small 125M, Brown et al. 2020 Table 2.1 (kept for the ~3M smoke model)"),
        "small": (6e-4, "GPT-3 Small 125M, Brown et al. 2020 Table 2.1; Pythia-160M 6e-4"),
        "1b": (3e-4, "Pythia-1B 3e-4 (Biderman et al. 2023); TinyLlama-1.1B and OLMo-1B use 4e-4 with "
                     "a 4-8x larger batch"),
    }),
    OptimizerSpec("lion", "Lion (sign update), 4 bytes of fp32 state per parameter", "_build_lion", 0.99, {
        "tiny": (1e-4, f"AdamW's 6e-4 / 6 {_LION_LR_SOURCE}"),
        "small": (1e-4, f"AdamW's 6e-4 / 6 {_LION_LR_SOURCE}"),
        "1b": (5e-5, f"AdamW's 3e-4 / 6 {_LION_LR_SOURCE}"),
    }),
    # Same update as AdamW, so the same LRs (Dettmers et al. 2022 keep AdamW's hyperparameters for 8-bit Adam).
    OptimizerSpec("adamw8bit", "AdamW with block-wise 8-bit moments (torchao), ~2 bytes of state per parameter",
                  "_build_adamw8bit", 0.95, {
                      "tiny": (6e-4, "AdamW's (8-bit state keeps AdamW's hyperparameters, Dettmers et al. 2022)"),
                      "small": (6e-4, "AdamW's (8-bit state keeps AdamW's hyperparameters, Dettmers et al. 2022)"),
                      "1b": (3e-4, "AdamW's (8-bit state keeps AdamW's hyperparameters, Dettmers et al. 2022)"),
                  }, requires="torchao"),
)}
# Views of the registry by (preset, optimizer) and by optimizer, as the planner and tests read them.
PEAK_LR: dict[tuple[str, str], tuple[float, str]] = {
    (size, o.name): v for o in OPTIMIZERS.values() for size, v in o.peak_lr.items()}
DEFAULT_BETA2 = {o.name: o.beta2 for o in OPTIMIZERS.values()}
