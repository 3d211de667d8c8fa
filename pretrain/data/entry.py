"""prepare's process entry and flags (prepare_fineweb.py, `pretrain-prepare`, `python -m pretrain.data`).

Stream FineWeb-Edu (or local parquet/jsonl/json/txt files), tokenize, write .npy token shards.

    python prepare_fineweb.py --tokens 1B --output data/fineweb_1b
    python prepare_fineweb.py --tokens 200K --source notes/*.txt --output data/notes

Rerunning the same command continues an interrupted run; a larger --tokens extends the dataset.
The work happens in pretrain/data/prepare.py (its docstring explains shards and resume).
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence

from pretrain.errors import ArgumentParser, UserError


def _count(text: str) -> int:
    from pretrain.schedule import parse_count

    try:
        return parse_count(text, "token count")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers must be a whole number >= 1, got {text!r}")
    return n


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="prepare_fineweb.py", description=__doc__.split("\n\n")[1],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=_count, required=True, help="total tokens to write (val + train): 500K, 1B, ...")
    p.add_argument("--output", required=True, help="dataset directory, or x.npy for the older single-file layout")
    p.add_argument("--source", nargs="+", default=["HuggingFaceFW/fineweb-edu"],
                   help="Hugging Face dataset name (streamed) or local files / directories / globs")
    p.add_argument("--name", default="sample-10BT", help="dataset config name (Hugging Face sources only)")
    p.add_argument("--split", default="train", help="dataset split (Hugging Face sources only)")
    p.add_argument("--text-column", default="text", help="column / JSON field holding the document text")
    p.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding name or path to a .tiktoken file")
    p.add_argument("--shard-tokens", type=_count, default=100_000_000, help="tokens per shard file")
    p.add_argument("--val-tokens", type=_count, default=None,
                   help="validation tokens, written first (default: 10M, at most 10%% of --tokens)")
    p.add_argument("--workers", type=_workers, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
                   help="live bar on a terminal, plain lines otherwise")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv and prepare the dataset; 0 on success (UserError / Ctrl-C are handled by run_cli)."""
    # SIGTERM (a preempted instance, a group kill) ends like Ctrl-C from the first moment, imports included:
    # one "interrupted" line and exit 130, never a silent death by signal.
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        args = build_parser().parse_args(argv)
        from pretrain.data.prepare import prepare

        prepare(args.tokens, args.output, source=args.source, name=args.name, split=args.split,
                text_column=args.text_column, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
                val_tokens=args.val_tokens, workers=args.workers, progress=args.progress)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
    return 0
