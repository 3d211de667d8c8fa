"""TensorBoard scalars under run_dir/tb, mirroring what goes to wandb."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pretrain.track.plots import _is_num


class TBWriter:
    """TensorBoard scalars under run_dir/tb, mirroring what goes to wandb. disabled -> no-ops.

    purge_step: on resume pass the resumed step + 1 so TensorBoard hides the events written after the
    checkpoint by the interrupted session (otherwise those steps would show twice).
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, purge_step: int | None = None) -> None:
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)
        except ImportError as e:  # torch.utils.tensorboard needs the tensorboard package
            print(f"warning: --tb needs the tensorboard package, which did not import ({e}); install it with "
                  "`pip install tensorboard` (this run goes on without TensorBoard files)", file=sys.stderr)
        except Exception as e:  # tensorboard missing or unwritable dir: tracking must not stop training
            print(f"warning: TensorBoard disabled ({type(e).__name__}: {e})", file=sys.stderr)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            if _is_num(value):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # few points per minute; flushing keeps a live TensorBoard current

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
