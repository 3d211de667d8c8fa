"""On-disk layout of a token dataset: manifest schema, dtype rule, atomic file writes.

Shared by the writer (`prepare.py`) and the reader (`data.py`) so both agree on one format; it
imports no torch so tokenizer worker processes start fast.

A dataset directory holds `manifest.json` and 1-D `.npy` shards of token ids named
`val_000000.npy, ..., train_000000.npy, ...`. The manifest (format "pretrain-tokens", version 1):

    tokenizer, vocab_size, eot_id, dtype ("uint16" when the vocab fits, else "uint32"),
    source {...}, shard_tokens, val_tokens, target_tokens, documents_consumed,
    complete, source_exhausted,
    shards: [{file, split ("val"|"train"), tokens, documents, max_token_id, end {...}}, ...]

`documents` counts the documents that *start* in a shard (= EOT tokens in it); `max_token_id` is the
largest id in the shard (readers check it against the model's vocab; older manifests call it `max_id`);
`end` is the source position just after the shard's last token (see prepare.py for how shard boundaries work).

The older single-file layout is `x.npy` plus `x.npy.meta`: JSON (tokenizer, vocab_size, eot_id, tokens,
...) as prepare writes it, or the original research code's `key: value` lines (tokens, documents,
encoding, vocab_size, source, format); `read_meta` reads both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError
from pretrain.fsio import atomic_write_bytes, fsync_dir, regular_file_problem

MANIFEST = "manifest.json"
FORMAT = "pretrain-tokens"
VERSION = 1
SPLITS = ("val", "train")
# The largest vocabulary a manifest or .meta may declare. Real tokenizers stay below ~300K ids; the trainer sizes
# the embedding from this number, so a corrupt or hostile 2**31 must stop here (it once asked for 550 GB).
MAX_VOCAB = 1 << 21


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every id below vocab_size."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a temp file + fsync + rename (a kill -9 never leaves a truncated shard)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: give the space back at once
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _need(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise UserError(f"corrupt manifest {where}: {what}; re-run prepare_fineweb.py into a new --output")


def read_manifest(path: Path) -> dict:
    """Parse and schema-check a manifest.json (files are checked by the reader that opens them)."""
    path = Path(path)
    try:
        if why := regular_file_problem(path):  # a FIFO would block read_text forever
            raise UserError(f"{why}; re-run prepare_fineweb.py into a new --output")
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"cannot read {path} ({type(e).__name__}: {e}); re-run prepare_fineweb.py into a new --output"
        ) from None
    _need(isinstance(m, dict), path, "not a JSON object")
    _need(m.get("format") == FORMAT, path, f"'format' is {m.get('format')!r}, expected {FORMAT!r}")
    _need(m.get("version") == VERSION, path, f"unsupported version {m.get('version')!r}")
    for key in ("vocab_size", "eot_id"):
        _need(isinstance(m.get(key), int) and m[key] >= 0, path, f"'{key}' missing or not an integer")
    _need(isinstance(m.get("tokenizer"), str), path, "'tokenizer' missing")
    _need(m.get("dtype") in ("uint16", "uint32"), path, f"'dtype' is {m.get('dtype')!r}")
    _need(m["eot_id"] < m["vocab_size"], path, "eot_id is not below vocab_size")
    _need(m["vocab_size"] <= MAX_VOCAB, path, f"vocab_size {m['vocab_size']:,} is beyond any tokenizer's "
          f"(at most {MAX_VOCAB:,})")
    _need(
        m["vocab_size"] <= np.iinfo(m["dtype"]).max + 1, path, f"vocab {m['vocab_size']} overflows {m['dtype']}"
    )
    shards = m.get("shards")
    _need(isinstance(shards, list), path, "'shards' missing")
    for i, s in enumerate(shards):
        _need(isinstance(s, dict), path, f"shard #{i} is not an object")
        f = s.get("file")
        _need(isinstance(f, str) and f and "/" not in f and "\\" not in f, path, f"shard #{i} has a bad file")
        _need(s.get("split") in SPLITS, path, f"shard {f} has split {s.get('split')!r}")
        _need(isinstance(s.get("tokens"), int) and s["tokens"] >= 0, path, f"shard {f} has bad 'tokens'")
        for key in ("max_token_id", "max_id"):
            mx = s.get(key)
            _need(mx is None or (isinstance(mx, int) and mx < m["vocab_size"]), path, f"shard {f} {key} >= vocab")
    return m


def _parse_meta(text: str) -> dict:
    """JSON object, or `key: value` lines (values that look like integers become ints)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        meta = json.loads(stripped)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    meta: dict[str, Any] = {}
    for line in stripped.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"line {line!r} is not 'key: value'")
        value = value.strip()
        meta[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return meta


def read_meta(path: Path) -> dict:
    """x.npy.meta -> {vocab_size, tokenizer, [eot_id, tokens, ...]}; FileNotFoundError when absent."""
    path = Path(path)
    if why := regular_file_problem(path):  # FileNotFoundError: caller decides; a FIFO would block read_text
        raise UserError(f"{why}; write the meta file as a regular file or re-run prepare_fineweb.py")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        meta = _parse_meta(text)
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        raise UserError(f"{path} is neither JSON nor 'key: value' lines ({e}); fix it or re-run "
                        "prepare_fineweb.py") from None
    if not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] <= 0:
        raise UserError(f"{path} has no integer vocab_size; add a line 'vocab_size: 50257' (GPT-2) or re-run "
                        "prepare_fineweb.py")
    if meta["vocab_size"] > MAX_VOCAB:
        raise UserError(f"{path} says vocab_size {meta['vocab_size']:,}, beyond any tokenizer's (at most "
                        f"{MAX_VOCAB:,}); correct it or re-run prepare_fineweb.py")
    if "tokenizer" not in meta and "encoding" in meta:  # the original code names it `encoding`
        meta["tokenizer"] = meta["encoding"]
    eot = meta.get("eot_id")
    if eot is not None and not (isinstance(eot, int) and 0 <= eot < meta["vocab_size"]):
        raise UserError(f"{path}: eot_id {eot!r} is not an id below vocab_size {meta['vocab_size']}; fix it")
    return meta
