"""Process topology and the few places training differs under torchrun (DDP / FSDP2).

Single-process runs take the trivial path of every function here; multi-process support is built on
PyTorch's own DDP and FSDP2 (`fully_shard`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pretrain.cli import UserError


@dataclass(frozen=True)
class Dist:
    """Who this process is. Single-process runs are rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> Dist:
    """Read torchrun's environment. Multi-process training is not wired yet: refuse it clearly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UserError("multi-process (torchrun) training is not supported yet; run a single process")
    return Dist()


def wrap_model(model: nn.Module, fsdp: bool, cpu_offload: bool, dist: Dist, device: torch.device) -> nn.Module:
    """The module to call for forward/backward (DDP or FSDP2 wrapped under torchrun)."""
    return model


@contextlib.contextmanager
def maybe_no_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    yield


def any_rank(flag: bool, dist: Dist) -> bool:
    """True when `flag` is set on any rank (a stop signal reaching one rank stops all)."""
    return flag


def mean_across_ranks(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    return value


def model_state(model: nn.Module, dist: Dist) -> dict[str, Any]:
    """Full (unsharded) model weights; a collective under FSDP, so every rank must call it."""
    return model.state_dict()


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    return optimizer.state_dict()


def load_model_state(model: nn.Module, state: dict[str, Any], dist: Dist) -> None:
    model.load_state_dict(state)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         dist: Dist) -> None:
    optimizer.load_state_dict(state)


def cleanup(dist: Dist) -> None:
    """Tear down the process group cleanly (gloo aborts at exit otherwise)."""
