"""Commands that paste (issue 22, item 5): started as a console script (pretrain-launch), the launcher prints a
trainer command that runs outside the repo (pretrain-train ...), and usage lines name the command the user typed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, cli_exit

from pretrain import invocation
from pretrain.plan import launch

SMALL = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--d-ff", "64", "--block-size", "32",
         "--eval-iters", "1", "--eval-every", "0", "--log-every", "1", "--save-every", "0", "--save-minutes", "0",
         "--live", "off", "--steps", "2", "--batch-size", "2", "--grad-accum", "1"]


def console(name: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The console script pretrain-<name> as pip's wrapper runs it: pretrain.commands.<name>() with sys.argv,
    in a directory without the repo's scripts (the package is found through PYTHONPATH, as if installed)."""
    code = (f"import sys; from pretrain.commands import {name}; sys.argv = {argv!r}; sys.exit({name}())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_usage_and_error_lines_name_the_console_command(tmp_path):
    proc = console("prepare", ["pretrain-prepare", "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pretrain-prepare "), proc.stdout[:200]
    assert "prepare_fineweb.py [" not in proc.stdout
    proc = console("launch", ["pretrain-launch", "--help"], tmp_path)
    assert proc.stdout.startswith("usage: pretrain-launch ") and "pretrain-launch compare RUN" in proc.stdout
    assert "run_1b_launch.py [" not in proc.stdout and "run_1b_launch.py compare" not in proc.stdout
    proc = console("train", ["pretrain-train", "--no-such-flag"], tmp_path)
    assert proc.returncode == 2 and "see pretrain-train --help" in proc.stderr, proc.stderr


def test_the_launchers_printed_command_runs_where_the_user_is(tmp_path, byte_data, monkeypatch, capsys):
    """The launcher and the trainer started as console scripts, their mains in this process (what a console script
    sets before its main runs, and its usage lines and exit code as a process: the test above)."""
    from pretrain.train.loop import main as train_main  # what pretrain.train.entry runs (after host settings)

    monkeypatch.setattr(invocation, "_started", [invocation.CONSOLE])  # what pretrain.commands sets first
    monkeypatch.chdir(tmp_path)
    launcher = ["--vram", "cpu", "--data", str(byte_data), "--val-frac", "0.05", *SMALL]
    assert cli_exit(launch.main, [*launcher, "--json"]) == 0
    command = json.loads(capsys.readouterr().out)["command"]
    assert command[0] == "pretrain-train" and "train_v29.py" not in command, command

    # Pasted where the user is (no train_v29.py here), the command trains; its log records it as typed.
    assert cli_exit(train_main, command[1:]) == 0, capsys.readouterr().err[-2000:]
    meta = json.loads((tmp_path / "runs" / "tiny-baseline" / "train.jsonl").read_text().splitlines()[0])
    assert meta["type"] == "meta" and meta["command"].startswith("pretrain-train --size tiny"), meta["command"]


def test_python_m_launcher_prints_python_m_trainer(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pretrain.plan", "--vram", "cpu", "--json", *SMALL], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["command"][:3] == ["python", "-m", "pretrain.train"]


def test_an_installed_package_without_repo_scripts_prints_python_m(tmp_path, monkeypatch):
    from pretrain import invocation

    monkeypatch.setattr(invocation, "ROOT", tmp_path)  # the installed layout: no train_v29.py beside the package
    _, plan = launch.plan_from_argv(["--vram", "cpu", "--run-root", str(tmp_path), *SMALL], gpu=None)
    assert plan.command[:3] == ["python", "-m", "pretrain.train"]
    _, plan = launch.plan_from_argv(["--vram", "cpu", "--run-root", str(tmp_path), "--nproc", "2", *SMALL], gpu=None)
    assert plan.command[4:6] == ["-m", "pretrain.train"] and "train_v29.py" not in plan.command
