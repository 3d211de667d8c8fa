"""Test environment: offline, caches in a temp dir, few threads (CI has 2 cores)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
GPT2_RANKS = SHARED_DATA / "gpt2.tiktoken"
FINEWEB_SAMPLE = SHARED_DATA / "fineweb-sample" / "sample" / "10BT"

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
    "MPLBACKEND": "Agg",
    # One thread: OpenMP barriers spin badly when the other core is busy (subprocess runs, CI).
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ[key] = value

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def sample_texts(limit_chars: int | None = None) -> list[str]:
    """Documents of the shared FineWeb-Edu-layout sample, in file order."""
    import pyarrow.parquet as pq

    texts: list[str] = []
    total = 0
    for f in sorted(FINEWEB_SAMPLE.glob("*.parquet")):
        for t in pq.read_table(f, columns=["text"]).column("text").to_pylist():
            texts.append(t)
            total += len(t)
            if limit_chars is not None and total >= limit_chars:
                return texts
    return texts


def write_legacy_dataset(path: Path, tokens: np.ndarray, vocab_size: int, eot_id: int, tokenizer: str) -> Path:
    """The older single-file layout: x.npy + x.npy.meta (validation carved with --val-frac)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tokens.astype(np.uint16 if vocab_size <= 2**16 else np.uint32))
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot_id}
    Path(str(path) + ".meta").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    """~600K byte-level tokens (vocab 256) of the shared sample: fast to train on, for loop mechanics."""
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
    """~400K GPT-2 tokens of the shared sample, each document preceded by EOT."""
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
