"""Why a checkpoint write or load failed, in the user's words, decided by errno and exception type.

torch's zip writer reports a failed or short write as its own RuntimeError ("[enforce fail at
inline_container.cc:672] unexpected pos"), and torch.load words a refused pickle and a torn file alike in
long messages; neither wording is a contract. `OwnedWriter` keeps the OS's own error for the write side;
the load side goes by the exception torch raises and by what the file's pickle names.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import torch


class OwnedWriter:
    """The file object torch.save writes through: every byte or the OSError the OS gave, remembered.

    torch's zip writer turns a failed or short write into its own RuntimeError ("[enforce fail at
    inline_container.cc:...] unexpected pos"), which names neither the disk nor errno; keeping the OSError
    lets the caller say what happened (ENOSPC: the disk is full) without reading torch's message text.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self._f.write(view[done:])
                if not n:  # a regular file never takes 0 bytes without an error; do not spin on it
                    raise OSError(errno.EIO, f"write took no bytes of {len(view) - done}")
                done += n
        except OSError as e:
            self.error = self.error or e
            raise
        return done

    def flush(self) -> None:
        self._f.flush()


def refused_globals(path: Path) -> str:
    """ " (a.B, c.d)": the Python objects the file names that weights_only loading refuses, read from its
    pickle without running it; empty when torch cannot list them (a legacy, non-zip file)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only a detail of the message
        return ""
    return f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""


def _os_error(e: BaseException | None) -> OSError | None:
    """The first OSError with an errno in `e`'s chain (raised from, or while handling, another error)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def why_write_failed(e: Exception, run_dir: Path) -> tuple[str, str]:
    """(cause, fix) of a failed write in a user's words, decided by errno (`_OwnedWriter` keeps the OS's
    error even when torch reports it as its own RuntimeError), never by the wording of a message."""
    os_error = _os_error(e)
    code = os_error.errno if os_error else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free once the partial file was removed)"
        except OSError:
            free = ""
        what = "the disk quota" if code == errno.EDQUOT else "the disk"
        return f"No space left on device: {what} of {run_dir} is full{free}", "free disk space"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{run_dir} is not writable: {os.strerror(code)}", f"make {run_dir} writable"
    if os_error is not None:
        return f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})", f"check the disk of {run_dir}"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "see the error above"
