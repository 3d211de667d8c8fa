"""GPT-2 tokenizer files for Hugging Face (tokenizer.json, vocab.json, merges.txt, configs), built from the
tiktoken ranks, offline.

An exported model is only usable in `transformers` with its tokenizer beside it. tiktoken's ranks file holds
every token's bytes and rank; GPT-2's BPE files hold the same vocabulary with each byte mapped to a printable
character, and the merge list. A token of rank r is the one merge that BPE, allowed only merges of rank < r,
leaves as exactly two parts, so the merges are recovered by running that restricted BPE on each token.
`tokenizer.json` (what `AutoTokenizer` loads as a fast tokenizer) is the same vocabulary and merges in the
`tokenizers` library's byte-level BPE, whose pre-tokenizer regex is GPT-2's (tiktoken's r50k_pat_str), so its
ids equal tiktoken's. GPT-2 has no padding token; <|endoftext|> stands in (batched generation, lm-eval).
"""

from __future__ import annotations

import json
from pathlib import Path

from tiktoken.load import load_tiktoken_bpe

from pretrain.data.tokenizer import EOT, resolve_tokenizer

FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SUPPORTED = ("gpt2", "r50k_base")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of `token` using only merges ranked below max_rank (lowest rank merges first, as tiktoken does)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that rebuilds every multi-byte token of a tiktoken ranks table."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _merge_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _write_fast(path: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> bool:
    """tokenizer.json: byte-level BPE with GPT-2's pre-tokenizer, <|endoftext|> a special token. False when the
    `tokenizers` library (installed with transformers) is missing: the slow files still load."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        return False

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    tok.save(str(path))
    return True


def write_hf_tokenizer(out: Path, tokenizer: str, model_max_length: int) -> list[str]:
    """Write GPT-2 BPE files that `AutoTokenizer.from_pretrained(out)` reads offline (fast); the files written.

    Only GPT-2 (r50k) vocabularies are written; for another tokenizer nothing is written (returns [])."""
    if tokenizer not in SUPPORTED:
        return []
    tok = resolve_tokenizer(tokenizer)
    ranks = load_tiktoken_bpe(tok.ranks_path)
    char = bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    vocab[EOT] = tok.eot_id
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    out.mkdir(parents=True, exist_ok=True)
    fast = _write_fast(out / "tokenizer.json", vocab, merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, "add_bos_token": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [f for f in FILES if fast or f != "tokenizer.json"]
