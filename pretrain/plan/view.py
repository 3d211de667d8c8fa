"""How a launch plan reads in the terminal: rich tables on a TTY, plain aligned text otherwise (logs, pipes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from pretrain.plan.plan import ALWAYS_SHOWN, CPU_NOT_TIMED, Plan, recompute_factor
from pretrain.plan.resolve import MFU_SOURCE, source_of
from pretrain.plan.tiers import cards_text
from pretrain.train.config import format_command
from pretrain.train.mirror_store import mirror_url
from pretrain.units import fmt_bytes, fmt_count, fmt_duration


class _Out:
    """Lines and tables to a rich console or a plain stream."""

    def __init__(self, file: TextIO, use_rich: bool) -> None:
        self.file = file
        self.rich = None
        if use_rich:
            from rich.console import Console

            self.rich = Console(file=file, highlight=False)

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.rich:
            # soft_wrap: the terminal wraps long lines; rich must not insert newlines (the command is copied)
            self.rich.print(text, style=style, markup=False, soft_wrap=True)
        else:
            print(text, file=self.file)

    def table(self, title: str, headers: Sequence[str], rows: list[Sequence[Any]]) -> None:
        cells = [[str(c) for c in r] for r in rows]
        if self.rich:
            from rich.table import Table

            t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
            for h in headers:
                t.add_column(h, overflow="fold")
            for r in cells:
                t.add_row(*r)
            self.rich.print(t)
            return
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        self.line(title)
        for r in [list(headers), *cells]:
            self.line("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _probe_table(out: _Out, plan: Plan) -> None:
    """Measured next to estimated, per phase and per micro-batch the probe tried."""
    est = {p.seq_len: p for p in plan.phases}
    rows = []
    for pr in plan.probes:
        for m in pr.tried:
            planned = est.get(pr.seq_len)
            same = planned is not None and planned.micro_batch == m.micro_batch
            rows.append([pr.seq_len, m.micro_batch,
                         fmt_bytes(planned.peaks.get("training step", planned.peak_memory_bytes)) if same else "-",
                         m.error or fmt_bytes(m.device_bytes or 0),
                         fmt_count(planned.flops_tokens_per_second) if same else "-",
                         fmt_count(m.tok_s) if m.tok_s else "-",
                         "picked" if m.micro_batch == pr.picked_micro_batch else ""])
    out.table(f"probe: real steps on {plan.cfg.device} (memory: {plan.probes[0].memory_how} + allowance)",
              ["seq", "micro", "est. peak", "measured peak", "est. tok/s (MFU)", "measured tok/s", ""], rows)


def render_plan(plan: Plan, running: bool = False, file: TextIO | None = None) -> None:
    """Print the plan: summary, phases with memory and time, settings with sources, warnings, the command."""
    file = file or sys.stdout
    out = _Out(file, file.isatty() and os.environ.get("TERM") != "dumb")
    cfg, m, res = plan.cfg, plan.resolved.mcfg, plan.resolved
    src = res.sources
    head = "Plan (running it now)" if running else "Plan: dry run, nothing written; add --run to train"
    out.line(head, style="bold")
    out.line(f"  tier      {plan.tier.name} ({plan.tier_how}); device {cfg.device}; memory "
             f"{fmt_bytes(plan.memory_capacity_bytes)} ({plan.memory_capacity_how})")
    out.line(f"  cards     {cards_text(plan.tier.name)}")
    run = plan.run
    out.line(f"  run       {run['dir']} ({run['action']}{': ' + run['note'] if run['note'] else ''}); "
             f"seed {cfg.seed}")
    if plan.data:
        d = plan.data
        out.line(f"  data      {d['path']}: {fmt_count(d['train_tokens'])} train tokens, {d['tokenizer']} vocab "
                 f"{d['vocab_size']}, {d['passes']:.2f} passes planned")
    else:
        out.line("  data      none (see warnings)")
    hd_qk, hd_v, _ = m.head_dims
    dims = f"heads {m.n_head} q / {m.n_kv_head} kv, head dim {hd_qk} qk / {hd_v} v"
    dims += "".join(f", {name} {getattr(m, name)}" for name, _ in m.variant.widths if name != "d_model")
    extras = [o for o, on in (("null attn", m.null_attn), ("tied q/k", m.tie_qk)) if on]
    out.line(f"  model     {cfg.size} {m.attn}{' + ' + ', '.join(extras) if extras else ''}: "
             f"{fmt_count(m.num_params())} params ({fmt_count(m.num_params(non_embedding=True))} non-embedding), "
             f"d_model {m.d_model}, {m.n_layer} layers, {dims}")
    last = plan.phases[-1]
    out.line(f"            KV cache {m.kv_cache_bytes_per_token(2):,} bytes/token (bf16); "
             f"{m.flops_per_token(last.seq_len) / 1e9:.2f} GFLOP/token at seq {last.seq_len} (model FLOPs, "
             f"PaLM convention; {m.flops_per_token(last.seq_len, causal=True) / 1e9:.2f} counting causal attention)")
    tpp = plan.planned_tokens / m.num_params()
    out.line(f"  budget    {plan.steps:,} steps ({src['steps']}); {fmt_count(plan.planned_tokens)} tokens "
             f"({plan.planned_tokens:,}); {tpp:.1f} tokens/param; {last.tokens_per_step:,} tokens/step at the end")
    out.line()
    procs = f" x {plan.nproc} proc" if plan.nproc > 1 else ""
    rows = [[f"{p.start_step}-{p.end_step}", p.seq_len, f"{p.micro_batch} x {p.grad_accum}{procs}",
             f"{p.tokens_per_step:,}", fmt_count(p.tokens), fmt_bytes(p.peak_memory_bytes), p.verdict,
             fmt_count(p.tokens_per_second), fmt_duration(p.seconds)] for p in plan.phases]
    out.table("phases", ["steps", "seq", "micro x accum", "tokens/step", "tokens", "peak mem", "verdict",
                         "tok/s (est)", "time (est)"], rows)
    worst = max(plan.phases, key=lambda p: p.peak_memory_bytes)
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(worst.breakdown.items(), key=lambda kv: -kv[1]))
    extra = "CUDA context and allocator" if cfg.device != "cpu" else "the Python process"
    what = "one training step (fake-tensor run of the real step)" if worst.peak_of == "training step" else \
        f"the {worst.peak_of} pass (fake-tensor run of the trainer's code; above its training step)"
    out.line(f"  memory: estimated peak of {what}, seq {worst.seq_len}: "
             f"tensors {fmt_bytes(worst.tensor_peak_bytes)} [{parts}] + allowance for {extra} "
             f"= {fmt_bytes(worst.peak_memory_bytes)}")
    out.line("          each, at that phase: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in worst.peaks.items()))
    if plan.suggestion:
        out.line(f"  to fit: {plan.suggestion}", style="bold yellow")
    ckpt = (f" x {recompute_factor(cfg):g} ({cfg.checkpoint_policy} checkpointing recomputes "
            f"{'the forward' if cfg.checkpoint_policy == 'full' else 'only elementwise ops'})"
            if cfg.grad_checkpoint else "")
    total = sum(p.seconds for p in plan.phases)
    flops = plan.peak_flops
    rate = f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"
    if plan.rate_measured:
        out.line(f"  time: ESTIMATE {fmt_duration(total)} = tokens / tok/s {plan.rate_how} (training steps only: "
                 "evals, checkpoints and start-up come on top)")
    else:
        out.line(f"  time: ESTIMATE {fmt_duration(total)} = tokens x FLOPs/token / ({rate} "
                 f"[{plan.peak_flops_how}] x MFU {plan.mfu / recompute_factor(cfg):g}"
                 f" [{MFU_SOURCE}]{ckpt}{' x ' + str(plan.nproc) + ' procs' if plan.nproc > 1 else ''})"
                 f"{'; ' + CPU_NOT_TIMED if cfg.device == 'cpu' else ''}")
    if plan.eval_lengths_seconds:
        with_lengths = fmt_duration(total + plan.eval_lengths_seconds)
        out.line(f"  + --eval-seq-lens: ESTIMATE {fmt_duration(plan.eval_lengths_seconds)} on top (every length "
                 f"scores the longest windows at each eval, forward only, rank 0): {with_lengths} in all")
    if plan.probes:
        _probe_table(out, plan)
    out.line(f"  checkpoints: {fmt_bytes(plan.checkpoint_bytes)} each (weights + optimizer state); up to "
             f"{fmt_bytes(plan.disk_bytes)} of disk (keep_last {cfg.keep_last} + best + one write in flight); "
             f"{fmt_bytes(plan.host_ram_bytes)} of host RAM while one is saved (less: saves turn synchronous)")
    if cfg.mirror:
        out.line(f"  mirror: every checkpoint, train.jsonl and summary.md copied in the background to "
                 f"{mirror_url(cfg.mirror, plan.run['dir'])} (its newest {max(cfg.keep_last, 1)} kept); a run dir "
                 "without a checkpoint resumes from it; a failing mirror is warned, retried and reported in "
                 "summary.md, never stops training")
    out.line()
    shown = [k for k in cfg.to_dict() if src.get(k, "default") != "default" or k in ALWAYS_SHOWN]
    values = cfg.to_dict() | {"vocab_size": m.vocab_size, "data": cfg.data or "(none)", "n_kv_head": m.n_kv_head}
    out.table("settings", ["setting", "value", "source"], [[k, values[k], source_of(src, k)] for k in shown])
    if plan.warnings:
        out.line()
        for w in plan.warnings:
            out.line(f"warning: {w}", style="yellow")
    out.line()
    out.line("command:", style="bold")
    out.line(format_command(plan.command))
