"""Memory estimates kept on disk between dry runs, so a plan re-run costs about an `import torch`.

A fake-tensor estimate (pretrain/plan/memory.py) takes 0.3-4 s of CPU and a plan makes 5-15 of them; their result
depends only on the estimate's arguments and on the code that runs it. The key is exact: the sha256 of the
arguments (model config, memory-relevant settings, sequence length, pass) together with the torch and Python
versions and the bytes of every .py file under model/ and pretrain/ (so any edit of the repo's code recomputes;
over-inclusive on purpose, a stale figure is worse than a slow one).

Stored as one small JSON file per estimate under $PRETRAIN_CACHE_DIR, else $XDG_CACHE_HOME/pretrain, else
~/.cache/pretrain, in plan-memory/. Delete the folder to clear it. A cache that cannot be read or written is
ignored: the estimate is computed as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from pretrain.fsio import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("model", "pretrain")
CACHE_ENV = "PRETRAIN_CACHE_DIR"


def cache_dir() -> Path:
    """Where estimates are kept (see the module docstring)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pretrain")
    return Path(base) / "plan-memory"


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the torch and Python versions, the machine type and every .py file the estimate could run."""
    import torch

    h = hashlib.sha256(f"{torch.__version__}|{sys.version_info[:3]}|{platform.machine()}".encode())
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def key(*parts: str) -> str:
    """The cache key of an estimate whose arguments are `parts` (exact strings: sorted JSON, reprs)."""
    return hashlib.sha256(json.dumps([code_fingerprint(), *parts]).encode()).hexdigest()


def load(k: str) -> dict[str, Any] | None:
    """The stored estimate under key `k`, or None (absent, unreadable or not what store() wrote)."""
    try:
        body = json.loads((cache_dir() / f"{k}.json").read_text())
    except (OSError, ValueError):
        return None
    return body.get("estimate") if isinstance(body, dict) and body.get("key") == k else None


def store(k: str, estimate: dict[str, Any]) -> None:
    """Keep `estimate` under key `k` (atomically; a cache that cannot be written is skipped)."""
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / f"{k}.json", json.dumps({"key": k, "estimate": estimate}) + "\n")
    except OSError:
        pass
