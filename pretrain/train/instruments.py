"""What a run measures besides its training loss, each a function of the `RunState`: validation loss (and at
every `--eval-seq-lens` length), attention diagnostics (`--analysis-every`), samples and downstream accuracy.

`session.py` reads and checks their inputs before the run directory is touched (`state.EvalInputs`); the
loop decides when they run. The computations live in pretrain/evals/; this file sends their figures to
train.jsonl, wandb, TensorBoard, the console and summary.md through `RunState.emit`. All run eagerly (one
compiled graph per training shape, speed.py) and inside `stopping.interruptible()`, so a stop ends them.
Length evals and diagnostics run on rank 0 alone (no collectives), so DDP runs are fine; FSDP shards the
weights across ranks, and `validate` refuses those flags with --fsdp.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pretrain import stopping
from pretrain.evals.diagnostics import diagnose
from pretrain.evals.downstream import score as downstream_score
from pretrain.evals.lengths import evaluate_lengths
from pretrain.evals.samples import SAMPLE_COLUMNS, samples_table_rows, write_samples
from pretrain.schedule import eval_seq_len_at
from pretrain.stats import standard_error
from pretrain.track.attn_maps import ATTN_MAP_DIR, save_attention_maps
from pretrain.track.console import format_eval_line
from pretrain.track.progress import tracked
from pretrain.train import distributed as dist_lib
from pretrain.train.speed import eagerly
from pretrain.train.state import RunState


@eagerly  # an eval batch under no_grad would be one more compiled graph per length (speed.py)
def evaluate(s: RunState) -> tuple[float, bool]:
    """Mean loss over the fixed validation windows, then the length evals; returns (loss, is_new_best)."""
    # The explicit --eval-seq-len, else the longest length trained so far (schedule.eval_seq_len_at).
    seq_len = eval_seq_len_at(s.sched.seq_points, s.prog.step, s.cfg.eval_seq_len)
    windows = s.evals.val_by_len[seq_len]
    s.model.eval()
    batch_losses = []
    with torch.no_grad(), s.autocast, stopping.interruptible():  # a stop ends the eval (and its compile)
        for batch in tracked(windows, "eval", "batches", show=s.dist.is_main):  # each rank: its share
            x, y = (t.chunk(s.dist.world_size)[s.dist.rank].to(s.device) for t in batch)
            batch_losses.append(s.wrapped(x, y).float())
    s.model.train()
    per_batch = dist_lib.mean_across_ranks(torch.stack(batch_losses), s.dist).tolist() if batch_losses else []
    loss = sum(per_batch) / max(len(per_batch), 1)
    best = s.prog.best_val is None or loss < s.prog.best_val
    if best:
        s.prog.best_val = loss
    s.emit("eval", loss=loss, ppl=math.exp(min(loss, 30)), tokens=s.prog.tokens, seq_len=seq_len,
           loss_se=standard_error(per_batch))  # over eval batches: compare's error bar
    if s.dist.is_main:
        s.track.console.print(format_eval_line(s.prog.step, {"seq_len": seq_len, "loss": loss,
                                                             "best": s.prog.best_val}))
    run_length_eval(s)
    return loss, best


@eagerly  # lengths beyond training: not the training step's graphs (speed.py)
def run_length_eval(s: RunState) -> None:
    """Validation loss at every --eval-seq-lens length; called with each regular eval."""
    ev = s.evals
    if not ev.lengths or not s.dist.is_main:
        return
    trained = eval_seq_len_at(s.sched.seq_points, s.prog.step)  # trained so far: not yet the schedule's longest
    with stopping.interruptible():
        fields = evaluate_lengths(s.model, ev.lengths, ev.eval_lengths, s.device, s.autocast, trained)
    s.info["eval_lengths"] = fields
    s.emit("eval_lengths", **fields)
    text = ", ".join(f"{n} {loss:.4f}" for n, loss in fields["loss"].items())
    s.track.console.print(f"eval step {s.prog.step} by length (trained so far {trained}; same "
                          f"{fields['targets']:,} targets at each): {text}")


@eagerly
def run_diagnostics(s: RunState) -> None:
    """Attention diagnostics on the fixed batch; the loop calls this every --analysis-every steps."""
    if s.evals.diagnostic_batch is None or not s.dist.is_main:
        return
    x, y = (t.to(s.device) for t in s.evals.diagnostic_batch)
    with stopping.interruptible():
        maps: dict = {}
        fields = diagnose(s.model, x, y, s.autocast, s.cfg.analysis_topk, s.cfg.analysis_local_window, s.evals.maps,
                          maps)
    if maps and s.track.log:
        png = save_attention_maps(s.run_dir, s.prog.step, maps, s.model.config.null_attn)
        fields["attn_map"] = f"{ATTN_MAP_DIR}/{png.name}"  # a string: in train.jsonl and summary.md, not wandb
    s.info["diagnostics"] = fields
    s.emit("diagnostics", **fields)


@eagerly  # the KV cache's position is a guard: one recompile per token
def sample(s: RunState) -> None:
    """Greedy and sampled continuations of the fixed prompts -> train.jsonl and a wandb Table."""
    cfg, step = s.cfg, s.prog.step
    rows = write_samples(s.model, s.evals.codec, s.evals.prompts, cfg.sample_tokens, cfg.sample_temperature,
                         cfg.seed, s.device)
    if not s.dist.is_main:
        return
    if s.track.log:
        s.track.log.event("sample", step=step, temperature=cfg.sample_temperature, samples=rows)
    if s.track.wb.enabled:
        # one table that grows round by round, on the tokens axis like every metric
        s.track.wb.add_table_rows("samples", SAMPLE_COLUMNS, samples_table_rows(step, rows), step=step,
                                  tokens=s.prog.tokens)
    line = f"sample step {step}: {rows[0]['prompt']!r} -> {rows[0]['greedy']!r}"
    s.track.console.print(line)
    s.note("sample step", f"{line} (all prompts: `sample` events in train.jsonl)")


@eagerly
def downstream(s: RunState) -> None:
    """Multiple-choice accuracy on --hellaswag -> train.jsonl, wandb, TensorBoard (downstream/*)."""
    with stopping.interruptible():
        result = downstream_score(s.model, s.evals.codec, s.evals.mc_items, s.device, s.autocast,
                                  show_progress=s.dist.is_main)
    task = "hellaswag" if s.cfg.hellaswag == "hf" else Path(str(s.cfg.hellaswag)).stem
    s.emit("downstream", task=task, **result)
    if s.dist.is_main:
        line = (f"downstream step {s.prog.step}: {task} acc {result['acc']:.3f} "
                f"acc_norm {result['acc_norm']:.3f} (n={result['n']}, chance {result['chance']:.3f})")
        s.track.console.print(line)
        s.note("downstream step", line)
