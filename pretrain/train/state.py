"""What one training run holds while it runs: `RunState` and the small records it is made of.

Data, plus how it reports (`emit`, `note`) and lets go (`close`). `session.py` builds a RunState (fresh or
from a checkpoint) and saves it; `instruments.py` evaluates it; `loop.py` steps it and calls the other two.
session.py and instruments.py never import each other: both import this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from pretrain.data.loader import Prefetcher, ValWindows
from pretrain.track.console import Console
from pretrain.track.runlog import RunLog, to_metrics
from pretrain.track.tensorboard import TBWriter
from pretrain.track.wandb_run import WandbRun
from pretrain.train import device as dev
from pretrain.train import distributed as dist_lib
from pretrain.train.checkpoint import CheckpointManager
from pretrain.train.config import TrainConfig
from pretrain.train.mirror import Mirror
from pretrain.train.run_dir import RunDirLock

# wandb / TensorBoard namespace of each event type (train.jsonl keeps the type itself).
METRIC_PREFIX = {"train": "train", "eval": "val", "eval_lengths": "val_len", "diagnostics": "diag"}


@dataclass
class Progress:
    """Counters that checkpoints carry and the loop advances."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float | None = None
    skipped_steps: int = 0
    train_window: dict[str, Any] | None = None  # the open train-loss window at the save (meter.Meter)


@dataclass
class Schedules:
    """What varies with the step besides the weights: sequence length, micro-batch split, the LR's horizon."""

    seq_points: list[tuple[int, int]]  # --seq-schedule, parsed
    micro_points: list[tuple[int, int]]  # --micro-batch-schedule, parsed
    lr_horizon: int  # steps the LR schedule decays over (kept across extensions, see schedule.lr_horizon_on_resume)


@dataclass
class EvalInputs:
    """Everything the evals and instruments read, read and checked before the run dir is touched."""

    val_by_len: dict[int, ValWindows]  # fixed validation windows per eval length
    lengths: dict[int, ValWindows]  # {longest --eval-seq-lens length: its windows}, which every length scores
    diagnostic_batch: tuple[torch.Tensor, torch.Tensor] | None  # the fixed diagnostics batch (CPU), None: off
    trained_len: int  # longest length the schedule trains at (an eval reports the longest trained so far)
    codec: Any = None  # token ids <-> text, when samples or downstream evals are on
    prompts: list[str] = field(default_factory=list)
    mc_items: list[Any] = field(default_factory=list)
    eval_lengths: list[int] = field(default_factory=list)  # --eval-seq-lens, parsed
    maps: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> heads whose attention maps are saved


@dataclass
class Trackers:
    """Where a run's events go: train.jsonl, wandb, TensorBoard and the console (rank 0 writes)."""

    log: RunLog | None
    wb: WandbRun
    tb: TBWriter
    console: Console

    def close(self) -> None:
        if self.log:
            self.log.close()
        self.wb.finish()
        self.tb.close()
        self.console.close()


@dataclass
class RunState:
    """One run: its settings, the model and optimizer, data, schedules, eval inputs, trackers and counters."""

    cfg: TrainConfig
    mcfg: ModelConfig
    dist: dist_lib.Dist
    device: torch.device
    run_dir: Path
    model: GPT
    wrapped: torch.nn.Module  # what forward/backward go through (DDP / FSDP2 under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Prefetcher
    sched: Schedules
    evals: EvalInputs
    ckpt: CheckpointManager
    track: Trackers
    info: dict[str, Any]  # what summary.md reports: the command, configs, host, results
    resumed: bool
    prog: Progress = field(default_factory=Progress)
    fingerprint: str = ""  # the dataset's, checked on resume
    lock: RunDirLock | None = None
    mirror: Mirror | None = None  # --mirror: checkpoints copied off the machine (mirror.py)
    meter: Any = None  # the loop's meter.Meter while it runs: checkpoints carry its open window

    @property
    def autocast(self) -> Any:
        return dev.autocast(self.device, self.cfg.amp, dev.amp_dtype(self.cfg.amp_dtype))

    @property
    def fp16(self) -> bool:
        return self.cfg.amp and self.cfg.amp_dtype == "fp16"

    def emit(self, kind: str, **fields: Any) -> None:
        """One event (train, eval, checkpoint) to train.jsonl, wandb and TensorBoard (rank 0 only)."""
        if self.track.log:
            self.track.log.event(kind, step=self.prog.step, **fields)
        numeric = {k: int(v) if isinstance(v, bool) else v for k, v in fields.items()}
        metrics = to_metrics(METRIC_PREFIX.get(kind, kind), numeric)
        self.track.wb.log(metrics | {"tokens": self.prog.tokens}, step=self.prog.step)  # tokens: wandb's x-axis
        self.track.tb.log(metrics, step=self.prog.step)

    def note(self, prefix: str, text: str) -> None:
        """Keep the latest line of one instrument among summary.md's notes."""
        notes = [n for n in self.info.get("notes", []) if not n.startswith(prefix)]
        self.info["notes"] = [*notes, text]

    def close(self) -> None:
        self.ckpt.wait()
        self.track.close()
        if self.mirror:
            self.mirror.close()  # train.jsonl and summary.md as they end
        self.loader.close()
        if self.lock:
            self.lock.release()
        # Release the wrapped model and optimizer before distributed.cleanup() destroys their process group.
        self.wrapped = self.model = self.optimizer = None  # type: ignore[assignment]
