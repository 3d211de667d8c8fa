"""The trainer's speed decisions per device, each a small function so a CPU-only test can check the CUDA answer.

On CUDA every fast path is on: fused AdamW (fp32 weights), SDPA without an explicit mask (flash / cuDNN eligible;
null-attn uses FlexAttention inside compiled graphs, model/attention.py), per-block compile with static shapes,
pinned-memory prefetch, expandable allocator segments. CPU answers keep the CPU path as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.train.config import TrainConfig

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


@dataclass(frozen=True)
class SpeedChoices:
    fused_adamw: bool  # one kernel for the whole AdamW step (fp32 weights; bf16 weights use optim.AdamWSR)
    pin_memory: bool  # the prefetcher pins batches so the host-to-device copy overlaps compute
    sdpa_flash_eligible: bool  # no explicit attention mask: flash / cuDNN kernels with causal block skipping
    compile_scope: str  # "block": one graph per block shape, reused n_layer times; "off"
    compile_dynamic: bool  # False: one static graph per sequence length (a schedule has a handful)


def speed_choices(device: torch.device, cfg: TrainConfig, null_attn: bool) -> SpeedChoices:
    """What the trainer does on `device` under `cfg` (read by tests; the trainer's code follows the same rules)."""
    cuda = device.type == "cuda"
    return SpeedChoices(
        fused_adamw=cfg.optimizer == "adamw" and cfg.param_dtype != "bf16" and cfg.opt_fused
        and device.type in ("cuda", "cpu"),
        pin_memory=cuda,
        sdpa_flash_eligible=not null_attn,
        compile_scope="block" if cfg.compile else "off",
        compile_dynamic=False,
    )


def compile_blocks(model: nn.Module, mode: str = "default") -> None:
    """Compile each block in place (parameter names keep no `_orig_mod.`; one block shape compiles once).

    Static shapes: with dynamic shapes dynamo would make T symbolic after the second sequence length and every
    shape-dependent branch a guard or a graph break; a seq schedule has a few lengths, far below the
    recompile limit, and each static graph is the faster kernel.
    """
    for block in model.blocks:
        block.compile(mode=None if mode == "default" else mode, dynamic=False)


def cuda_alloc_conf(current: str | None) -> str:
    """PYTORCH_CUDA_ALLOC_CONF with expandable_segments on unless the user chose otherwise: three sequence
    lengths in one run otherwise fragment the caching allocator into blocks of the wrong sizes."""
    if current and "expandable_segments" in current:
        return current
    return f"{current},expandable_segments:True" if current else "expandable_segments:True"


def configure_cuda_allocator() -> None:
    """Apply cuda_alloc_conf to this process; must run before the first CUDA allocation (trainer start)."""
    os.environ[ALLOC_CONF] = cuda_alloc_conf(os.environ.get(ALLOC_CONF))
