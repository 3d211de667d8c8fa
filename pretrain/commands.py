"""Console-script entry points (`pip install -e .` puts them on PATH): each runs one CLI through run_cli."""

from __future__ import annotations

from pretrain.cli import run_cli


def prepare() -> int:
    from pretrain.data.cli import main

    return run_cli(main)


def train() -> int:
    from pretrain.train.loop import main

    return run_cli(main)


def launch() -> int:
    from pretrain.plan.launch import main

    return run_cli(main)


def compare() -> int:
    from pretrain.track.compare import main

    return run_cli(main)


def export() -> int:
    from pretrain.export import main

    return run_cli(main)


def generate() -> int:
    from pretrain.generate import main

    return run_cli(main)


def downstream() -> int:
    from pretrain.evals.downstream import main

    return run_cli(main)


def infer_bench() -> int:
    from pretrain.evals.infer_bench import main

    return run_cli(main)
