"""Faults the tests inject into a real run: a NaN loss at a chosen step, a disk that fills up under the checkpoint
writer."""

from __future__ import annotations

import errno
import io
import os


def nan_at_step(monkeypatch, step: int) -> None:
    """Make the training forward pass of optimizer step `step` (grad-accum 1) return a NaN loss."""
    from model import GPT

    original = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = original(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == step:
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)


class _FillingDiskFile(io.RawIOBase):
    """A file on a disk with `free` bytes left: a write past them writes what fits and returns the short count,
    the next one fails with ENOSPC (what the OS does)."""

    def __init__(self, path: str, free: int) -> None:
        self._f = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()
        self.free = free

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes and not self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self._f.write(view[: self.free])
        self.free -= n
        return n

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


def full_disk(monkeypatch, free_bytes: int) -> None:
    """Checkpoint files land on a disk with `free_bytes` left: each file the checkpoint writer opens gets that
    much (then ENOSPC), through a buffered file object like open()'s; reading is untouched."""
    import builtins

    import pretrain.train.checkpoint as ck

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        if "w" not in mode:
            return builtins.open(path, mode, *args, **kwargs)
        return io.BufferedWriter(_FillingDiskFile(str(path), free_bytes))

    monkeypatch.setattr(ck, "open", open_on_full_disk, raising=False)
