"""The research instruments a run may carry, wired to the session: validation loss at several lengths
(`--eval-seq-lens`, with every eval) and attention diagnostics (`--analysis-every N`).

`build_instruments` reads and checks everything they need before the run directory is touched, so a bad
length is one line and exit 2 with nothing on disk changed. The computations live in pretrain/evals/;
this file only decides when they run and sends their figures to train.jsonl, wandb, TensorBoard and
summary.md through `Session.emit`. Rank 0 computes them alone (no collectives), so DDP runs are fine;
FSDP shards the weights across ranks, and `validate` refuses these flags with --fsdp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from model import ModelConfig
from pretrain import stopping
from pretrain.data.dataset import TokenDataset
from pretrain.data.loader import ValWindows
from pretrain.evals.diagnostics import diagnose, probe_rows
from pretrain.evals.lengths import evaluate_lengths, length_windows, parse_eval_lengths
from pretrain.schedule import eval_seq_len_at
from pretrain.train.config import TrainConfig
from pretrain.train.speed import eagerly

if TYPE_CHECKING:
    from pretrain.train.session import Session


@dataclass
class Instruments:
    lengths: dict[int, ValWindows]  # {longest --eval-seq-lens length: its windows}, which every length scores
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None  # the fixed diagnostics batch (CPU), None: off
    trained_len: int  # longest length the schedule trains at (an eval reports the longest trained so far)
    eval_lengths: list[int] = field(default_factory=list)  # --eval-seq-lens, parsed


def build_instruments(cfg: TrainConfig, mcfg: ModelConfig, ds: TokenDataset, eval_seq_len: int,
                      trained_len: int) -> Instruments:
    """Check and prepare what --eval-seq-lens and --analysis-every need (UserError for bad settings)."""
    windows = {}
    lengths = parse_eval_lengths(cfg.eval_seq_lens) if cfg.eval_seq_lens else []
    if lengths:
        windows = length_windows(ds, lengths, cfg.batch_size * eval_seq_len, cfg.eval_iters)
    batch = None
    if cfg.analysis_every:
        rows = probe_rows(mcfg.n_head, eval_seq_len, cfg.batch_size)
        batch = next(iter(ValWindows(ds, eval_seq_len, rows, 1)))
    return Instruments(windows, batch, trained_len, lengths)


@eagerly  # lengths beyond training: not the training step's graphs (speed.py)
def run_length_eval(s: Session) -> None:
    """Validation loss at every --eval-seq-lens length; called with each regular eval."""
    inst = s.instruments
    if not inst.lengths or not s.dist.is_main:
        return
    trained = eval_seq_len_at(s.seq_points, s.prog.step)  # trained so far: not yet the schedule's longest
    with stopping.interruptible():
        fields = evaluate_lengths(s.model, inst.lengths, inst.eval_lengths, s.device, s.autocast, trained)
    s.info["eval_lengths"] = fields
    s.emit("eval_lengths", **fields)
    text = ", ".join(f"{n} {loss:.4f}" for n, loss in fields["loss"].items())
    s.console.print(f"eval step {s.prog.step} by length (trained so far {trained}; same {fields['targets']:,} "
                    f"targets at each): {text}")


@eagerly
def run_diagnostics(s: Session) -> None:
    """Attention diagnostics on the fixed batch; the loop calls this every --analysis-every steps."""
    inst = s.instruments
    if inst.probe_batch is None or not s.dist.is_main:
        return
    x, y = (t.to(s.device) for t in inst.probe_batch)
    with stopping.interruptible():
        fields = diagnose(s.model, x, y, s.autocast)
    s.info["diagnostics"] = fields
    s.emit("diagnostics", **fields)
