"""Token datasets for training: open + validate shards, a deterministic resumable sampler, fixed
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

import glob as globmod
import queue
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.cli import UserError
from pretrain.data.fingerprint import dataset_fingerprint
from pretrain.data.manifest import MANIFEST, read_manifest, read_meta
from pretrain.data.permutation import FeistelPermutation

STATE_VERSION = 1


class TokenDataset:
    """Train and validation token segments (memmaps or slices of them) plus tokenizer facts."""

    def __init__(self, path: str, tokenizer: str, vocab_size: int, eot_id: int, dtype: str,
                 train: list[np.ndarray], val: list[np.ndarray], val_source: str) -> None:
        self.path, self.tokenizer, self.vocab_size, self.eot_id, self.dtype = (
            path, tokenizer, vocab_size, eot_id, dtype)
        self.train, self.val, self.val_source = train, val, val_source
        self.train_tokens = int(sum(len(s) for s in train))
        self.val_tokens = int(sum(len(s) for s in val))

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path!r}, train_tokens={self.train_tokens:,}, "
                f"val_tokens={self.val_tokens:,} ({self.val_source}), tokenizer={self.tokenizer})")

    def check_vocab(self, model_vocab_size: int) -> None:
        """Every id in the data is < vocab_size (checked at prepare time), so a model vocab at least
        the tokenizer's is safe (padding rows are fine) and a smaller one is always an error."""
        if model_vocab_size < self.vocab_size:
            raise UserError(
                f"model vocab_size {model_vocab_size} is smaller than the dataset's {self.tokenizer} "
                f"vocab {self.vocab_size} ({self.path}); use vocab_size >= {self.vocab_size} "
                "or prepare the data with the model's tokenizer")

    def fingerprint(self) -> str:
        """Content digest of these train/val segments (see fingerprint.py): recorded in every checkpoint."""
        return dataset_fingerprint(self.path, self.train, self.val)

    def windows(self, seq_len: int) -> int:
        return int(_window_counts(self.train, seq_len).sum())

    def check_enough(self, batch_size: int, seq_len: int, world_size: int = 1) -> None:
        need = batch_size * world_size
        have = self.windows(seq_len)
        if have < need:
            raise UserError(
                f"{self.path} has {self.train_tokens:,} training tokens = {have} windows of {seq_len} "
                f"tokens, fewer than one batch of {need}; lower the batch size or seq_len, or prepare "
                "more data with prepare_fineweb.py --tokens")


def _window_counts(segments: list[np.ndarray], seq_len: int) -> np.ndarray:
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    return np.array([max(0, (len(s) - 1) // seq_len) for s in segments], dtype=np.int64)


def _memmap(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; restore it or re-run prepare_fineweb.py") from None
    except Exception as e:  # numpy raises ValueError/OSError/EOFError variants for junk files
        raise UserError(f"shard {path} is not a readable .npy ({e}); re-run prepare_fineweb.py") from None
    if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32):
        raise UserError(f"shard {path} is {arr.dtype} with shape {arr.shape}; expected a 1-D uint16/uint32 "
                        "token array (re-run prepare_fineweb.py)")
    return arr


def _max_id(arr: np.ndarray) -> int:
    """Largest token id in a shard, read in chunks (a 2 GB memmap never becomes a 2 GB array)."""
    chunk = 1 << 26
    return max((int(arr[i: i + chunk].max()) for i in range(0, len(arr), chunk)), default=-1)


def _check_ids(path: Path, arr: np.ndarray, max_id: int | None, vocab: int, where: str) -> None:
    """Every id must index the embedding: an id >= vocab would crash mid-run (or train on garbage rows).
    `where` names what set the vocab (a manifest, a .meta file, --vocab-size)."""
    mx = _max_id(arr) if max_id is None else max_id
    if mx >= vocab:
        raise UserError(f"shard {path} holds token id {mx} but {where} says vocab_size {vocab}; the shard was "
                        "made with another tokenizer or the vocab is wrong: re-run prepare_fineweb.py for it, "
                        f"or correct the vocab_size in {where}")


def _open_manifest_dir(d: Path) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    m = read_manifest(d / MANIFEST)
    parts = []
    for s in m["shards"]:
        arr = _memmap(d / s["file"])
        # prepare records each shard's largest id; older manifests do not, so those shards are scanned once.
        recorded = s.get("max_token_id", s.get("max_id"))
        _check_ids(d / s["file"], arr, recorded if isinstance(recorded, int) else None, m["vocab_size"],
                   str(d / MANIFEST))
        if str(arr.dtype) != m["dtype"]:
            raise UserError(f"shard {d / s['file']} is {arr.dtype} but the manifest says {m['dtype']}; "
                            "the dataset mixes shard dtypes: re-run prepare_fineweb.py into a new --output")
        if len(arr) != s["tokens"]:
            raise UserError(f"shard {d / s['file']} holds {len(arr):,} tokens but the manifest says "
                            f"{s['tokens']:,}; the dataset is inconsistent: re-run prepare_fineweb.py")
        parts.append((s["split"], arr))
    return m, parts


def _read_meta(meta_path: Path, vocab_size: int | None) -> dict:
    """The .meta beside a single-file dataset; a bare .npy works when the user gives --vocab-size."""
    try:
        meta = read_meta(meta_path)
    except FileNotFoundError:
        if vocab_size is None:
            raise UserError(f"{meta_path.with_suffix('')} has no {meta_path.name} to say its vocabulary; pass "
                            "--vocab-size (50257 for GPT-2 tokens) or write the meta file") from None
        return {"tokenizer": "unknown", "vocab_size": vocab_size}
    except OSError as e:
        raise UserError(f"cannot read {meta_path} ({e.strerror}); fix its permissions or pass --vocab-size") from None
    if vocab_size is not None and vocab_size < meta["vocab_size"]:
        raise UserError(f"--vocab-size {vocab_size} is below the {meta['vocab_size']} that {meta_path} records; "
                        f"drop --vocab-size or raise it to at least {meta['vocab_size']}")
    return meta


def _open_files(files: list[Path], where: str, vocab_size: int | None) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """Legacy x.npy (+ x.npy.meta) or a glob of shards (meta beside them or a manifest above)."""
    parent_manifest = files[0].parent / MANIFEST
    meta = read_manifest(parent_manifest) if parent_manifest.exists() else None
    parts, dtypes = [], set()
    for f in files:
        arr = _memmap(f)
        dtypes.add(str(arr.dtype))
        meta_path = parent_manifest if parent_manifest.exists() else f.with_name(f.name + ".meta")
        if meta is None:
            meta = _read_meta(meta_path, vocab_size)
        parts.append(("val" if f.name.startswith("val") else "train", arr))
    if len(dtypes) > 1:
        raise UserError(f"{where} mixes shard dtypes {sorted(dtypes)}; use shards from one prepare run")
    for f, (_, arr) in zip(files, parts, strict=True):  # no record of max ids in these layouts: scan
        _check_ids(f, arr, None, int(meta["vocab_size"]), str(meta_path) if meta_path.exists() else "--vocab-size")
    meta = dict(meta)
    meta["dtype"] = dtypes.pop()
    return meta, parts


def open_dataset(path: str | Path, val_frac: float = 0.0, require_val: bool = True,
                 vocab_size: int | None = None) -> TokenDataset:
    """Open a dataset dir (manifest.json), a legacy x.npy (+ x.npy.meta) or a glob of .npy shards.

    `vocab_size` (the trainer's --vocab-size) stands in for a missing .meta beside bare .npy files.
    Validation comes from val shards; without any, the last `val_frac` of the train tokens is
    carved off (deterministically); with neither, a UserError asks for --val-frac unless
    require_val=False.
    """
    spath = str(path)
    p = Path(spath)
    if any(c in spath for c in "*?["):
        files = [Path(f) for f in sorted(globmod.glob(spath)) if f.endswith(".npy")]
        if not files:
            raise UserError(f"no .npy files match {spath}; check the --data pattern")
        meta, parts = _open_files(files, spath, vocab_size)
    elif p.is_dir():
        if not (p / MANIFEST).exists():
            hint = f"pass a glob like '{p}/*.npy'" if list(p.glob("*.npy")) else "run prepare_fineweb.py"
            raise UserError(f"{p} has no {MANIFEST}; {hint} or point --data at a prepared dataset")
        meta, parts = _open_manifest_dir(p)
    elif p.is_file():
        if p.suffix != ".npy":
            raise UserError(f"{p} is not a dataset (.npy file or directory with {MANIFEST}); fix --data")
        meta, parts = _open_files([p], spath, vocab_size)
    else:
        raise UserError(f"dataset {p} does not exist; run prepare_fineweb.py --output {p} or fix --data")

    vocab, eot = int(meta["vocab_size"]), int(meta.get("eot_id", meta["vocab_size"] - 1))
    train = [a for s, a in parts if s == "train" and len(a)]
    val = [a for s, a in parts if s == "val" and len(a)]
    if not train:
        if meta.get("complete") is False:
            raise UserError(f"{spath} is still being prepared (no training shard yet); rerun the same "
                            "prepare_fineweb.py command to finish it")
        raise UserError(f"{spath} holds no training tokens; run prepare_fineweb.py with a larger --tokens")
    if not (0.0 <= val_frac < 1.0):
        raise UserError(f"--val-frac must be in [0, 1), got {val_frac}")
    val_source = "val shards"
    if not val and val_frac > 0:
        train, val = _carve_val(train, val_frac, spath)
        val_source = f"last {val_frac:g} of train"
    elif not val:
        val_source = "none"
        if require_val:
            raise UserError(f"{spath} has no validation shard; pass --val-frac (e.g. 0.005) to hold out the "
                            "end of the data, or prepare with --val-tokens")
    return TokenDataset(spath, str(meta.get("tokenizer", "unknown")), vocab, eot, str(meta["dtype"]),
                        train, val, val_source)


def _carve_val(train: list[np.ndarray], frac: float, where: str) -> tuple[list, list]:
    total = sum(len(a) for a in train)
    n_val = int(round(total * frac))
    if n_val < 2 or n_val >= total:
        raise UserError(f"--val-frac {frac} of {total:,} tokens in {where} leaves no usable validation or "
                        "training split; pick a val fraction that leaves both non-empty")
    train, val = list(train), []
    while n_val > 0:
        last = train.pop()
        take = min(n_val, len(last))
        val.insert(0, last[len(last) - take:])
        if take < len(last):
            train.append(last[: len(last) - take])
        n_val -= take
    return train, val


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
            counts = _window_counts(self.ds.train, seq_len)
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
        counts = _window_counts(ds.val, seq_len)
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
