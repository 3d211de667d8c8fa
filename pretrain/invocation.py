"""How the user started this process (a repo script, a console script, `python -m`), and each tool's name in that form.

A command printed for the user to paste (the launcher's trainer command) and a usage line must name what runs
where the user is: `python train_v29.py` runs only in the repo, `pretrain-train` only where the package is
installed. The entry points say which form they are (pretrain/commands.py: console scripts; the packages'
__main__.py: `python -m`); the repo scripts are the default. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

SCRIPT, CONSOLE, MODULE = "script", "console", "module"
ROOT = Path(__file__).resolve().parents[1]
# tool: (repo script or None, console script, module for `python -m`)
TOOLS: dict[str, tuple[str | None, str, str]] = {
    "prepare": ("prepare_fineweb.py", "pretrain-prepare", "pretrain.data"),
    "train": ("train_v29.py", "pretrain-train", "pretrain.train"),
    "launch": ("run_1b_launch.py", "pretrain-launch", "pretrain.plan"),
    "compare": (None, "pretrain-compare", "pretrain.track.compare"),
    "export": (None, "pretrain-export", "pretrain.export"),
    "generate": (None, "pretrain-generate", "pretrain.generate"),
    "downstream": (None, "pretrain-downstream", "pretrain.evals.downstream"),
    "infer_bench": (None, "pretrain-infer-bench", "pretrain.evals.infer_bench"),
}
_started = [SCRIPT]


def set_started_as(form: str) -> None:
    """Called by an entry point before its CLI runs: SCRIPT, CONSOLE or MODULE."""
    _started[0] = form


def _form(tool: str) -> str:
    script = TOOLS[tool][0]
    if _started[0] == SCRIPT and (script is None or not (ROOT / script).is_file()):
        return MODULE  # no repo script to name (an installed package): `python -m` runs wherever it is installed
    return _started[0]


def command(tool: str) -> list[str]:
    """The words that run `tool` where the user is: ["python", "train_v29.py"], ["pretrain-train"], or
    ["python", "-m", "pretrain.train"]."""
    script, console, module = TOOLS[tool]
    return {SCRIPT: ["python", str(script)], CONSOLE: [console], MODULE: ["python", "-m", module]}[_form(tool)]


def torchrun_target(tool: str) -> list[str]:
    """What follows torchrun's own flags to run `tool`: its repo script, else `-m module` (console scripts are
    not paths torchrun can take)."""
    script, _, module = TOOLS[tool]
    return [str(script)] if _form(tool) == SCRIPT else ["-m", module]


def prog(tool: str) -> str:
    """`tool`'s name on a usage line: train_v29.py, pretrain-train or python -m pretrain.train."""
    script, console, module = TOOLS[tool]
    return {SCRIPT: str(script), CONSOLE: console, MODULE: f"python -m {module}"}[_form(tool)]


def shown_prog(prog_: str) -> str:
    """A parser's program name in the form the user typed: "train_v29.py" -> "pretrain-train" when started as a
    console script; the rest of it (" compare" of a subcommand) stays."""
    for tool, (script, _, module) in TOOLS.items():
        for old in (script, f"python -m {module}"):
            if old and (prog_ == old or prog_.startswith(old + " ")):
                return prog(tool) + prog_[len(old):]
    return prog_
