"""Serving a token dataset (pretrain/data/dataset.py opens it): a deterministic resumable sampler, fixed
validation windows and a background prefetcher.

Windows. A window of length T starts at a multiple of T inside one shard and reads T + 1 tokens
(x = first T, y = last T), so windows never overlap in their inputs and a shard of n tokens holds
(n - 1) // T of them; windows never cross shard boundaries (at most T tokens per shard unused).

Order. All train windows of all shards are numbered 0..N-1; epoch e visits them in the order of a
keyed bijection of [0, N) (a Feistel network with cycle walking, keys from (seed, e, N)), so the
k-th sample of the run is a pure function of (seed, k): no big permutation is stored, and the
sampler's state is a few integers. Each `next_batch(B, T)` takes the next B * world_size samples
of that global order and returns this rank's contiguous slice, so 2 ranks x B == 1 rank x 2B, and
every rank holds the identical state (a checkpoint written by rank 0 restores all ranks).

Sequence-length changes. The state records the seq_len in use and the position in the epoch. When
next_batch is called with a new seq_len, the tokens consumed so far in this epoch (index * T_old)
are mapped onto the new grid (index = ceil(consumed / T_new)) and the epoch continues in the order
for the new grid. This is deterministic and resumable, keeps the epoch's progress, but within that
one epoch a few windows may overlap text already seen at the old length.
"""

from __future__ import annotations

import queue
import threading
import warnings
from typing import Any

import numpy as np
import torch

from pretrain.data.dataset import TokenDataset, window_counts
from pretrain.data.permutation import FeistelPermutation
from pretrain.errors import UserError

STATE_VERSION = 1


def _read_windows(segments: list[np.ndarray], starts: np.ndarray, ids: np.ndarray,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows by global id (starts = first id of each segment) -> int64 (x, y) of shape (B, T)."""
    seg = np.searchsorted(starts, ids, side="right") - 1
    buf = np.empty((len(ids), seq_len + 1), dtype=np.int64)
    for row, (s, i) in enumerate(zip(seg.tolist(), ids.tolist())):
        off = (i - int(starts[s])) * seq_len
        buf[row] = segments[s][off: off + seq_len + 1]
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TrainSampler:
    """Deterministic, resumable, rank-sliced training batches (see the module docstring)."""

    def __init__(self, ds: TokenDataset, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not (0 <= rank < world_size):
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.ds, self.seed, self.rank, self.world_size = ds, int(seed), rank, world_size
        self.epoch, self.index, self.seq_len = 0, 0, 0  # seq_len 0: no batch drawn yet
        self._grid: tuple[int, np.ndarray, int] | None = None  # (seq_len, starts, n)
        self._perm: FeistelPermutation | None = None
        self._perm_epoch = -1

    def _starts(self, seq_len: int) -> tuple[np.ndarray, int]:
        if self._grid is None or self._grid[0] != seq_len:
            counts = window_counts(self.ds.train, seq_len)
            self._grid = (seq_len, np.concatenate([[0], np.cumsum(counts)[:-1]]), int(counts.sum()))
        return self._grid[1], self._grid[2]

    def _order(self, epoch: int, n: int, pos: np.ndarray) -> np.ndarray:
        if self._perm is None or self._perm.n != n or self._perm_epoch != epoch:
            self._perm, self._perm_epoch = FeistelPermutation(n, self.seed, epoch), epoch
        return self._perm(pos)

    def _switch_seq_len(self, seq_len: int) -> None:
        if self.seq_len and self.index:
            consumed = self.index * self.seq_len
            _, n = self._starts(seq_len)
            self.index = -(-consumed // seq_len)
            if self.index >= n:
                self.epoch, self.index = self.epoch + 1, 0
        self.seq_len = seq_len

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) int64 CPU tensors of shape (batch_size, seq_len); advances the state."""
        if seq_len != self.seq_len:
            self._switch_seq_len(seq_len)
        starts, n = self._starts(seq_len)
        if n < batch_size * self.world_size:
            self.ds.check_enough(batch_size, seq_len, self.world_size)  # raises the UserError
        first = self.epoch * n + self.index + self.rank * batch_size
        g = first + np.arange(batch_size, dtype=np.int64)
        epochs, pos = g // n, g % n
        ids = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs).tolist():  # a batch can straddle an epoch boundary
            sel = epochs == e
            ids[sel] = self._order(int(e), n, pos[sel])
        end = self.epoch * n + self.index + batch_size * self.world_size
        self.epoch, self.index = end // n, end % n
        return _read_windows(self.ds.train, starts, ids, seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "index": self.index,
                "seq_len": self.seq_len, "train_tokens": self.ds.train_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}; "
                            "resume with the code version that wrote the checkpoint")
        if int(state["train_tokens"]) != self.ds.train_tokens:
            warnings.warn(f"the dataset has {self.ds.train_tokens:,} train tokens but the checkpoint was "
                          f"taken on {int(state['train_tokens']):,}; data order will differ from the "
                          "original run", stacklevel=2)
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.index, self.seq_len = int(state["index"]), int(state["seq_len"])
        if self.seq_len:
            _, n = self._starts(self.seq_len)
            if self.index >= n:
                self.epoch, self.index = self.epoch + 1, 0


class ValWindows:
    """Fixed validation windows spread evenly over the val split: identical at every eval."""

    def __init__(self, ds: TokenDataset, seq_len: int, batch_size: int, n_batches: int) -> None:
        counts = window_counts(ds.val, seq_len)
        total = int(counts.sum())
        if total < batch_size:
            raise UserError(
                f"the validation split of {ds.path} ({ds.val_tokens:,} tokens) holds {total} windows of "
                f"{seq_len}, fewer than one eval batch of {batch_size}; lower the eval batch size or "
                "seq_len, or prepare more --val-tokens / pass a larger --val-frac")
        self.ds, self.seq_len, self.batch_size = ds, seq_len, batch_size
        self.n_batches = min(n_batches, total // batch_size)
        n = self.n_batches * batch_size
        self.ids = (np.arange(n, dtype=np.int64) * total) // n  # evenly spaced, distinct
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        b = self.batch_size
        for i in range(self.n_batches):
            yield _read_windows(self.ds.val, self._starts, self.ids[i * b: (i + 1) * b], self.seq_len)


class Prefetcher:
    """Prepares the next batches in a background thread (pinned memory + non_blocking copy on CUDA).

    It guesses the next call repeats the last (batch_size, seq_len); when it does not, prefetched
    batches are dropped and the sampler rewinds to the consumed state, so state_dict() always
    describes batches handed out, never prefetched ones.
    """

    def __init__(self, sampler: TrainSampler, device: str | torch.device = "cpu", depth: int = 2) -> None:
        self.sampler, self.device, self.depth = sampler, torch.device(device), depth
        self._pin = self.device.type == "cuda"
        self._consumed = sampler.state_dict()
        self.epoch = sampler.epoch
        self._key: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._queue: queue.Queue = queue.Queue()

    def _produce(self, key: tuple[int, int], stop: threading.Event, q: queue.Queue) -> None:
        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return
                except queue.Full:
                    pass
        try:
            if self._pin and self.device.index is not None:
                # A new thread starts on GPU 0: pinning from it would create a CUDA context there on every rank.
                torch.cuda.set_device(self.device)
            while not stop.is_set():
                x, y = self.sampler.next_batch(*key)
                if self._pin:
                    x, y = x.pin_memory(), y.pin_memory()
                put((x, y, self.sampler.state_dict(), self.sampler.epoch))
        except BaseException as e:  # surfaced to the consumer on its next call
            put(e)

    def _stop(self) -> None:
        if self._thread is not None:
            self._stop_event.set()
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(0.01)
            self._thread = None
        self._key = None

    def _start(self, key: tuple[int, int]) -> None:
        self._stop()
        self.sampler.load_state_dict(self._consumed)  # rewind past anything prefetched
        self._key, self._stop_event, self._queue = key, threading.Event(), queue.Queue(self.depth)
        self._thread = threading.Thread(target=self._produce, args=(key, self._stop_event, self._queue),
                                        name="batch-prefetch", daemon=True)
        self._thread.start()

    def next(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (batch_size, seq_len)
        if self._key != key:
            self._start(key)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop()
            raise item
        x, y, self._consumed, self.epoch = item
        if self.device.type == "cpu":
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stop()
        self.sampler.load_state_dict(state)
        self._consumed, self.epoch = self.sampler.state_dict(), self.sampler.epoch

    def close(self) -> None:
        self._stop()
