"""What identifies a dataset's content cheaply, so a resume can tell "the same data" from "other data".

A fingerprint hashes the manifest (or legacy meta) bytes, every segment's length, and 64 tokens read at 16
evenly spaced places of each segment: a reshuffled, re-tokenized or swapped dataset with the same token count
differs in the samples; reading them costs a few page reads, not a scan.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pretrain.data.manifest import MANIFEST

_PLACES, _TOKENS = 16, 64


def _description_file(path: str) -> Path | None:
    p = Path(path)
    if p.is_dir():
        return p / MANIFEST
    if p.suffix == ".npy":
        return p.with_name(p.name + ".meta")
    return None  # a glob: the segments themselves say it all


def dataset_fingerprint(path: str, train: list[np.ndarray], val: list[np.ndarray]) -> str:
    """Hex digest of the dataset at `path` whose segments are `train` and `val` (after any --val-frac carve)."""
    h = hashlib.sha256()
    desc = _description_file(path)
    if desc is not None and desc.is_file():
        h.update(desc.read_bytes())
    for split, segments in (("train", train), ("val", val)):
        h.update(f"{split}:{len(segments)}".encode())
        for seg in segments:
            n = len(seg)
            h.update(f"{n}:".encode())
            for start in np.linspace(0, max(n - _TOKENS, 0), _PLACES).astype(np.int64).tolist():
                h.update(np.ascontiguousarray(seg[start: start + _TOKENS], dtype=np.uint32).tobytes())
    return h.hexdigest()[:32]
