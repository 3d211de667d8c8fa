"""The launcher's process entry (run_1b_launch.py, `python -m pretrain.plan`, pretrain-launch): flags before torch.

The command line is checked against the torch-free parser (pretrain/plan/flags.py) first, so `--help` and a
mistyped flag answer at once; only a command line that parses imports the planner (torch) and runs it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pretrain.plan.flags import SUBCOMMANDS, build_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not (args and args[0] in SUBCOMMANDS):
        build_parser().parse_args(args)  # --help and flag errors exit here, before torch loads
    from pretrain.plan.launch import main as launch_main

    return launch_main(args)
