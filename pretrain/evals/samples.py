"""Text samples from the model during training: a few fixed prompts, greedy and temperature-sampled.

Reading what the model writes catches what a loss curve hides (repetition loops, a broken tokenizer,
a variant that learned only local statistics). Prompts are fixed for the whole run, and the sampling
RNG is seeded per prompt, so the same step always produces the same text and two variants see the
same prompts. Also holds the text codec (token ids <-> text) the generate CLI and downstream eval use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain import stopping
from pretrain.errors import UserError

DEFAULT_PROMPTS = (
    "The meaning of life is",
    "In the beginning",
    "A computer program is",
    "The best way to learn is",
)


@dataclass
class TextCodec:
    """Token ids <-> text for a dataset's tokenizer: "bytes" (UTF-8 bytes) or a tiktoken encoding."""

    name: str
    vocab_size: int
    encoding: Any = None  # tiktoken.Encoding; None for bytes

    def encode(self, text: str) -> list[int]:
        if self.encoding is None:
            return list(text.encode("utf-8"))
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        if self.encoding is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.encoding.decode([i for i in ids if i < self.encoding.n_vocab], errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes (streaming prints these: a UTF-8 character may span several tokens)."""
        if self.encoding is None:
            return bytes(i for i in ids if i < 256)
        return self.encoding.decode_bytes([i for i in ids if i < self.encoding.n_vocab])


def text_codec(tokenizer: str, vocab_size: int) -> TextCodec:
    """The codec of a dataset's tokenizer name; UserError when it cannot be loaded."""
    if tokenizer == "bytes" or (tokenizer == "unknown" and vocab_size <= 256):
        return TextCodec("bytes", vocab_size)
    from pretrain.data.tokenizer import resolve_tokenizer

    try:
        encoding = resolve_tokenizer(tokenizer).build()
    except UserError as e:
        raise UserError(f"cannot turn tokens into text: {e}") from None
    return TextCodec(tokenizer, vocab_size, encoding)


def load_prompts(path: str | None) -> list[str]:
    """One prompt per non-empty line of `path`, or the defaults; UserError for a missing/empty file."""
    if not path:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--sample-prompts {path}: no such file; pass a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    prompts = [x for x in prompts if x]
    if not prompts:
        raise UserError(f"--sample-prompts {path} holds no prompts; write one prompt per line")
    return prompts


@torch.no_grad()
def write_samples(model: torch.nn.Module, codec: TextCodec, prompts: list[str], max_new_tokens: int,
                  temperature: float, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """For each prompt: a greedy and a temperature continuation (KV-cache generate). The global RNG is
    left as it was, so sampling never changes the training run's random stream (exact resume)."""
    was_training = model.training
    model.eval()
    rows = []
    cpu_state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        # A stop request ends the sampling at once (the trainer's stopping.StopNow); the RNG is restored
        # below, outside the region, so the checkpoint then saved holds the training stream.
        with stopping.interruptible():
            for i, prompt in enumerate(prompts):
                ids = codec.encode(prompt) or [0]
                idx = torch.tensor([ids], dtype=torch.long, device=device)
                row: dict[str, Any] = {"prompt": prompt}
                for mode, temp in (("greedy", 0.0), ("sampled", temperature)):
                    torch.manual_seed(seed + i)
                    out = model.generate(idx, max_new_tokens, temperature=temp)
                    row[mode] = codec.decode(out[0, len(ids):].tolist())
                rows.append(row)
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        model.train(was_training)
    return rows


SAMPLE_COLUMNS = ("step", "prompt", "greedy", "sampled")  # the wandb table's columns, one row per prompt per round


def samples_table_rows(step: int, rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One sampling round as rows of the wandb samples table (SAMPLE_COLUMNS)."""
    return [[step, r["prompt"], r["greedy"], r["sampled"]] for r in rows]
