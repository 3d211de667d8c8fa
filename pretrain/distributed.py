"""Process topology: single process by default, torchrun ranks when WORLD_SIZE > 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def init_distributed() -> Dist:
    """Read torchrun's environment. Multi-process training is not wired yet: refuse it clearly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UserError("multi-process (torchrun) training is not supported yet; run a single process")
    return Dist()
