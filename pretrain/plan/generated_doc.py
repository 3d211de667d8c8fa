"""The write-or-check tail every generated docs table shares (docs/tiers.md's estimates, docs/paper_presets.md):
`--check` exits 1 naming the command that regenerates an out-of-date file (tests run it), otherwise the file is
written atomically."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pretrain.errors import ArgumentParser, UserError
from pretrain.fsio import atomic_write_text


def generated_doc_main(argv: Sequence[str] | None, module: str, description: str, doc: Path,
                       render: Callable[[str], str]) -> int:
    """CLI of `python -m <module> [--check]`: `render(current text)` is the whole file as it should read."""
    p = ArgumentParser(prog=f"python -m {module}", description=description)
    p.add_argument("--check", action="store_true", help="only check that the generated text is current")
    args = p.parse_args(argv)
    current = doc.read_text() if doc.exists() else ""
    try:
        text = render(current)
    except UserError as e:  # e.g. a hand edit lost the markers the generated section sits between
        print(f"{doc}: {e}", file=sys.stderr)
        return 1
    if args.check:
        if current != text:
            print(f"{doc} is out of date: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(doc, text)
    print(f"wrote {doc}")
    return 0
