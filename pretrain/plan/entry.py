"""The launcher's process entry (run_1b_launch.py, `python -m pretrain.plan`, pretrain-launch): flags before torch.

The command line is checked against the torch-free parser (pretrain/plan/flags.py) first, so `--help`,
`--print-config` and a mistyped flag answer at once; only a command line that parses imports the planner (torch)
and runs it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pretrain.config_file import parse_with_file, toml_text
from pretrain.plan.flags import CONFIG_HEADER, SUBCOMMANDS, build_parser, config_sections
from pretrain.train.host_process import configure_host_process


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not (args and args[0] in SUBCOMMANDS):
        ns = parse_with_file(build_parser(), args)  # --help, flag and --config errors exit here, before torch loads
        if ns.print_config:
            print(toml_text(config_sections(ns), CONFIG_HEADER), end="")
            return 0
    configure_host_process()  # the planner times CPU steps as the trainer runs them (pretrain/train/host_process.py)
    from pretrain.plan.launch import main as launch_main

    return launch_main(args)
