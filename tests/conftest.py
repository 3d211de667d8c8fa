"""Test environment: offline, caches in a temp dir, few threads (CI has 2 cores).

Test data comes from the repo alone: GPT-2 ranks ship in pretrain/data/assets, and the raw texts are the
documents of the embedded data/sample dataset decoded back to text (public domain, see its PROVENANCE.md),
so a clone with nothing beside it and no network runs every test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_RANKS = ROOT / "pretrain" / "data" / "assets" / "gpt2.tiktoken"
SAMPLE_DATASET = ROOT / "data" / "sample"

_cache = Path(tempfile.mkdtemp(prefix="pretrain-test-cache-"))
for key, value in {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HOME": str(_cache / "hf"),
    "TIKTOKEN_CACHE_DIR": str(_cache / "tiktoken"),
    "WANDB_DIR": str(_cache / "wandb"),
    "WANDB_CACHE_DIR": str(_cache / "wandb-cache"),
    "WANDB_CONFIG_DIR": str(_cache / "wandb-config"),
    "TORCHINDUCTOR_CACHE_DIR": str(_cache / "inductor"),
    "PRETRAIN_CACHE_DIR": str(_cache / "pretrain"),  # the plan's memory estimates: never the user's cache
    "MPLBACKEND": "Agg",
    # One thread: OpenMP barriers spin badly when the other core is busy (subprocess runs, CI).
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ[key] = value

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import errno  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@functools.cache
def _sample_docs() -> tuple[str, ...]:
    """The ~2,950 documents of data/sample as text: its token stream split at EOT and decoded."""
    from pretrain.data.tokenizer import resolve_tokenizer

    enc = resolve_tokenizer("gpt2").build()
    stream = np.concatenate([np.load(SAMPLE_DATASET / f) for f in ("val_000000.npy", "train_000000.npy")])
    cuts = np.flatnonzero(stream == 50256).tolist() + [len(stream)]
    return tuple(enc.decode(stream[a + 1: b].tolist()) for a, b in zip(cuts, cuts[1:]))


def sample_texts(limit_chars: int | None = None) -> list[str]:
    """Documents of the embedded sample, in order; with limit_chars, just enough to reach it."""
    texts: list[str] = []
    total = 0
    for t in _sample_docs():
        texts.append(t)
        total += len(t)
        if limit_chars is not None and total >= limit_chars:
            break
    return texts


@functools.cache
def sample_parquet_dir() -> Path:
    """The sample's documents as two parquet files in FineWeb-Edu's layout (text, id, url; 6 row groups
    each), written once per session: what prepare tests read as a local or streamed source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _cache / "fineweb-sample" / "sample" / "10BT"
    d.mkdir(parents=True, exist_ok=True)
    docs = _sample_docs()
    half = len(docs) // 2
    for k, part in enumerate((docs[:half], docs[half:])):
        ids = [f"<urn:sample:{k}:{i}>" for i in range(len(part))]
        table = pa.table({"text": list(part), "id": ids, "url": [f"https://example.org/{i}" for i in ids]})
        pq.write_table(table, d / f"{k:03d}_00000.parquet", row_group_size=-(-len(part) // 6))
    return d


def write_legacy_dataset(path: Path, tokens: np.ndarray, vocab_size: int, eot_id: int, tokenizer: str) -> Path:
    """The older single-file layout: x.npy + x.npy.meta (validation carved with --val-frac)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tokens.astype(np.uint16 if vocab_size <= 2**16 else np.uint32))
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot_id}
    Path(str(path) + ".meta").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    """~600K byte-level tokens (vocab 256) of the sample texts: fast to train on, for loop mechanics."""
    text = "\x00".join(sample_texts(600_000))
    tokens = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
    return write_legacy_dataset(tmp_path_factory.mktemp("bytes") / "bytes.npy", tokens, 256, 0, "bytes")


@pytest.fixture(scope="session")
def gpt2_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(GPT2_RANKS))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="session")
def gpt2_data(tmp_path_factory, gpt2_encoding) -> Path:
    """~400K GPT-2 tokens of the sample texts, each document preceded by EOT."""
    docs = gpt2_encoding.encode_ordinary_batch(sample_texts(1_600_000))
    tokens = np.concatenate([np.array([50256] + d, dtype=np.uint16) for d in docs])
    return write_legacy_dataset(tmp_path_factory.mktemp("gpt2") / "gpt2.npy", tokens, 50257, 50256, "gpt2")


@pytest.fixture(scope="session")
def made_bytes(tmp_path_factory) -> Path:
    """~200K byte-level tokens of made-up sentences: needs nothing beside the repo (CI runs a bare clone)."""
    rng = np.random.default_rng(0)
    words = ("the a one old new small great king land water light day night man god people house "
             "said came went made saw gave took was is are and of to in for with from upon").split()
    lines = [" ".join(rng.choice(words, size=rng.integers(5, 14))).capitalize() + "." for _ in range(5000)]
    tokens = np.frombuffer("\n".join(lines).encode(), dtype=np.uint8)
    return write_legacy_dataset(tmp_path_factory.mktemp("made") / "bytes.npy", tokens, 256, 0, "bytes")


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
