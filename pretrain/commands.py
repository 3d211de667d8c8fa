"""Console-script entry points (`pip install -e .` puts them on PATH): each runs one CLI through run_cli."""

from __future__ import annotations

import importlib

from pretrain.errors import script_exit_code
from pretrain.invocation import CONSOLE, set_started_as


def _run(module: str) -> int:
    """Import the CLI's module only when its command runs (torch and friends load once, for that command)."""
    set_started_as(CONSOLE)  # printed commands and usage lines then name pretrain-* commands
    return script_exit_code(importlib.import_module(module).main)


def prepare() -> int:
    return _run("pretrain.data.entry")


def train() -> int:
    return _run("pretrain.train.entry")


def launch() -> int:
    return _run("pretrain.plan.entry")


def compare() -> int:
    return _run("pretrain.track.compare")


def export() -> int:
    return _run("pretrain.export")


def generate() -> int:
    return _run("pretrain.generate")


def downstream() -> int:
    return _run("pretrain.evals.downstream")


def infer_bench() -> int:
    return _run("pretrain.evals.infer_bench")
