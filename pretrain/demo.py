"""The embedded demo (`make demo`): plan and train a tiny GPT on the bundled data/sample on CPU, offline.

    python -m pretrain.demo                     # ~2 min on 2 idle cores; rerun to resume / see it is complete
    python -m pretrain.demo --variant gqa       # the same run with grouped-query attention, to compare
    python -m pretrain.demo --steps 20          # shorter (also PRETRAIN_DEMO_STEPS=20)

It goes through the same path a GPU user takes: the launcher's `--vram cpu` tier plans the run (model size,
memory, time, the exact trainer command), then the trainer runs that command and writes runs/<name>/.
Threads are left at torch's defaults (set OMP_NUM_THREADS yourself to change them).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.errors import EXIT_STOPPED, ArgumentParser, UserError
from pretrain.plan.resolve import VARIANTS  # the launcher's --variant names: the demo's choices
from pretrain.track.compare import run_row
from pretrain.track.runlog import read_jsonl
from pretrain.train.host_process import configure_host_process

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
DEFAULT_STEPS = 150
STEPS_ENV = "PRETRAIN_DEMO_STEPS"

# What the demo changes from the cpu tier, and why: seq 128 throughout (the tier's switch to 256 doubles the
# cost of the GPT-2-vocab LM head, which dominates a tiny model's step), a higher LR than the 1B default
# (a 3M-parameter model is stable at 3e-3 and the loss then falls visibly in 150 steps), evals every 50
# steps so loss.png has a curve, checkpoints as often so an interrupted demo resumes close to where it was.
DEMO_FLAGS = ["--seq-schedule", "128@0", "--lr", "3e-3", "--warmup-steps", "20", "--eval-every", "50",
              "--eval-iters", "10", "--log-every", "10", "--save-every", "50"]


def _shown(path: Path) -> str:
    """A path as the user should type it: relative when under the current directory."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def launcher_argv(steps: int, variant: str, run_root: Path, data: Path) -> list[str]:
    return ["--vram", "cpu", "--data", _shown(data), "--run-root", _shown(run_root), "--tag", "demo",
            "--variant", variant, "--steps", str(steps), *DEMO_FLAGS]


def _run_with_launcher(argv: list[str]) -> tuple[Path, int, str]:
    """Plan with the launcher and run its trainer command: (run dir, exit code, note)."""
    from pretrain.plan import launch  # torch: after main's host settings
    from pretrain.plan.view import render_plan

    _, plan = launch.plan_from_argv(argv)
    render_plan(plan, running=True)
    run_dir = Path(plan.run["dir"])
    if plan.run["action"] in ("complete", "skip"):
        return run_dir, 0, plan.run["note"]
    print(flush=True)
    return run_dir, launch.run_trainer(plan.command), ""


def report(run_dir: Path, variant: str, elapsed: float) -> dict[str, Any]:
    """Print what the run reached and where to look next; returns its compare row."""
    row = run_row(run_dir)
    evals = [e for e in read_jsonl(run_dir / "train.jsonl") if e.get("type") == "eval"]
    first = evals[0]["loss"] if evals else None
    d = _shown(run_dir)
    print()
    print(f"demo: {row['status']} after {row['steps']} steps, {row['tokens'] or 0:,} tokens "
          f"({elapsed:.0f}s this session)")
    if first is not None and row["final_val_loss"] is not None:
        print(f"  val loss {first:.3f} -> {row['final_val_loss']:.3f} (best {row['best_val_loss']:.3f})")
    print("look at:")
    for name, what in (("summary.md", "results, plots and config"), ("loss.png", "train and val loss vs tokens"),
                       ("train.jsonl", "every logged step, one JSON object a line")):
        print(f"  {d}/{name:<12} {what}")
    other = "gqa" if variant != "gqa" else "baseline"
    print("next:")
    print("  resume     rerun the same command (Ctrl-C saves first; a finished run says it is complete)")
    print(f"  variant    python -m pretrain.demo --variant {other}")
    print(f"  compare    python run_1b_launch.py compare {d} {_shown(run_dir.parent / f'tiny-{other}-demo')}")
    return row


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n")[0])
    env_steps = os.environ.get(STEPS_ENV)
    try:
        default_steps = int(env_steps) if env_steps else DEFAULT_STEPS
    except ValueError:
        raise UserError(f"{STEPS_ENV}={env_steps!r} is not a whole number of steps; unset it or use e.g. 20") \
            from None
    p.add_argument("--steps", type=int, default=default_steps,
                   help=f"optimizer steps (default {DEFAULT_STEPS}, or ${STEPS_ENV})")
    p.add_argument("--variant", choices=list(VARIANTS), default="baseline", help="attention variant")
    p.add_argument("--run-root", default=str(ROOT / "runs"), help="where the run directory goes")
    p.add_argument("--data", default=str(SAMPLE), help="token dataset (default: the bundled data/sample)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps <= 0:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    data, run_root = Path(args.data), Path(args.run_root)
    if not (data / "manifest.json").is_file():
        raise UserError(f"{data} holds no token dataset (manifest.json); restore data/sample with "
                        "`git checkout -- data/sample` or pass --data DIR")
    # The planner runs in this process and times this CPU's matmuls: with the settings the launcher's and the
    # trainer's entries make before torch loads, or on an AMD CPU its rate would be MKL's generic branch's, ~30 %
    # below what the trainer it starts runs at.
    configure_host_process()
    t0 = time.monotonic()
    run_dir, code, note = _run_with_launcher(launcher_argv(args.steps, args.variant, run_root, data))
    if note:
        print(f"\n{note}")
    if code == EXIT_STOPPED:
        print(f"demo: stopped before the end, its last step saved (exit code {code}); rerun the same command to "
              "resume", file=sys.stderr)
        return code
    if code != 0:
        print(f"demo: the trainer exited with code {code}; rerun the same command to resume", file=sys.stderr)
        return code
    report(run_dir, args.variant, time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    from pretrain.errors import script_exit_code

    sys.exit(script_exit_code(main))
