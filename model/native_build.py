"""Where this project's compiled CPU libraries are kept and how one is built (model/cpu_kernels.py's fused kernels,
pretrain/train/host_blas.py's answer to MKL's vendor check). Torch-free: host_blas builds before torch loads."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$PRETRAIN_KERNELS_DIR, else ~/.cache/pretrain-kernels (under $XDG_CACHE_HOME when set)."""
    root = os.environ.get("PRETRAIN_KERNELS_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain-kernels"


def build(path: Path, command: list[str], stdin: str | None = None, timeout: float = 300) -> None:
    """Run the compiler `command` with `-o` a temporary file beside `path`, then rename it to `path`: concurrent
    builders (test workers, a trainer and its probe) each finish with a whole library there. Raises OSError or
    subprocess.SubprocessError (its stderr kept) when the build fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([*command, "-o", tmp], input=stdin, check=True, capture_output=True, text=True, timeout=timeout)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
