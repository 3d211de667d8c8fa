"""Document sources for prepare: local parquet / jsonl / json / txt files, or a streamed HF dataset.

A source yields its documents in one fixed order, numbered from 0, in batches, and can restart at
any document number (`start`), optionally helped by a `hint` that an earlier batch returned (for
Hugging Face streaming: the IterableDataset state, so a resume re-reads at most one remote file
instead of everything before it). Rows without text are yielded as "" so numbering never shifts.

Local files: each --source argument is a file, a directory (searched recursively) or a glob, taken
in the order given and sorted within each. parquet/jsonl/json rows give one document each (json: a
list of objects, or JSON lines); a .txt file is one document. `.gz` variants are read too.
"""

from __future__ import annotations

import copy
import glob as globmod
import gzip
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from pretrain.errors import UserError

EXTENSIONS = (".parquet", ".jsonl", ".json", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class SourceError(UserError):
    """The source failed in a way a rerun may fix (network); prepare adds how far it got."""


@dataclass
class DocBatch:
    first: int  # document number of texts[0]
    texts: list[str]
    hint: dict | None  # lets the source restart cheaply at document first + len(texts)


class Source(Protocol):
    spec: dict  # JSON-able identity, stored in the manifest to refuse resuming from another source

    def check(self) -> None: ...  # fail early (before --output is touched) on a bad name/column

    def batches(self, start: int, hint: dict | None, max_chars: int) -> Iterator[DocBatch]: ...


def _open_text(path: Path) -> IO[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8", errors="replace")  # type: ignore[operator]


def unreadable(path: Path, e: BaseException, where: str = "") -> UserError:
    """A corrupt or truncated source file as one line naming it (pyarrow's own error is a long traceback)."""
    what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot read {path}{where}: {what}; the file is corrupt or truncated: replace it, or "
                     "remove it from --source")


class LocalFiles:
    """Documents from local files; restarting at document n skips whole files and parquet row
    groups using metadata, and only scans lines of the one jsonl file that holds n."""

    def __init__(self, files: list[Path], text_column: str) -> None:
        self.files, self.text_column = files, text_column
        self.spec = {"kind": "files", "files": [str(f) for f in files], "text_column": text_column}

    def check(self) -> None:
        for f in self.files:
            if f.name.lower().endswith(".parquet"):
                self._parquet(f, 0)

    def _parquet(self, path: Path, skip: int) -> Iterator[str] | int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise unreadable(path, e) from None
        n = pf.metadata.num_rows
        if skip >= n:
            return n
        if self.text_column not in pf.schema_arrow.names:
            raise UserError(f"{path} has no column '{self.text_column}' (columns: "
                            f"{', '.join(pf.schema_arrow.names)}); pass --text-column")
        kind = pf.schema_arrow.field(self.text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise UserError(f"{path} column '{self.text_column}' holds {kind}, not text; pass --text-column naming "
                            "the text column")

        def rows() -> Iterator[str]:
            left = skip
            for rg in range(pf.num_row_groups):
                rows_in = pf.metadata.row_group(rg).num_rows
                if left >= rows_in:
                    left -= rows_in
                    continue
                try:
                    col = pf.read_row_group(rg, columns=[self.text_column]).column(0).to_pylist()
                except (OSError, ValueError, pa.ArrowException) as e:
                    raise unreadable(path, e, f" (row group {rg})") from None
                for t in col[left:]:
                    yield t or ""
                left = 0
        return rows()

    def _json_lines(self, path: Path, skip: int) -> Iterator[str] | int:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):  # a JSON array of objects
            with _open_text(path) as f:
                rows = json.load(f)
            if skip >= len(rows):
                return len(rows)
            return (self._field(r, path, i + 1) for i, r in enumerate(rows) if i >= skip)
        count = 0
        with _open_text(path) as f:
            for line in f:
                count += bool(line.strip())
        if skip >= count:
            return count

        def rows_jl() -> Iterator[str]:
            i = 0
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if i >= skip:
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError:
                            raise UserError(f"{path} line {lineno} is not valid JSON; fix or remove "
                                            "that file from --source") from None
                        yield self._field(obj, path, lineno)
                    i += 1
        return rows_jl()

    def _field(self, obj: object, path: Path, where: int) -> str:
        if not isinstance(obj, dict) or self.text_column not in obj:
            raise UserError(f"{path} row {where} has no '{self.text_column}' field; pass --text-column")
        text = obj[self.text_column]
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path} row {where}: '{self.text_column}' is a {type(text).__name__}, not text; pass "
                            "--text-column naming the field that holds the document text")
        return text or ""

    def _docs(self, start: int) -> Iterator[str]:
        skip = start
        for f in self.files:
            name = f.name.lower()
            try:
                if name.endswith((".txt", ".txt.gz")):
                    if skip:
                        skip -= 1
                        continue
                    with _open_text(f) as fh:
                        yield fh.read()
                    continue
                rows = self._parquet(f, skip) if name.endswith(".parquet") else self._json_lines(f, skip)
                if isinstance(rows, int):
                    skip -= rows
                    continue
                skip = 0
                yield from rows
            except (OSError, EOFError, ValueError, zlib.error) as e:  # truncated .gz, bad JSON array, I/O error
                raise unreadable(f, e) from None

    def batches(self, start: int, hint: dict | None, max_chars: int) -> Iterator[DocBatch]:
        yield from _batched(self._docs(start), start, max_chars, lambda: None)


def _batched(docs: Iterator[str], first: int, max_chars: int, hint: Callable[[], dict | None],
             max_docs: int = 8192) -> Iterator[DocBatch]:
    texts: list[str] = []
    chars = 0
    for t in docs:
        texts.append(t)
        chars += len(t)
        if chars >= max_chars or len(texts) >= max_docs:
            yield DocBatch(first, texts, hint())
            first, texts, chars = first + len(texts), [], 0
    if texts:
        yield DocBatch(first, texts, hint())


class HubDataset:
    """A dataset streamed with `datasets` (Hub name, or a builder like "parquet" + data_files).
    Failing to connect at all is reported at once; errors once streaming has begun are retried with
    exponential backoff (a long prepare survives a network blip), then a SourceError."""

    def __init__(self, path: str, name: str | None, split: str, text_column: str,
                 data_files: list[str] | None = None, retries: int = 4, backoff: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path, self.name, self.split, self.text_column = path, name, split, text_column
        self.data_files, self.retries, self.backoff, self.sleep = data_files, retries, backoff, sleep
        self.spec = {"kind": "hub", "path": path, "name": name, "split": split, "text_column": text_column}
        if data_files:
            self.spec["data_files"] = list(data_files)

    def _load(self):  # -> datasets.IterableDataset
        import datasets

        offline = [v for v in OFFLINE_VARS if os.environ.get(v, "") not in ("", "0")]
        try:
            ds = datasets.load_dataset(self.path, name=self.name, split=self.split, streaming=True,
                                       data_files=self.data_files)
        except datasets.exceptions.DatasetNotFoundError as e:
            raise UserError(f"dataset '{self.path}' not found on the Hugging Face Hub or gated ({e}); check "
                            "--source, accept its terms and run `hf auth login`, or pass local files") from None
        except ConnectionError as e:
            if offline and not self.data_files:
                raise UserError(f"cannot stream '{self.path}': {offline[0]} is set (offline); unset it or "
                                "pass local parquet/jsonl/txt files with --source") from None
            raise e
        except ValueError as e:  # e.g. a config name (--name) or split that does not exist
            raise UserError(f"cannot load '{self.path}' name={self.name} split={self.split}: "
                            f"{str(e).splitlines()[0]}; fix --name/--split") from None
        cols = list(ds.features) if ds.features is not None else None
        if cols is not None and self.text_column not in cols:
            raise UserError(f"'{self.path}' has no column '{self.text_column}' (columns: {', '.join(cols)}); "
                            "pass --text-column")
        return ds.select_columns([self.text_column])

    def _stream(self, start: int, hint: dict | None, max_chars: int) -> Iterator[DocBatch]:
        ds = self._load()
        pos = 0
        if hint and hint.get("doc", start + 1) <= start:
            ds.load_state_dict(copy.deepcopy(hint["state"]))
            pos = hint["doc"]

        def docs() -> Iterator[str]:
            nonlocal pos
            for ex in ds:
                pos += 1
                if pos > start:
                    if self.text_column not in ex:  # a KeyError here would look like a network error
                        raise UserError(f"'{self.path}' rows have no '{self.text_column}' (columns: "
                                        f"{', '.join(ex)}); pass --text-column")
                    yield ex[self.text_column] or ""

        yield from _batched(docs(), start, max_chars,
                            lambda: {"doc": pos, "state": json.loads(json.dumps(ds.state_dict()))})

    def _retry(self, failures: int, e: Exception, start: int) -> None:
        """Sleep with exponential backoff before retry `failures`, or give up with a SourceError."""
        what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if failures > self.retries:
            raise SourceError(f"streaming '{self.path}' failed {failures} times in a row ({what}); check the "
                              "network") from None
        delay = min(self.backoff * 2 ** (failures - 1), 60.0)
        print(f"warning: streaming error at document {start:,} ({what}); retry {failures}/{self.retries} "
              f"in {delay:.0f}s", file=sys.stderr, flush=True)
        self.sleep(delay)

    def check(self) -> None:
        """Connect once. huggingface_hub already retries each request (~25 s in all); a second retry
        layer here made a machine with no network wait 2.5 minutes for the same answer."""
        try:
            self._load()
        except UserError:
            raise
        except Exception as e:  # network trouble surfaces as many types (OSError, httpx, fsspec, ...)
            what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise UserError(f"cannot reach the Hugging Face Hub to stream '{self.path}' ({what}); check the "
                            "network, or work offline: set HF_HUB_OFFLINE=1 and pass local parquet/jsonl/txt "
                            "files with --source") from None

    def batches(self, start: int, hint: dict | None, max_chars: int) -> Iterator[DocBatch]:
        failures = 0
        while True:
            try:
                for b in self._stream(start, hint, max_chars):
                    yield b
                    start, hint, failures = b.first + len(b.texts), b.hint, 0
                return
            except UserError:
                raise
            except Exception as e:  # network trouble surfaces as many types (OSError, httpx, fsspec, ...)
                failures += 1
                self._retry(failures, e, start)


def _expand(arg: str) -> list[Path]:
    p = Path(arg).expanduser()
    if any(c in arg for c in "*?["):
        found = sorted(Path(f) for f in globmod.glob(str(p), recursive=True))
    elif p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        found = [p] if p.is_file() else []
    # regular files only: a FIFO that matches a glob would block prepare on open
    return [f for f in found if f.name.lower().endswith(EXTENSIONS) and f.is_file()]


def is_local(arg: str) -> bool:
    return (any(c in arg for c in "*?[") or Path(arg).expanduser().exists()
            or arg.lower().endswith(EXTENSIONS) or arg.startswith((".", "/", "~")))


def open_source(args: list[str], name: str | None, split: str, text_column: str) -> Source:
    """--source values -> a Source: local files/dirs/globs, or one Hugging Face dataset name."""
    if not args:
        raise UserError("no --source given; pass a Hugging Face dataset name or local files")
    if not any(is_local(a) for a in args):
        if len(args) > 1:
            raise UserError(f"--source takes one Hugging Face dataset or local files, got {args}")
        return HubDataset(args[0], name, split, text_column)
    files: list[Path] = []
    for a in args:
        found = _expand(a)
        if not found:
            raise UserError(f"--source {a}: no such file, or no {'/'.join(EXTENSIONS)} files there; "
                            "fix the path or pattern")
        files += found
    return LocalFiles([f.resolve() for f in files], text_column)
