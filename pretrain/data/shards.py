"""Reading token shards so that a file damaged under a running trainer is an error, never a crash.

Shards used to be read through np.load(mmap_mode="r"). A memmap turns any later change of the file into a
fault of the process: `truncate`, `cp` or `rsync --inplace` over a shard during training killed the trainer
with SIGBUS (exit 135, no message, no save), and a signal cannot be turned into a Python exception reliably.
So nothing here maps a file. The .npy header is parsed once, the file stays open, and every read is an
os.pread of just the tokens asked for (a batch is a few KB per row: a copy costs nothing next to a step):

- before each read, fstat compares the file's size and mtime with what was validated at open: a shard
  changed in place (truncate, cp, rsync --inplace, an editor) raises ShardChanged naming the file;
- a short read (the file shrank between fstat and pread) raises the same, instead of a fault;
- the ids read are checked against the vocab (max() of a small array), so an id the embedding cannot index
  never reaches the model, whatever the manifest claimed;
- a shard that is not a regular file (a FIFO would block open forever, a device never ends) is refused
  before it is opened.

A shard replaced by rename (rsync without --inplace, prepare's own tmp + rename) keeps being read from the
open file, i.e. the data the run validated; a resume then compares the data fingerprint (fingerprint.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from pretrain.errors import UserError
from pretrain.fsio import regular_file_problem


class ShardChanged(UserError):
    """A shard changed (or holds ids beyond the vocab) after it was validated: the trainer saves and stops."""


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


class Shard:
    """One open .npy token file: header parsed, size and mtime remembered, tokens read by os.pread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            why = regular_file_problem(self.path)
        except FileNotFoundError:
            raise UserError(f"shard {self.path} is missing; restore it or re-run prepare_fineweb.py") from None
        except OSError as e:
            raise UserError(f"cannot read shard {self.path} ({e.strerror}); fix its permissions") from None
        if why:
            raise UserError(f"shard {why}; point --data at .npy files made by prepare_fineweb.py")
        try:
            # O_NONBLOCK: if the file was swapped for a FIFO since the stat above, open must not block on it
            self._file = open(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0)
        except OSError as e:
            raise UserError(f"cannot read shard {self.path} ({e.strerror}); fix its permissions") from None
        try:
            st = os.fstat(self._file.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            shape, _, dtype = _read_header(self._file)
            self.offset = self._file.tell()
        except Exception as e:  # numpy raises ValueError/OSError/EOFError variants for junk files
            raise UserError(f"shard {self.path} is not a readable .npy ({e}); re-run prepare_fineweb.py") from None
        if len(shape) != 1 or dtype not in (np.uint16, np.uint32):
            raise UserError(f"shard {self.path} is {dtype} with shape {shape}; expected a 1-D uint16/uint32 "
                            "token array (re-run prepare_fineweb.py)")
        self.dtype, self.tokens = np.dtype(dtype), int(shape[0])
        need = self.offset + self.tokens * self.dtype.itemsize
        if st.st_size < need:
            raise UserError(f"shard {self.path} is truncated ({st.st_size:,} bytes, its header needs {need:,}); "
                            "restore it or re-run prepare_fineweb.py")
        self._seen = (st.st_size, st.st_mtime_ns)
        self.vocab: int | None = None  # ids at or above it are damage (set once the vocab is known)
        self._where = "its dataset"

    def set_vocab(self, vocab: int, where: str) -> None:
        self.vocab, self._where = vocab, where

    def __len__(self) -> int:
        return self.tokens

    def _changed(self, what: str) -> ShardChanged:
        return ShardChanged(f"shard {self.path} changed while the trainer was reading it ({what}); restore the "
                            "original file")

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of this shard as a fresh array (never a view of the file)."""
        n = max(0, min(n, self.tokens - start))
        fd = self._file.fileno()
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != self._seen:
            size = f"{self._seen[0]:,} -> {st.st_size:,} bytes" if st.st_size != self._seen[0] else "modified"
            raise self._changed(size)
        want, pos = n * self.dtype.itemsize, self.offset + start * self.dtype.itemsize
        parts, got = [], 0
        while got < want:  # pread may return less than asked (2 GB cap); zero bytes means end of file
            chunk = os.pread(fd, want - got, pos + got)
            if not chunk:
                raise self._changed(f"it ends before token {start + got // self.dtype.itemsize:,}")
            parts.append(chunk)
            got += len(chunk)
        arr = np.frombuffer(b"".join(parts) if len(parts) > 1 else (parts[0] if parts else b""), dtype=self.dtype)
        if self.vocab is not None and n and int(arr.max()) >= self.vocab:
            raise ShardChanged(f"shard {self.path} holds token id {int(arr.max())} but {self._where} says "
                               f"vocab_size {self.vocab}; the shard is damaged or from another tokenizer: "
                               "re-run prepare_fineweb.py for it")
        return arr

    def max_id(self) -> int:
        """Largest id in the shard, read in chunks (a 2 GB shard never becomes a 2 GB array)."""
        chunk = 1 << 24
        return max((int(self.read(i, chunk).max()) for i in range(0, self.tokens, chunk)), default=-1)


class Segment:
    """Tokens [start, start + length) of a Shard: what a dataset's train / val split is made of.

    Indexing reads like an array (`seg[a:b]` is an ndarray, `seg[-1]` an int); `sub` slices without reading."""

    def __init__(self, shard: Shard, start: int = 0, length: int | None = None) -> None:
        self.shard, self.start = shard, start
        self.length = len(shard) - start if length is None else length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"Segment({self.shard.path.name}[{self.start}:{self.start + self.length}])"

    def sub(self, a: int, b: int) -> Segment:
        a, b, _ = slice(a, b).indices(self.length)
        return Segment(self.shard, self.start + a, max(0, b - a))

    def __getitem__(self, key: int | slice) -> np.ndarray | int:
        if isinstance(key, slice):
            a, b, step = key.indices(self.length)
            if step != 1:
                raise ValueError("segments are read in contiguous slices only")
            return self.shard.read(self.start + a, max(0, b - a))
        i = key + self.length if key < 0 else key
        if not 0 <= i < self.length:
            raise IndexError(f"index {key} out of range for a segment of {self.length}")
        return int(self.shard.read(self.start + i, 1)[0])
