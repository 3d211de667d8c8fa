"""`--help` of every entry point answers without importing torch or another heavy library (issue 20, item 8).

Each entry runs `--help` in a fresh interpreter under `python -X importtime`, whose stderr lists every module
imported; none of HEAVY may be among them (deterministic: module names, not seconds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "numpy", "datasets", "wandb", "matplotlib", "transformers", "pandas", "pyarrow"}


def _console(name: str) -> list[str]:
    """The console script pretrain-<name> as pip's wrapper runs it: pretrain.commands.<name>() with sys.argv."""
    script = "pretrain-" + name.replace("_", "-")
    return ["-c", f"import sys; from pretrain.commands import {name}; sys.argv = [{script!r}, '--help']; "
                  f"sys.exit({name}())"]


COMMANDS = ("train", "launch", "prepare", "compare", "export", "generate", "downstream", "infer_bench")
MODULES = ("pretrain.train", "pretrain.plan", "pretrain.data", "pretrain.track.compare", "pretrain.export",
           "pretrain.generate", "pretrain.evals.downstream", "pretrain.evals.infer_bench")
ENTRIES = {
    "train_v29.py": ["train_v29.py", "--help"],
    "run_1b_launch.py": ["run_1b_launch.py", "--help"],
    "prepare_fineweb.py": ["prepare_fineweb.py", "--help"],
    **{f"-m {m}": ["-m", m, "--help"] for m in MODULES},
    **{"pretrain-" + c.replace("_", "-"): _console(c) for c in COMMANDS},
}


def heavy_imports(args: list[str]) -> tuple[set[str], subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    return {m for m in imported if m.split(".")[0] in HEAVY}, proc


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_help_imports_no_heavy_module(entry: str) -> None:
    heavy, proc = heavy_imports(ENTRIES[entry])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    assert not heavy, f"{entry} --help imported {sorted(m for m in heavy if '.' not in m)}"


def test_bad_flag_is_refused_before_torch() -> None:
    """A mistyped trainer flag is refused by the light parser: one line, exit 2, torch never loaded."""
    heavy, proc = heavy_imports(["train_v29.py", "--stepz", "5"])
    assert proc.returncode == 2
    assert "error: unrecognized arguments: --stepz" in proc.stderr
    assert not heavy
