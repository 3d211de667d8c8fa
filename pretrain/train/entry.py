"""The trainer's process entry (train_v29.py, `python -m pretrain.train`, pretrain-train): flags before torch.

The flags are checked against the torch-free parser first, so `--help`, `--print-config` and a mistyped flag
answer at once; only a command line that parses imports the trainer (torch) and runs it (pretrain.train.loop.main).
"""

from __future__ import annotations

from collections.abc import Sequence

from pretrain.config_file import parse_with_file
from pretrain.train.config import build_parser, parse_config
from pretrain.train.host_process import configure_host_process


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_with_file(build_parser(), argv)  # --help, flag and --config errors exit here, before torch loads
    if ns.print_config:
        from pretrain.train.run_config import config_text, dataset_vocab

        cfg = parse_config(argv)
        print(config_text(cfg, dataset_vocab(cfg)), end="")
        return 0
    configure_host_process()  # before torch loads (pretrain/train/host_process.py)
    from pretrain.train.loop import main as train_main

    return train_main(None if argv is None else list(argv))
