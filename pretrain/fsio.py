"""File safety shared by datasets, run logs and checkpoints: crash-safe writes (temp file, fsync, rename, fsync
dir), refusing files that are not regular files before opening them, and one-process-per-directory locks."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry: without it a crash can lose a rename that already happened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers (and a crash) see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def regular_file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a plain file (a FIFO, a device, a directory), or None. Raises
    FileNotFoundError when it does not exist. A FIFO or device would make open()/read() block or never end."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    return f"{path} is {kind}, not a regular file"
