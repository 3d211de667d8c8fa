"""Peak memory of what the trainer runs beside the training step: the evaluation, --eval-seq-lens, the attention
diagnostics (--analysis-every), text samples (--sample-every) and downstream scoring (--hellaswag).

Each is a pass: a frozen (hashable, so cached) description of one call at the shapes the trainer uses, taken
from the trainer's own rules (the eval batch, `diagnostic_rows`, `window_rows`), whose __call__ runs the trainer's
own code for it (`diagnostic_tensors`, `token_losses`, `GPT.generate`, `ending_loglik`) on the planner's fake
model: pretrain/plan/memory.py `estimate_pass_memory` tracks it like the training step. Samples and downstream
are taken at their worst case, a full block of context, whatever the prompts or items. `pass_peak_bytes` turns
an estimate into device bytes comparable with `fit.step_peak_bytes`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from model import GPT, ModelConfig
from pretrain.evals.diagnostics import diagnostic_rows, diagnostic_tensors
from pretrain.evals.downstream import MC_ROWS, ending_loglik
from pretrain.evals.lengths import parse_eval_lengths, token_losses, window_rows
from pretrain.plan.fit import ddp_buckets, device_kind
from pretrain.plan.memory import MemoryEstimate, allowance, comm_bytes, estimate_pass_memory
from pretrain.train.config import TrainConfig

Autocast = contextlib.AbstractContextManager


def _tokens(model: GPT, rows: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (rows, seq_len))


@dataclass(frozen=True)
class EvalPass:
    """instruments.evaluate: the loss of one batch of `rows` validation windows of `seq_len` tokens, under no_grad."""

    rows: int
    seq_len: int

    def __call__(self, model: GPT, autocast: Autocast) -> None:
        model.eval()
        with torch.no_grad(), autocast:
            model(_tokens(model, self.rows, self.seq_len), _tokens(model, self.rows, self.seq_len)).float()


@dataclass(frozen=True)
class LengthsPass:
    """evaluate_lengths: per-token losses of one batch at each (length, rows)."""

    batches: tuple[tuple[int, int], ...]

    def __call__(self, model: GPT, autocast: Autocast) -> None:
        model.eval()
        with torch.no_grad():
            for n, rows in self.batches:
                with autocast:
                    per_token = token_losses(model, _tokens(model, rows, n), _tokens(model, rows, n))
                per_token.sum()
                del per_token


@dataclass(frozen=True)
class DiagnosticsPass:
    """diagnose: the reference-attention forward and the gradient-norm forward + backward on the fixed batch."""

    rows: int
    seq_len: int

    def __call__(self, model: GPT, autocast: Autocast) -> None:
        x = _tokens(model, self.rows, self.seq_len)
        diagnostic_tensors(model, x, x, autocast)


@dataclass(frozen=True)
class SamplesPass:
    """write_samples at its worst: the prompt (or the cache rebuilt once the text outgrows it) fills the block."""

    temperature: float

    def __call__(self, model: GPT, autocast: Autocast) -> None:
        model.eval()
        model.generate(_tokens(model, 1, model.config.block_size), 1, temperature=self.temperature)


@dataclass(frozen=True)
class DownstreamPass:
    """ending_loglik at its worst: MC_ROWS endings, each row a full block of context + ending."""

    def __call__(self, model: GPT, autocast: Autocast) -> None:
        model.eval()
        block = model.config.block_size
        with autocast:
            ending_loglik(model, [0] * (block - 1), [[0]] * MC_ROWS, torch.device("cpu"))


Pass = EvalPass | LengthsPass | DiagnosticsPass | SamplesPass | DownstreamPass


def run_passes(mcfg: ModelConfig, cfg: TrainConfig, eval_len: int, instrument_len: int) -> dict[str, Pass]:
    """What `cfg`'s run computes beside its steps during a phase whose evaluations run at `eval_len`; the
    diagnostics and --eval-seq-lens use `instrument_len` (the trainer's: --eval-seq-len, else the longest trained).
    Per rank: the eval batch is split across ranks, cfg.batch_size rows each."""
    passes: dict[str, Pass] = {"eval": EvalPass(cfg.batch_size, eval_len)}
    if cfg.eval_seq_lens:
        tokens, lengths = cfg.batch_size * instrument_len, parse_eval_lengths(cfg.eval_seq_lens)
        rows = window_rows(tokens, max(lengths))  # the longest length's windows, cut into n-token pieces
        passes["eval_lengths"] = LengthsPass(tuple((n, rows * max(1, max(lengths) // n)) for n in lengths))
    if cfg.analysis_every:
        passes["diagnostics"] = DiagnosticsPass(diagnostic_rows(mcfg.n_head, instrument_len, cfg.batch_size),
                                                instrument_len)
    if cfg.sample_every:
        passes["samples"] = SamplesPass(cfg.sample_temperature)
    if cfg.hellaswag:
        passes["downstream"] = DownstreamPass()
    return passes


def pass_peak_bytes(mcfg: ModelConfig, cfg: TrainConfig, work: Pass, nproc: int) -> tuple[int, MemoryEstimate]:
    """Device bytes while `work` runs, with allowance; under DDP its gradient buckets stay allocated throughout
    (see fit.step_peak_bytes), and torchrun adds NCCL's buffers."""
    est = estimate_pass_memory(mcfg, cfg, work)
    kind = device_kind(cfg)
    tensors = est.tensor_peak_bytes + (est.grad_bytes if ddp_buckets(cfg, nproc) else 0)
    return tensors + allowance(tensors, kind) + comm_bytes(nproc, kind), est


_TURN_DOWN = {
    "eval": "a smaller --batch-size (the eval batch per process) or a shorter --eval-seq-len",
    "eval_lengths": "drop the longest of --eval-seq-lens",
    "diagnostics": "--analysis-every 0 (no attention diagnostics)",
    "samples": "--sample-every 0 (no text samples)",
    "downstream": "drop --hellaswag",
}


def turn_down(name: str) -> str:
    """The flag change that makes the pass `name` lighter, for a plan whose step fits but one of them does not."""
    return _TURN_DOWN[name]
