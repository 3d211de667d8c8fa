"""The trainer's process entry (train_v29.py, `python -m pretrain.train`, pretrain-train): flags before torch.

The flags are checked against the torch-free parser first, so `--help` and a mistyped flag answer at once;
only a command line that parses imports the trainer (torch) and runs it (pretrain.train.loop.main).
"""

from __future__ import annotations

from collections.abc import Sequence

from pretrain.train.config import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)  # --help and flag errors exit here, before torch loads
    from pretrain.train.loop import main as train_main

    return train_main(None if argv is None else list(argv))
