"""File safety shared by datasets, run logs and checkpoints: crash-safe writes (temp file, fsync, rename, fsync
dir), refusing files that are not regular files before opening them, and one-process-per-directory locks."""

from __future__ import annotations

import errno
import fcntl
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


class DirLock:
    """One process at a time: an OS lock (flock) on the file `path`, which names the holder's pid.

    The kernel drops the lock when the process ends, however it ends (kill -9 included), so a stale lock cannot
    exist. With remove=True the file is deleted on release (a dataset dir then holds only its own files);
    acquire() checks that the file it locked is still the one at `path`, since a holder may have deleted it
    between our open and our flock.
    """

    def __init__(self, path: Path, remove: bool = False) -> None:
        self.path, self.remove = Path(path), remove
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """None once held; the holder's pid (or "unknown") when another process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                return holder
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its holder had just removed: lock the one at `path` now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            if self.remove:
                self.path.unlink(missing_ok=True)  # before the unlock: nobody can lock a file that is gone
            os.close(self._fd)  # closing drops the flock
            self._fd = None
