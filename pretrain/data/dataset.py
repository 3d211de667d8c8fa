"""Opening a token dataset: a prepared directory (manifest + shards) or .npy files, validated before any step
runs (readable shards, ids below the vocab, enough windows for a batch), with the validation split taken from
the manifest or carved off the end with --val-frac. pretrain/data/loader.py serves its windows.
"""

from __future__ import annotations

import glob as globmod
from pathlib import Path

import numpy as np

from pretrain.data.fingerprint import dataset_fingerprint
from pretrain.data.manifest import MANIFEST, read_manifest, read_meta
from pretrain.data.shards import Segment, Shard
from pretrain.errors import UserError
from pretrain.fsio import regular_file_problem


class TokenDataset:
    """Train and validation token segments (read with pread, see shards.py) plus tokenizer facts."""

    def __init__(self, path: str, tokenizer: str, vocab_size: int, eot_id: int, dtype: str,
                 train: list[Segment], val: list[Segment], val_source: str) -> None:
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
        return int(window_counts(self.train, seq_len).sum())

    def check_enough(self, batch_size: int, seq_len: int, world_size: int = 1) -> None:
        need = batch_size * world_size
        have = self.windows(seq_len)
        if have < need:
            raise UserError(
                f"{self.path} has {self.train_tokens:,} training tokens = {have} windows of {seq_len} "
                f"tokens, fewer than one batch of {need}; lower the batch size or seq_len, or prepare "
                "more data with prepare_fineweb.py --tokens")


def window_counts(segments: list[Segment], seq_len: int) -> np.ndarray:
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    return np.array([max(0, (len(s) - 1) // seq_len) for s in segments], dtype=np.int64)


def _check_ids(shard: Shard, max_id: int | None, vocab: int, where: str) -> None:
    """Every id must index the embedding: an id >= vocab would crash mid-run (or train on garbage rows).
    `where` names what set the vocab (a manifest, a .meta file, --vocab-size). From here on every read of the
    shard checks its ids again (shards.py): a recorded max_token_id that lies is caught when the batch is read."""
    mx = shard.max_id() if max_id is None else max_id
    if mx >= vocab:
        raise UserError(f"shard {shard.path} holds token id {mx} but {where} says vocab_size {vocab}; the shard "
                        "was made with another tokenizer or the vocab is wrong: re-run prepare_fineweb.py for it, "
                        f"or correct the vocab_size in {where}")
    shard.set_vocab(vocab, where)


def _open_manifest_dir(d: Path) -> tuple[dict, list[tuple[str, Segment]]]:
    m = read_manifest(d / MANIFEST)
    parts = []
    for s in m["shards"]:
        arr = Shard(d / s["file"])
        # prepare records each shard's largest id; older manifests do not, so those shards are scanned once.
        recorded = s.get("max_token_id", s.get("max_id"))
        _check_ids(arr, recorded if isinstance(recorded, int) else None, m["vocab_size"], str(d / MANIFEST))
        if str(arr.dtype) != m["dtype"]:
            raise UserError(f"shard {d / s['file']} is {arr.dtype} but the manifest says {m['dtype']}; "
                            "the dataset mixes shard dtypes: re-run prepare_fineweb.py into a new --output")
        if len(arr) != s["tokens"]:
            raise UserError(f"shard {d / s['file']} holds {len(arr):,} tokens but the manifest says "
                            f"{s['tokens']:,}; the dataset is inconsistent: re-run prepare_fineweb.py")
        parts.append((s["split"], Segment(arr)))
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


def _open_files(files: list[Path], where: str, vocab_size: int | None) -> tuple[dict, list[tuple[str, Segment]]]:
    """Legacy x.npy (+ x.npy.meta) or a glob of shards (meta beside them or a manifest above)."""
    parent_manifest = files[0].parent / MANIFEST
    meta = read_manifest(parent_manifest) if parent_manifest.exists() else None
    parts, dtypes = [], set()
    for f in files:
        arr = Shard(f)
        dtypes.add(str(arr.dtype))
        meta_path = parent_manifest if parent_manifest.exists() else f.with_name(f.name + ".meta")
        if meta is None:
            meta = _read_meta(meta_path, vocab_size)
        parts.append(("val" if f.name.startswith("val") else "train", Segment(arr)))
    if len(dtypes) > 1:
        raise UserError(f"{where} mixes shard dtypes {sorted(dtypes)}; use shards from one prepare run")
    for _, seg in parts:  # no record of max ids in these layouts: scan
        _check_ids(seg.shard, None, int(meta["vocab_size"]), str(meta_path) if meta_path.exists() else "--vocab-size")
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
    elif p.exists() and not p.is_file():  # a FIFO or a device: opening it would block or never end
        raise UserError(f"{regular_file_problem(p)}; point --data at a prepared dataset or a .npy file")
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


def _carve_val(train: list[Segment], frac: float, where: str) -> tuple[list, list]:
    total = sum(len(a) for a in train)
    n_val = int(round(total * frac))
    if n_val < 2 or n_val >= total:
        raise UserError(f"--val-frac {frac} of {total:,} tokens in {where} leaves no usable validation or "
                        "training split; pick a val fraction that leaves both non-empty")
    train, val = list(train), []
    while n_val > 0:
        last = train.pop()
        take = min(n_val, len(last))
        val.insert(0, last.sub(len(last) - take, len(last)))
        if take < len(last):
            train.append(last.sub(0, len(last) - take))
        n_val -= take
    return train, val
