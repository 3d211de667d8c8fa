"""The package installs: `pip install -e .` gives console commands and `python -m` CLIs that work from `/`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["pretrain-prepare", "pretrain-train", "pretrain-launch", "pretrain-compare", "pretrain-export",
            "pretrain-generate", "pretrain-downstream", "pretrain-infer-bench"]
MODULES = ["pretrain.data", "pretrain.train", "pretrain.plan", "pretrain.export", "pretrain.demo",
           "pretrain.track.compare", "pretrain.generate", "pretrain.evals.infer_bench", "pretrain.evals.downstream"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv that sees this interpreter's packages (torch etc.) and gets this repo installed editable."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)  # pip and setuptools come from outside
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = env_dir / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                           "-e", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return env_dir / "bin"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd="/", env=_env(), capture_output=True, text=True, timeout=120)


def test_every_console_command_and_python_m_cli_has_help_from_root(installed):
    """Started together (each imports torch): every entry point prints its usage from `/`, exit 0."""
    argvs = [[str(installed / c), "--help"] for c in COMMANDS]
    argvs += [[str(installed / "python"), "-m", m, "--help"] for m in MODULES]
    procs = [subprocess.Popen(a, cwd="/", env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in argvs]
    failed = []
    for argv, proc in zip(argvs, procs):
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or not out.startswith("usage:") or "--help" not in out:
            failed.append(f"{' '.join(argv[-3:])}: exit {proc.returncode} {err[-300:]}")
    assert not failed, failed


def test_installed_trainer_reports_bad_input_in_one_line(installed, tmp_path):
    proc = _run([str(installed / "pretrain-train"), "--data", str(tmp_path / "missing"), "--steps", "1"])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_repo_scripts_stay_thin_callers():
    for script in ("train_v29.py", "run_1b_launch.py", "prepare_fineweb.py"):
        assert len((ROOT / script).read_text().splitlines()) < 20, script
    assert sys.version_info >= (3, 11)


def test_a_wheel_carries_the_files_read_at_run_time(tmp_path):
    """A non-editable install reads from the wheel: the CPU kernels' source (model/cpu_kernels.py builds it), the
    tokenizer's ranks, the shipped memory estimates and the remote-code wrappers are in it."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: setuptools builds inside the tree it is given
    for name in ("model", "pretrain"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(src)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_sources = [f"model/csrc/{p.name}" for p in (ROOT / "model" / "csrc").iterdir()]
    assert len(kernel_sources) >= 3  # the kernels, the attention kernel, their shared header
    for path in (*kernel_sources, "model/cpu_kernels.py", "pretrain/data/assets/gpt2.tiktoken",
                 "pretrain/plan/shipped_estimates.json", "pretrain/hf_remote/modeling_pretrain.py"):
        assert path in names, path
