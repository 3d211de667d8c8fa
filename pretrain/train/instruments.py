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
from pretrain.cli import UserError
from pretrain.data.dataset import TokenDataset
from pretrain.data.loader import ValWindows
from pretrain.evals.diagnostics import diagnose, probe_rows
from pretrain.evals.lengths import evaluate_lengths, length_windows, parse_eval_lengths
from pretrain.track.attn_maps import ATTN_MAP_DIR, save_attention_maps
from pretrain.train.config import TrainConfig
from pretrain.train.speed import eagerly

if TYPE_CHECKING:
    from pretrain.train.session import Session


@dataclass
class Instruments:
    lengths: dict[int, ValWindows]  # empty: no multi-length eval
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None  # the fixed diagnostics batch (CPU), None: off
    trained_len: int  # longest training sequence length, the start of extrapolation
    maps: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> heads whose attention maps are saved


def _indices(text: str, count: int, flag: str, what: str) -> tuple[int, ...]:
    """"0,-1" -> (0, count - 1); UserError naming the flag for anything else."""
    try:
        raw = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated {what} numbers, e.g. {flag} 0,-1") from None
    bad = [i for i in raw if not -count <= i < count]
    if bad:
        raise UserError(f"{flag}: {what} {bad[0]} does not exist (the model has {count}: 0..{count - 1} or "
                        f"-1..-{count})")
    return tuple(sorted({i % count for i in raw}))


def attention_map_choice(cfg: TrainConfig, mcfg: ModelConfig) -> dict[int, tuple[int, ...]]:
    """--attn-map-layers x --attn-map-heads as layer -> heads (empty: no maps)."""
    if not cfg.attn_map_layers.strip():
        return {}
    if not cfg.analysis_every:
        raise UserError("--attn-map-layers saves maps at each analysis step: add --analysis-every N")
    layers = _indices(cfg.attn_map_layers, mcfg.n_layer, "--attn-map-layers", "layer")
    heads = _indices(cfg.attn_map_heads, mcfg.n_head, "--attn-map-heads", "head")
    if not heads:
        raise UserError("--attn-map-heads is empty: name the heads to save, e.g. --attn-map-heads 0")
    return {layer: heads for layer in layers}


def build_instruments(cfg: TrainConfig, mcfg: ModelConfig, ds: TokenDataset, eval_seq_len: int,
                      trained_len: int) -> Instruments:
    """Check and prepare what --eval-seq-lens and --analysis-every need (UserError for bad settings)."""
    windows = {}
    if cfg.eval_seq_lens:
        windows = length_windows(ds, parse_eval_lengths(cfg.eval_seq_lens), cfg.batch_size * eval_seq_len,
                                 cfg.eval_iters)
    batch = None
    if cfg.analysis_every:
        rows = probe_rows(mcfg.n_head, eval_seq_len, cfg.batch_size)
        batch = next(iter(ValWindows(ds, eval_seq_len, rows, 1)))
    return Instruments(windows, batch, trained_len, attention_map_choice(cfg, mcfg))


@eagerly  # lengths beyond training: not the training step's graphs (speed.py)
def run_length_eval(s: Session) -> None:
    """Validation loss at every --eval-seq-lens length; called with each regular eval."""
    inst = s.instruments
    if not inst.lengths or not s.dist.is_main:
        return
    with stopping.interruptible():
        fields = evaluate_lengths(s.model, inst.lengths, s.device, s.autocast, inst.trained_len)
    s.info["eval_lengths"] = fields
    s.emit("eval_lengths", **fields)
    text = ", ".join(f"{n} {loss:.4f}" for n, loss in fields["loss"].items())
    s.console.print(f"eval step {s.prog.step} by length (trained {inst.trained_len}): {text}")


@eagerly
def run_diagnostics(s: Session) -> None:
    """Attention diagnostics on the fixed batch; the loop calls this every --analysis-every steps."""
    inst = s.instruments
    if inst.probe_batch is None or not s.dist.is_main:
        return
    x, y = (t.to(s.device) for t in inst.probe_batch)
    with stopping.interruptible():
        maps: dict = {}
        fields = diagnose(s.model, x, y, s.autocast, s.cfg.analysis_topk, s.cfg.analysis_local_window, inst.maps,
                          maps)
    if maps and s.log:
        png = save_attention_maps(s.run_dir, s.prog.step, maps, s.model.config.null_attn)
        fields["attn_map"] = f"{ATTN_MAP_DIR}/{png.name}"  # a string: in train.jsonl and summary.md, not wandb
    s.info["diagnostics"] = fields
    s.emit("diagnostics", **fields)
