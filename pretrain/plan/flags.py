"""The launcher's command line: its flags (plus every trainer flag) and subcommands, built from torch-free modules.

Kept apart from launch.py (which plans, and so loads torch and the memory estimator) so `run_1b_launch.py --help`
and a mistyped flag answer at once (pretrain/plan/entry.py parses here first).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from model import PAPER_PRESETS
from pretrain import invocation
from pretrain.config_file import FILE_FLAGS, add_file_flags
from pretrain.errors import ArgumentParser
from pretrain.plan.resolve import VARIANTS
from pretrain.plan.tiers import VRAM_CHOICES
from pretrain.train.config import TrainConfig, add_config_flags

DESCRIPTION = "The launcher: VRAM tier + token budget in, a plan that fits and the exact trainer command out."
# Trainer fields the launcher sets itself: --variant picks the attention, --run-root/--tag the run dir,
# --if-exists overwrite allows replacing one.
OWN_FIELDS = {"attn": "--variant", "exp": "--variant paper_decoupled (or paper_bottleneck)",
              "out_dir": "--run-root / --tag", "overwrite": "--if-exists overwrite"}


def _compare(argv: list[str]) -> int:
    from pretrain.track.compare import main as compare_main

    return compare_main(argv, prog="run_1b_launch.py compare")


COMPARE_HELP = """subcommand:
  run_1b_launch.py compare RUN [RUN ...] [--json] [--no-plot]
      one row per run (final/best val loss, tokens, tok/s, ...) and a val-loss plot; RUN may be runs/
      for every run in it. See run_1b_launch.py compare --help."""

# Subcommands, recognised by argv[0] before any flag parsing: `run_1b_launch.py compare runs/a runs/b`.
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"compare": _compare}


def build_parser() -> ArgumentParser:
    """Launcher options plus every trainer flag (generated from TrainConfig; None = not given)."""
    p = ArgumentParser(prog="run_1b_launch.py", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       # the compare help names the launcher as the user typed it
                       epilog=COMPARE_HELP.replace("run_1b_launch.py", invocation.prog("launch")))
    g = p.add_argument_group("launcher")
    g.add_argument("--vram", default="auto", help=f"VRAM tier: {' | '.join(VRAM_CHOICES)} (auto reads the GPU)")
    g.add_argument("--variant", default=None, help=f"attention variant: {' | '.join([*VARIANTS, *PAPER_PRESETS])} "
                   "(default baseline; paper_* are the paper's configurations, docs/paper_presets.md)")
    g.add_argument("--target-tokens", default=None, help="token budget, e.g. 10B: the fewest steps reaching it")
    g.add_argument("--tokens-per-param", type=float, default=None, help="token budget as tokens per parameter")
    g.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step (GPU tiers: 256)")
    g.add_argument("--run-root", default="runs", help="where run directories live")
    g.add_argument("--tag", default=None, help="suffix of the run name, e.g. lr3e-4")
    g.add_argument("--extend", action="store_true",
                   help="continue the existing run with a changed --steps / token budget (default: a new run)")
    g.add_argument("--if-exists", default="suffix", choices=["suffix", "skip", "error", "overwrite"],
                   help="when the run dir holds another run or one without a checkpoint (resumable runs resume)")
    g.add_argument("--data-format", default="auto", choices=["auto", "manifest", "npy", "glob"],
                   help="expected layout of --data (auto: detect)")
    g.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node; >1 launches through torchrun")
    g.add_argument("--assume-mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate")
    g.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for the time estimate")
    g.add_argument("--probe", action="store_true",
                   help="run a few real optimizer steps per phase on this device: measured memory and tok/s next "
                        "to the estimate, micro-batches corrected to what fits (with --run: saved to probe.json)")
    g.add_argument("--gpu", default=None, help="plan for this card instead of the detected one, e.g. T4, L4, "
                   "A100 80GB (its memory and bf16 support; dry run only)")
    g.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    g.add_argument("--run", action="store_true", help="run the trainer (default: dry run, writes nothing)")
    g.add_argument("--force", action="store_true", help="--run even when the plan is estimated not to fit")
    g.add_argument("--seeds", type=int, default=1,
                   help="N runs of this config with seeds --seed, --seed+1, ... (run dirs get -s<seed>); "
                        "compare shows them as mean ± sd")
    add_config_flags(p, show_defaults=False)  # the tier decides what an unset flag becomes, not TrainConfig
    p.set_defaults(**{f.name: None for f in fields(TrainConfig)})
    for action in p._actions:  # the launcher sets these itself
        if action.dest in OWN_FIELDS:
            action.help = argparse.SUPPRESS
    add_file_flags(p, "the launcher options and the trainer flags given")
    return p


CONFIG_HEADER = ("run_1b_launch.py settings: every launcher option and the trainer flags given (the tier decides\n"
                 "the rest). Feed it back with --config FILE; flags given with it override it.")


def config_sections(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """What the launcher's --print-config prints; fed back with --config, the same plan."""
    trainer = [f.name for f in fields(TrainConfig)]
    return {"launcher": {k: v for k, v in vars(ns).items() if k not in trainer and k not in FILE_FLAGS},
            "trainer": {k: getattr(ns, k) for k in trainer}}
