"""`make gpu-check`: does this machine run the tier's plan as estimated? One command, one table.

    python -m pretrain.gpu_check                         # this card's tier, every attention variant
    python -m pretrain.gpu_check --variants baseline,gqa --steps-per-phase 2
    python -m pretrain.gpu_check --device cpu            # the same check at tiny size on CPU (what CI runs)

For each variant the launcher plans the tier's run (pretrain/plan/launch.py, the same code `run_1b_launch.py`
runs); its trainer command is then shortened to a few steps of each phase of the plan (same sequence lengths,
micro-batches and checkpointing; accumulation capped so a step takes seconds) with torch.compile and every
instrument on (evals, length evals, diagnostics, samples, downstream on a small built-in item set, TensorBoard),
and run three times into a temporary directory: once uninterrupted (the reference and the measurements), once
stopped by SIGTERM right after a step that evaluates (stop latency: signal to process exit), and once more with
the same command (the resume), whose final state is compared with the reference. The table puts measured tok/s,
MFU, peak memory next to the plan's estimates, with the plan's pinned host RAM, recompiles and eager fallbacks
(the trainer's `end` event), the stop latency and whether resume was exact. Exit 0 when every check passes,
1 when one fails (the lines under the table say which), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import ATTN_VARIANTS
from pretrain.errors import EXIT_STOPPED, ArgumentParser, UserError
from pretrain.gpu_check_runs import compare_resume, compile_counts, measured_phases, overall_rate, run, trainer_argv

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
STOP_LIMIT_S = 30.0  # a preemption's grace period before SIGKILL: Kubernetes' default, GCP spot's notice
MEM_MARGIN = 0.10  # measured CUDA peak may exceed the plan's estimate by this fraction before the check fails
# Multiple-choice items for the downstream instrument (its code path, not a benchmark: a handful of items).
MC_ITEMS = [{"ctx": c, "endings": e, "label": 0} for c, e in (
    ("In the beginning God created", [" the heaven and the earth.", " a small blue car."]),
    ("And the earth was without form,", [" and void.", " and purple.", " and loud."]),
    ("A hacker is a person who enjoys", [" exploring the details of systems.", " rain."]),
    ("The Lord is my shepherd;", [" I shall not want.", " the printer is out of paper."]))]


@dataclass
class Row:
    """What one variant measured next to what its plan estimated; `failures` lists the checks it failed."""

    variant: str
    cells: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def set_flag(argv: list[str], name: str, value: Any) -> list[str]:
    """`argv` with trainer flag --name set to `value` (True/False: --name/--no-name), replacing any given."""
    flag, neg = "--" + name.replace("_", "-"), "--no-" + name.replace("_", "-")
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1 if i + 1 >= len(argv) or argv[i + 1].startswith("--") else 2
            continue
        if argv[i] == neg:
            i += 1
            continue
        out.append(argv[i])
        i += 1
    if value is None:
        return out
    if isinstance(value, bool):
        return [*out, flag if value else neg]
    return [*out, flag, str(value)]


def find_keys(obj: Any, needle: str, path: str = "") -> dict[str, Any]:
    """Every leaf whose key contains `needle` in nested dicts/lists (path -> value): for a plan field whose name
    may change (the pinned host RAM figure)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    found: dict[str, Any] = {}
    for k, v in items:
        if needle in str(k) and not isinstance(v, dict | list):
            found[f"{path}{k}"] = v
        found |= find_keys(v, needle, f"{path}{k}.")
    return found


def check_command(plan: dict[str, Any], steps_per_phase: int, max_accum: int, out_dir: Path, mc_path: Path,
                  compile: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """The plan's trainer command cut to `steps_per_phase` steps of each phase with every instrument on.

    Each phase keeps the plan's sequence length and micro-batch; the sequences per step become the largest
    micro-batch x `max_accum` (at most the plan's), so the phase with the largest micro-batch accumulates
    `max_accum` micro-batches and the others proportionally more. Returns (argv, the check's phases).
    """
    phases, n = plan["phases"], steps_per_phase
    micros = [p["micro_batch"] for p in phases]
    per_proc_plan = phases[-1]["micro_batch"] * phases[-1]["grad_accum"]
    per_proc = min(per_proc_plan, max(micros) * max_accum)
    if any(per_proc % m for m in micros):
        per_proc = per_proc_plan  # micro-batches that do not divide a smaller step keep the plan's
    cut = [{"seq_len": p["seq_len"], "micro_batch": p["micro_batch"], "grad_accum": per_proc // p["micro_batch"],
            "start_step": i * n, "end_step": (i + 1) * n} for i, p in enumerate(phases)]
    steps = n * len(cut)
    argv = list(plan["command"][2:])  # drop "python train_v29.py"
    lens = sorted({p["seq_len"] for p in cut})
    for name, value in (
            ("steps", steps), ("warmup_steps", steps),  # LR still rising at the end: no divergence in a check
            ("seq_schedule", ",".join(f"{p['seq_len']}@{p['start_step']}" for p in cut)),
            ("batch_size", cut[-1]["micro_batch"]), ("grad_accum", cut[-1]["grad_accum"]),
            ("micro_batch_schedule", ",".join(f"{p['micro_batch']}@{p['start_step']}" for p in cut)
             if len(set(micros)) > 1 else None),
            ("compile", compile), ("out_dir", out_dir), ("resume", "auto"), ("log_every", 1), ("live", "off"),
            ("eval_every", n), ("eval_iters", 2), ("eval_seq_lens", ",".join(map(str, lens))),
            ("analysis_every", n), ("sample_every", n), ("sample_tokens", 16),
            ("hellaswag", mc_path), ("downstream_every", n), ("downstream_items", len(MC_ITEMS)),
            ("tb", True), ("wandb", False), ("save_every", n), ("save_minutes", 0)):
        argv = set_flag(argv, name, value)
    return argv, cut


def check_variant(variant: str, launcher_args: list[str], work: Path, ns: Any) -> Row:
    """Plan, run uninterrupted, run stopped + resumed, and compare: one row of the table."""
    from pretrain.plan.launch import plan_from_argv

    row = Row(variant)
    _, plan_obj = plan_from_argv([*launcher_args, "--variant", variant, "--run-root", str(work / "plan")])
    plan = plan_obj.to_json()
    mc = work / "mc.jsonl"
    mc.write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    shutil.rmtree(work / variant, ignore_errors=True)  # a reused --work-dir: fresh runs, not resumed ones
    ref, stopped = work / variant / "uninterrupted", work / variant / "stopped"
    argv_ref, cut = check_command(plan, ns.steps_per_phase, ns.max_accum, ref, mc, ns.compile)
    log = work / f"{variant}.log"
    row.figures["command"] = argv_ref
    print(f"  {variant}: uninterrupted run, {len(cut)} phases x {ns.steps_per_phase} steps (log: {log})",
          file=sys.stderr, flush=True)
    code, _ = run(trainer_argv(argv_ref), ref, log)
    if code != 0:
        row.failures.append(f"the uninterrupted run exited with {code} (log: {log})")
        return row  # out of memory, a crash: nothing to measure, and the stop and resume would fail the same way
    stop_and_resume(row, set_flag(argv_ref, "out_dir", stopped), stopped, log, ns.steps_per_phase, ns)
    row.cells["resume"], ok = compare_resume(ref, stopped, bitwise=plan["settings"]["device"]["value"] == "cpu")
    if not ok:
        row.failures.append(f"resume not exact: {row.cells['resume']}")
    measure(row, plan, cut, ref, stopped, ns)
    return row


def stop_and_resume(row: Row, argv: list[str], run_dir: Path, log: Path, stop_at: int, ns: Any) -> None:
    """The same run stopped by SIGTERM once step `stop_at` is logged (the first phase's last step: evals,
    diagnostics, samples and downstream run then), then the same command again to resume and finish."""
    print(f"  {row.variant}: the same run, SIGTERM once step {stop_at} is logged; then resumed", file=sys.stderr,
          flush=True)
    code, latency = run(trainer_argv(argv), run_dir, log, stop_after_step=stop_at)
    if latency is None:
        row.cells["stop"] = f"no stop (exit {code})"
        row.failures.append(f"the run to stop ended (exit {code}) before logging step {stop_at}")
    else:
        row.cells["stop"] = f"{latency:.1f} s (exit {code})"
        if code != EXIT_STOPPED or not (run_dir / "last.pt").is_file():
            row.failures.append(f"SIGTERM did not end in a saved stop (exit {code}; log: {log})")
        if latency > ns.max_stop_seconds:
            row.failures.append(f"stop took {latency:.1f} s, over {ns.max_stop_seconds:g} s")
    code, _ = run(trainer_argv(argv), run_dir, log)
    if code != 0:
        row.failures.append(f"the resumed run exited with {code} (log: {log})")


def measure(row: Row, plan: dict[str, Any], cut: list[dict[str, Any]], ref: Path, stopped: Path, ns: Any) -> None:
    """The row's measured-vs-plan cells (tok/s, MFU, peak memory, host RAM, recompiles) and their checks."""
    from pretrain.units import fmt_bytes, fmt_count

    phases = measured_phases(ref, cut, plan)
    row.figures["phases"] = phases
    rate, rate_plan = overall_rate(phases, "tok_s"), overall_rate(phases, "tok_s_plan")
    row.cells["tok/s"] = (f"{fmt_count(rate)} / {fmt_count(rate_plan)} ({rate / rate_plan:.2f}x)"
                          if rate and rate_plan else "n/a")
    mfu, est = phases[-1]["mfu"], plan["estimate"]["effective_mfu"]  # the longest phase: most of the tokens
    row.cells["MFU"] = f"{mfu:.0%} / {est:.0%}" if mfu is not None else f"n/a / {est:.0%}"
    # The device's peak counter only grows, so the run's peak is held against the plan's worst phase.
    measured = [p["mem_bytes"] for p in phases if p["mem_bytes"]]
    if measured:
        peak, planned, kind = max(measured), max(p["mem_plan"] for p in phases), phases[-1]["mem_kind"]
        ratio = peak / planned
        row.cells["peak mem"] = f"{fmt_bytes(peak)} / {fmt_bytes(planned)} ({ratio:.2f}x{', rss' * (kind == 'rss')})"
        if kind == "cuda" and ratio > 1 + ns.mem_margin:
            row.failures.append(f"peak {fmt_bytes(peak)} allocated is over the plan's {fmt_bytes(planned)} (tensors) "
                                f"by more than {ns.mem_margin:.0%}")
    host = {k: v for k, v in find_keys(plan, "host_ram").items() if isinstance(v, int | float)}
    row.cells["host RAM pinned"] = fmt_bytes(max(host.values())) if host else "n/a"
    counts = row.figures["compile"] = compile_counts(ref, stopped)
    if counts is None:
        row.cells["recompiles"] = "n/a" if ns.compile else "off"
    else:
        # One static graph per training shape is the design (speed.build_model): a process compiles each shape
        # it trains once, so only recompiles beyond those, or any eager fallback, are a fault.
        shapes = len({(c["micro_batch"], c["seq_len"]) for c in cut})
        graphs = GRAPHS_PER_SHAPE * shapes
        extra = max(counts["recompiles"] - (graphs - GRAPHS_PER_SHAPE), 0)
        row.cells["recompiles"] = f"{extra} (eager {counts['eager_fallbacks']}; {counts['frames']} graphs/{graphs})"
        if extra or counts["eager_fallbacks"] or counts["frames"] > graphs:
            row.failures.append(f"{extra} recompiles beyond one graph per training shape, "
                                f"{counts['eager_fallbacks']} eager fallbacks (TORCH_LOGS=recompiles with --work-dir "
                                "DIR: DIR/<variant>.log says why)")


# Frames compiled per training shape: Block.forward and the loss chunk (model/loss_chunk.py); two shapes with the same
# rows per micro-batch share the loss chunk's graph, so fewer is fine.
GRAPHS_PER_SHAPE = 2

COLUMNS = ["variant", "tok/s (plan)", "MFU (plan)", "peak mem (plan)", "host RAM pinned", "recompiles",
           "stop latency", "resume", "result"]


def print_table(rows: list[Row], title: str) -> None:
    from pretrain.plan.view import _Out

    out = _Out(sys.stdout, sys.stdout.isatty() and os.environ.get("TERM") != "dumb")
    table = [[r.variant, r.cells.get("tok/s", "n/a"), r.cells.get("MFU", "n/a"), r.cells.get("peak mem", "n/a"),
              r.cells.get("host RAM pinned", "n/a"), r.cells.get("recompiles", "n/a"), r.cells.get("stop", "n/a"),
              r.cells.get("resume", "n/a"), "FAIL" if r.failures else "ok"] for r in rows]
    out.table(title, COLUMNS, table)
    for r in rows:
        for f in r.failures:
            out.line(f"FAIL {r.variant}: {f}")


def build_parser() -> ArgumentParser:
    from pretrain.plan.resolve import VARIANTS
    from pretrain.plan.tiers import VRAM_CHOICES

    p = ArgumentParser(prog="python -m pretrain.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--vram", default="auto", help=f"tier to check: {' | '.join(VRAM_CHOICES)} (auto: this GPU's)")
    p.add_argument("--variants", default=",".join(ATTN_VARIANTS),
                   help=f"comma-separated launcher variants (default: every attention variant; also "
                        f"{', '.join(v for v in VARIANTS if v not in ATTN_VARIANTS)} and paper_*)")
    p.add_argument("--steps-per-phase", type=int, default=3, help="optimizer steps of each phase of the plan")
    p.add_argument("--max-accum", type=int, default=2, help="micro-batches per step at the largest micro-batch")
    p.add_argument("--size", default=None, choices=["tiny", "small", "1b"],
                   help="model size (default: the tier's on CUDA, tiny on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda when present")
    p.add_argument("--data", default=str(SAMPLE), help="token dataset (default: the bundled data/sample)")
    p.add_argument("--val-frac", type=float, default=None,
                   help="validation fraction for a dataset without a validation split (a legacy .npy)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the trainer's blocks, as the GPU tiers do (default: on)")
    p.add_argument("--max-stop-seconds", type=float, default=STOP_LIMIT_S,
                   help=f"longest acceptable SIGTERM-to-exit time (default {STOP_LIMIT_S:g}: a common grace period)")
    p.add_argument("--mem-margin", type=float, default=MEM_MARGIN, help="allowed CUDA peak over the plan (fraction)")
    p.add_argument("--work-dir", default=None, help="keep the runs and logs here (default: a temp dir, removed)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every figure as JSON (to report back)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from pretrain.plan.resolve import VARIANTS
    from pretrain.plan.tiers import detect_gpu

    variants = [v.strip() for v in ns.variants.split(",") if v.strip()]
    from model import PAPER_PRESETS

    unknown = [v for v in variants if v not in VARIANTS and v not in PAPER_PRESETS]
    if not variants or unknown:
        raise UserError(f"unknown --variants {', '.join(unknown) or '(none)'}; use some of "
                        f"{', '.join([*VARIANTS, *PAPER_PRESETS])}")
    if ns.steps_per_phase < 1 or ns.max_accum < 1:
        raise UserError("--steps-per-phase and --max-accum must be positive whole numbers")
    if not (Path(ns.data) / "manifest.json").is_file() and not Path(ns.data).is_file():
        raise UserError(f"--data {ns.data} holds no token dataset (no manifest.json); pass a dir made by "
                        "prepare_fineweb.py, or restore data/sample with `git checkout -- data/sample`")
    gpu = detect_gpu()
    device = ns.device if ns.device != "auto" else "cuda" if gpu is not None else "cpu"
    if device == "cuda" and gpu is None:
        raise UserError("--device cuda but torch sees no CUDA GPU; check nvidia-smi, or use --device cpu")
    vram = ns.vram if ns.vram != "auto" or device == "cuda" else "cpu"
    launcher = ["--vram", vram, "--data", ns.data, "--device", device]
    size = ns.size or (None if device == "cuda" else "tiny")
    if size:
        launcher += ["--size", size]
    if ns.val_frac is not None:
        launcher += ["--val-frac", str(ns.val_frac)]
    if device == "cpu" and vram != "cpu":
        launcher += ["--param-dtype", "fp32", "--no-grad-checkpoint"]  # CPU: what the cpu tier runs
    work = Path(ns.work_dir) if ns.work_dir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows = []
    try:
        for v in variants:
            print(f"gpu-check: {v} ({len(rows) + 1}/{len(variants)}), runs in {work}", file=sys.stderr, flush=True)
            rows.append(check_variant(v, launcher, work, ns))
    finally:
        failed = len(rows) < len(variants) or any(r.failures for r in rows)
        if not ns.work_dir and not failed:
            shutil.rmtree(work, ignore_errors=True)
        elif not ns.work_dir:
            print(f"gpu-check: kept the runs and trainer logs for a look: {work}", file=sys.stderr)
    where = gpu.name if device == "cuda" and gpu else "CPU"
    print_table(rows, f"gpu-check: tier {vram} on {where}, {ns.steps_per_phase} steps per phase, compile "
                      f"{'on' if ns.compile else 'off'}, {time.monotonic() - t0:.0f} s (measured / plan)")
    if ns.json:
        body = {"tier": vram, "device": where, "steps_per_phase": ns.steps_per_phase, "compile": ns.compile,
                "rows": [{"variant": r.variant, "cells": r.cells, "failures": r.failures, **r.figures} for r in rows]}
        Path(ns.json).write_text(json.dumps(body, indent=2, default=str) + "\n")
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    from pretrain.errors import script_exit_code

    sys.exit(script_exit_code(main))
