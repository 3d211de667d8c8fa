"""Resolve --tokenizer to a tiktoken encoding, offline for GPT-2.

GPT-2's ranks ship inside the package (`assets/gpt2.tiktoken`, see assets/PROVENANCE.md), so "gpt2"
(and its twin "r50k_base", same ids) needs no network and no flag. A path to a `.tiktoken` file is accepted
when it holds those same ranks (checked by sha256). Other tiktoken encodings ("cl100k_base", "o200k_base",
...) come from `tiktoken.get_encoding`, which downloads once into tiktoken's cache. Only tiktoken's public
API is used: `load_tiktoken_bpe` + `tiktoken.Encoding` with tiktoken's own `r50k_pat_str`, so ids are
identical to `tiktoken.get_encoding("gpt2")`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from pretrain.errors import UserError

EOT = "<|endoftext|>"
GPT2_RANKS = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT, GPT2_VOCAB = 50256, 50257
GPT2_NAMES = ("gpt2", "r50k_base")
OFFLINE_VARS = ("TIKTOKEN_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Tokenizer:
    """A resolved encoding; small and picklable so tokenizer worker processes rebuild it themselves."""

    name: str
    ranks_path: str | None  # GPT-2 ranks file; None: tiktoken.get_encoding(name) (already cached)
    eot_id: int
    vocab_size: int

    def build(self) -> tiktoken.Encoding:
        if self.ranks_path is None:
            return tiktoken.get_encoding(self.name)
        ranks = load_tiktoken_bpe(self.ranks_path, expected_hash=GPT2_SHA256)
        return tiktoken.Encoding(self.name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gpt2(path: Path) -> Tokenizer:
    return Tokenizer("gpt2", str(path.resolve()), GPT2_EOT, GPT2_VOCAB)


def _downloaded(name: str) -> Tokenizer:
    offline = [v for v in OFFLINE_VARS if os.environ.get(v, "") not in ("", "0")]
    try:
        enc = tiktoken.get_encoding(name)
    except ValueError:  # tiktoken's "Unknown encoding"
        raise UserError(f"unknown tokenizer '{name}'; use gpt2 (ships with this repo), another tiktoken "
                        f"encoding ({', '.join(tiktoken.list_encoding_names())}) or a path to a .tiktoken "
                        "file") from None
    except Exception as e:  # no network / no cache: requests, OSError, ...
        why = f"{offline[0]} is set" if offline else f"downloading it failed ({type(e).__name__})"
        raise UserError(f"tokenizer '{name}' is not in tiktoken's cache and {why}; run once with network "
                        "(or set TIKTOKEN_CACHE_DIR to a cache that holds it), or use --tokenizer gpt2, "
                        "which works offline") from None
    if enc.eot_token is None:
        raise UserError(f"tokenizer '{name}' has no {EOT} token to separate documents; use gpt2")
    return Tokenizer(name, None, enc.eot_token, enc.n_vocab)


def resolve_tokenizer(spec: str) -> Tokenizer:
    """'gpt2' / 'cl100k_base' / ... or a path to GPT-2's .tiktoken ranks file -> Tokenizer."""
    path = Path(spec).expanduser()
    if spec.endswith(".tiktoken") or path.is_file():
        if not path.is_file():
            raise UserError(f"tokenizer file {spec} does not exist; fix --tokenizer (gpt2 needs no file)")
        if _sha256(path) != GPT2_SHA256:
            raise UserError(f"{spec} is not GPT-2's ranks file (sha256 {GPT2_SHA256[:12]}...); pass "
                            "--tokenizer gpt2 (shipped) or another tiktoken encoding by name")
        return _gpt2(path)
    if spec in GPT2_NAMES:
        if not GPT2_RANKS.is_file() or _sha256(GPT2_RANKS) != GPT2_SHA256:
            raise UserError(f"{GPT2_RANKS} is missing or damaged; restore it from git "
                            f"(git checkout -- {GPT2_RANKS.name}) or reinstall the package")
        return _gpt2(GPT2_RANKS)
    return _downloaded(spec)
