"""Load tiktoken encodings without the network when the ranks file is already on disk.

`tiktoken.get_encoding("gpt2")` always wants to download. Here a name ("gpt2", "cl100k_base", ...)
is resolved to a local ranks file first: tiktoken's own cache (TIKTOKEN_CACHE_DIR / DATA_GYM_CACHE_DIR,
files named by the sha1 of the download URL), then known locations (`data/` in the repo,
`../shared/data/`); only then, unless offline, is it downloaded (into tiktoken's cache). A path to a
`.tiktoken` file works too; it is identified by its sha256. Patterns and special tokens come from
tiktoken's own definitions, so ids are identical to `get_encoding(name)`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import tiktoken
from tiktoken_ext import openai_public

from pretrain.cli import UserError

ROOT = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"
URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
# sha256 of each ranks file, and which file holds an encoding's ranks (gpt2 == r50k_base ids).
RANKS_SHA256 = {
    "r50k_base": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "p50k_base": "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
RANKS_OF = {"gpt2": "r50k_base", "r50k_base": "r50k_base", "p50k_base": "p50k_base",
            "p50k_edit": "p50k_base", "cl100k_base": "cl100k_base", "o200k_base": "o200k_base",
            "o200k_harmony": "o200k_base"}
FILE_NAMES = {"r50k_base": ("r50k_base.tiktoken", "gpt2.tiktoken")}
OFFLINE_VARS = ("TIKTOKEN_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Tokenizer:
    """A resolved encoding: name, local ranks file and tiktoken's definition (picklable for workers)."""

    name: str
    ranks_path: str
    pat_str: str
    special_tokens: dict[str, int]
    explicit_n_vocab: int | None = None

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    def build(self) -> tiktoken.Encoding:
        ranks = {}
        for line in Path(self.ranks_path).read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        return tiktoken.Encoding(self.name, pat_str=self.pat_str, mergeable_ranks=ranks,
                                 special_tokens=self.special_tokens, explicit_n_vocab=self.explicit_n_vocab)


def _definition(name: str) -> dict:
    """tiktoken's constructor for `name`, with its (network) rank loaders stubbed out."""
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: {}), \
         mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {}):
        d = openai_public.ENCODING_CONSTRUCTORS[name]()
    return {"pat_str": d["pat_str"], "special_tokens": dict(d["special_tokens"]),
            "explicit_n_vocab": d.get("explicit_n_vocab")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_dir() -> Path | None:
    d = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if d == "":
        return None  # tiktoken's "caching disabled"
    return Path(d) if d else Path(tempfile.gettempdir()) / "data-gym-cache"


def _candidates(base: str) -> list[Path]:
    out = []
    cache = _cache_dir()
    if cache is not None:
        out.append(cache / hashlib.sha1(URL.format(base).encode()).hexdigest())
    for d in (ROOT / "data", ROOT.parent / "shared" / "data"):
        out += [d / f for f in FILE_NAMES.get(base, (f"{base}.tiktoken",))]
    return out


def _find_or_download(name: str, base: str) -> Path:
    for p in _candidates(base):
        if p.is_file() and _sha256(p) == RANKS_SHA256[base]:
            return p
    files = " or ".join(FILE_NAMES.get(base, (f"{base}.tiktoken",)))
    fix = f"pass --tokenizer path/to/{files} or set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds it"
    offline = [v for v in OFFLINE_VARS if os.environ.get(v, "") not in ("", "0")]
    if offline:
        raise UserError(f"tokenizer '{name}' ranks file not found locally and {offline[0]} is set; {fix}")
    try:
        from tiktoken.load import read_file_cached
        read_file_cached(URL.format(base), RANKS_SHA256[base])
    except Exception as e:
        raise UserError(f"tokenizer '{name}' is not on disk and downloading it failed "
                        f"({type(e).__name__}); {fix}") from None
    for p in _candidates(base):
        if p.is_file():
            return p
    raise UserError(f"tokenizer '{name}' downloaded but tiktoken caching is disabled; {fix}")


def resolve_tokenizer(spec: str) -> Tokenizer:
    """'gpt2' / 'cl100k_base' / ... or a path to a .tiktoken ranks file -> Tokenizer."""
    path = Path(spec).expanduser()
    if spec.endswith(".tiktoken") or path.is_file():
        if not path.is_file():
            raise UserError(f"tokenizer file {spec} does not exist; fix --tokenizer")
        digest = _sha256(path)
        bases = [b for b, h in RANKS_SHA256.items() if h == digest]
        if not bases:
            raise UserError(f"{spec} is not a known tiktoken ranks file ({', '.join(RANKS_SHA256)}); "
                            "pass one of those or an encoding name with --tokenizer")
        name = "gpt2" if bases[0] == "r50k_base" else bases[0]  # gpt2 and r50k_base give the same ids
        return Tokenizer(name, str(path.resolve()), **_definition(name))
    if spec not in RANKS_OF:
        raise UserError(f"unknown tokenizer '{spec}'; use one of {', '.join(RANKS_OF)} or a path to a "
                        ".tiktoken file")
    return Tokenizer(spec, str(_find_or_download(spec, RANKS_OF[spec]).resolve()), **_definition(spec))
