"""The run directory as the trainer owns it: can it be written, one trainer at a time, which files are its own.

The lock is an OS lock (flock) on `.train.lock`: the kernel drops it when the process ends, however it ends
(kill -9 included), so a stale lock cannot exist; the file itself is left behind and only names the pid.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from pretrain.fsio import DirLock, fsync_dir
from pretrain.track.attn_maps import ATTN_MAP_DIR
from pretrain.track.plots import PLOT_FILES
from pretrain.track.runlog import JSONL_NAME, read_jsonl
from pretrain.train.checkpoint import _TMP_PREFIX, BEST, LAST, checkpoint_paths

LOCK_NAME = ".train.lock"  # hidden: summary.md lists a run dir's visible files
# Files and directories a trainer writes into its run dir: what a fresh start (--overwrite) may remove.
# Anything else there (the user's notes, their own .pt or .png files) is never touched.
RUN_FILES = ("train.jsonl", "summary.md", "wandb_run_id.txt", LAST, BEST, *PLOT_FILES, "config.toml")
ABANDONED = "abandoned"  # checkpoints of branches a rollback left, one folder per rollback
RUN_DIRS = ("wandb", "tb", ABANDONED, ATTN_MAP_DIR)


def writable_problem(path: Path) -> str | None:
    """Why nothing can be written at `path` (a dir, maybe not yet created), or None.

    Tries a real temp file: os.access says yes to root even on a read-only mount.
    """
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        fd, scratch = tempfile.mkstemp(dir=existing, prefix=".write-check-")
        os.close(fd)
        os.unlink(scratch)
    except OSError as e:
        return f"{existing} is not writable ({os.strerror(e.errno) if e.errno else e})"
    return None


def check_out_dir(run_dir: Path) -> None:
    """--out-dir must be a directory (or not exist yet) on a writable disk; checked before anything is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out-dir {run_dir} is a file, not a directory; choose another --out-dir")
    why = writable_problem(run_dir)
    if why:
        raise UserError(f"cannot write the run dir: {why}; choose an --out-dir on a writable disk "
                        "(or fix its permissions)")


class RunDirLock:
    """One trainer per run dir. `acquire` raises UserError naming the holder's pid when another has it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._lock = DirLock(self.path)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = self._lock.acquire()
        if holder is not None:
            raise UserError(f"{self.path.parent} is in use by another trainer (pid {holder}); wait for it to end, "
                            f"stop it with kill -TERM {holder} (it saves first), or choose another --out-dir")

    def release(self) -> None:
        self._lock.release()


def trainer_files(run_dir: Path) -> list[Path]:
    """Files in `run_dir` the trainer wrote (by name: it knows every name it uses)."""
    if not run_dir.is_dir():
        return []
    own = [run_dir / n for n in RUN_FILES if (run_dir / n).is_file()]
    own += checkpoint_paths(run_dir)["numbered"]
    own += [p for p in run_dir.iterdir() if p.is_file() and (
        p.name.startswith(_TMP_PREFIX) or (p.name.startswith(".") and p.name[1:-4] in RUN_FILES))]
    return own


def has_run(run_dir: Path) -> bool:
    """A previous trainer left a log or a checkpoint here."""
    paths = checkpoint_paths(run_dir)
    return (run_dir / "train.jsonl").is_file() or bool(paths["last"] or paths["best"] or paths["numbered"])


def clear_run(run_dir: Path) -> None:
    """Remove what a previous trainer wrote, and nothing else."""
    for p in trainer_files(run_dir):
        p.unlink(missing_ok=True)
    for d in RUN_DIRS:
        shutil.rmtree(run_dir / d, ignore_errors=True)


def set_branch_aside(run_dir: Path, paths: list[Path], step: int) -> dict[str, Any]:
    """A rollback to `step`: move the abandoned branch's checkpoints `paths` into their own folder,
    abandoned/branch-from-step<step>-<UTC time>/, with a copy of train.jsonl and summary.md as they stand.

    Nothing is deleted, and checkpoint discovery (last.pt, step_<N>.pt of the run dir itself) and keep-last
    pruning no longer see that branch, so a later fall-back stays on the live one. Returns the fields the
    resume event records.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir / ABANDONED / f"branch-from-step{step}-{stamp}"
    for i in range(2, 1000):
        if not dest.exists():
            break
        dest = run_dir / ABANDONED / f"branch-from-step{step}-{stamp}-{i}"
    dest.mkdir(parents=True)
    for name in (JSONL_NAME, "summary.md"):  # the live copies are rewritten for the branch that goes on
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    logged = [r["step"] for r in read_jsonl(dest / JSONL_NAME) if isinstance(r.get("step"), int)]
    moved = []
    for p in paths:
        try:
            os.replace(p, dest / p.name)  # same file system: a rename, nothing copied
        except FileNotFoundError:  # gone since it was listed (before this trainer held the lock)
            continue
        moved.append(p)
    fsync_dir(dest)
    fsync_dir(run_dir)
    steps = [int(p.stem.split("_", 1)[1]) for p in moved if p.stem.startswith("step_")]
    return {"from_step": step, "reached_step": max([*logged, *steps], default=step),
            "moved_to": str(dest.relative_to(run_dir)), "files": sorted(p.name for p in moved)}
