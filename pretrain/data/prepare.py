"""Source -> tokens -> shards: the engine behind prepare_fineweb.py.

Stream. Documents 0, 1, 2, ... of the source become [EOT] + tokens(document) (documents without
text add nothing). The first `val_tokens` of that stream are the validation split; the document that
straddles its end is dropped and training starts with the next document, so no text is in both.
Each split is cut into shards of exactly `shard_tokens` (the last train shard holds the remainder);
a document may straddle two shards of one split. Every shard's bytes are therefore a function of
(source, tokenizer, shard_tokens, val_tokens) only: not of --workers, batching or interruptions,
and a larger --tokens only appends (a short last shard is rewritten at full size).

Resume. A shard's manifest entry records `end`: the source position just after it (document,
token offset into that document's [EOT]+tokens, and the source's resume hint). Shards are written
tmp + fsync + rename and the manifest is rewritten the same way after each one, so after any
interruption (even kill -9) a rerun continues after the last listed full shard.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np

from pretrain.data.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    atomic_save_npy,
    atomic_write_json,
    dtype_for_vocab,
    read_manifest,
    read_meta,
    shard_name,
)
from pretrain.data.prepare_report import Progress, print_summary
from pretrain.data.sources import Source, SourceError, open_source
from pretrain.data.tokenizer import Tokenizer, resolve_tokenizer
from pretrain.data.workers import WorkerDied, default_workers, tokenized
from pretrain.errors import UserError
from pretrain.fsio import DirLock

DEFAULT_VAL_TOKENS = 10_000_000
LOCK_NAME = ".prepare.lock"  # held while a prepare writes the dir; removed when it ends (hidden, never a shard)
BATCH_CHARS = 1 << 20  # ~250K tokens per work item: large enough to amortise pickling


def plan_shards(total: int, val: int, shard: int) -> list[tuple[str, int, int]]:
    """[(split, index, tokens)] in writing order: val shards first, then train shards."""
    out = []
    for split, n in (("val", val), ("train", total - val)):
        out += [(split, i, min(shard, n - off)) for i, off in enumerate(range(0, n, shard))]
    return out


# ---- the writer -------------------------------------------------------------------------------
def _kept_shards(m: dict, out: Path, plan: list[tuple[str, int, int]]) -> list[dict]:
    """The listed shards that match this run's plan and are intact on disk: the prefix to keep
    (a short last shard of an earlier, smaller --tokens is not kept: it is rewritten full-size)."""
    kept = []
    for entry, (split, idx, size) in zip(m["shards"], plan):
        f = out / entry["file"]
        if not (entry["file"] == shard_name(split, idx) and entry["tokens"] == size and f.is_file()
                and len(np.load(f, mmap_mode="r")) == size):
            break
        kept.append(entry)
    return kept


def _check_same(m: dict, key: str, new: object, flag: str, out: Path) -> None:
    if m.get(key) != new:
        raise UserError(f"{flag} {new} differs from the existing dataset's {m.get(key)} in {out}; rerun with the "
                        "original value to continue/extend it, or choose a new --output")


def _open_output(out: Path, tokens: int, tok: Tokenizer, source: Source, shard_tokens: int,
                 val_tokens: int | None) -> dict:
    """Fresh or existing manifest for `out`, checked against this run's settings."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a directory; choose another --output")
    if out.is_dir() and (out / MANIFEST).exists():
        m = read_manifest(out / MANIFEST)
        _check_same(m, "tokenizer", tok.name, "--tokenizer", out)
        _check_same(m, "source", source.spec, "--source", out)
        _check_same(m, "shard_tokens", shard_tokens, "--shard-tokens", out)
        if val_tokens is not None:
            _check_same(m, "val_tokens", val_tokens, "--val-tokens", out)
        return m
    # A prepare stopped while writing its first manifest leaves only that temp file (and, killed, its lock): still
    # no dataset, and the same command must start it (begin() removes the temp file).
    if out.is_dir() and any(f.name not in (LOCK_NAME, f".{MANIFEST}.tmp") for f in out.iterdir()):
        raise UserError(f"--output {out} exists, is not empty and has no {MANIFEST} (not a dataset); "
                        "choose a new --output or empty that directory")
    val = min(DEFAULT_VAL_TOKENS, tokens // 10) if val_tokens is None else val_tokens
    if val >= tokens or val < 0:
        raise UserError(f"--val-tokens {val:,} must be below --tokens {tokens:,}; lower it")
    vocab = tok.vocab_size
    return {"format": FORMAT, "version": VERSION, "tokenizer": tok.name, "vocab_size": vocab,
            "eot_id": tok.eot_id, "dtype": dtype_for_vocab(vocab), "source": source.spec,
            "shard_tokens": shard_tokens, "val_tokens": val, "target_tokens": tokens,
            "documents_consumed": 0, "complete": False, "source_exhausted": False, "shards": []}


def prepare(tokens: int, output: str | Path, source: list[str] | Source = ("HuggingFaceFW/fineweb-edu",),
            name: str | None = "sample-10BT", split: str = "train", text_column: str = "text",
            tokenizer: str = "gpt2", shard_tokens: int = 100_000_000, val_tokens: int | None = None,
            workers: int | None = None, progress: str = "auto") -> dict:
    """Write (or continue, or extend) a token dataset; returns its manifest. See module docstring."""
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM (a preempted instance, a group kill) -> KeyboardInterrupt from the very start: exit 130 like Ctrl-C
    old = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        return _prepare(tokens, Path(output), source, name, split, text_column, tokenizer, shard_tokens,
                        val_tokens, workers, progress)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def _prepare(tokens: int, output: Path, source: list[str] | Source, name: str | None, split: str,
             text_column: str, tokenizer: str, shard_tokens: int, val_tokens: int | None, workers: int | None,
             progress: str) -> dict:
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    workers = workers or default_workers()
    tok = resolve_tokenizer(tokenizer)
    src = source if not isinstance(source, list | tuple) else open_source(list(source), name, split, text_column)
    src.check()
    out = legacy = output
    if legacy.suffix == ".npy":  # prepared into <x>.npy.parts/ (resumable), then concatenated
        parts = start_legacy(legacy, tokens, val_tokens, tok)
        if parts is None:
            print(f"{legacy} already holds at least {tokens:,} tokens; nothing to do")
            return read_meta(legacy.with_name(legacy.name + ".meta"))
        out, val_tokens = parts, 0
    seen = _manifest_bytes(out)  # before reading the state: begin() proves nobody changed it since
    m = _open_output(out, tokens, tok, src, shard_tokens, val_tokens)
    have = sum(s["tokens"] for s in m["shards"])
    if m["complete"] and (m["source_exhausted"] or tokens <= have):
        why = "the source is exhausted" if m["source_exhausted"] and tokens > have else "nothing to do"
        print(f"{out} already holds {have:,} tokens ({why}; a smaller dataset needs a new --output)")
        return _disk_full_is_one_line(lambda: finish_legacy(out, m, legacy), m, out) if out != legacy else m
    if not m["complete"] and tokens < m["target_tokens"]:
        # Re-planning for fewer tokens would delete finished train shards and keep the validation split sized
        # for the larger run (half the data or more): refused, as a smaller --tokens is for a complete dataset.
        raise UserError(f"{out} is an unfinished dataset of --tokens {m['target_tokens']:,} ({have:,} written); "
                        f"rerun with --tokens {m['target_tokens']:,} (or more) to finish it: a smaller dataset "
                        "needs a new --output")
    plan = plan_shards(tokens, m["val_tokens"], shard_tokens)
    kept = _kept_shards(m, out, plan)
    m.update(shards=kept, target_tokens=tokens, complete=False, source_exhausted=False)
    begun: list[bool] = []
    lock = DirLock(out / LOCK_NAME, remove=True)

    def begin() -> None:
        """The first write, once the first batch of documents is read and tokenized: a source whose
        content is wrong (no text field, not JSON) fails before anything exists on disk. One prepare per
        output: the lock, then proof that the dataset is still the one this run planned from (two prepares
        started together both read "no dataset yet"; the second would have replaced the first's shards)."""
        if begun:
            return
        begun.append(True)
        out.mkdir(parents=True, exist_ok=True)
        holder = lock.acquire()
        if holder is not None:
            raise UserError(f"--output {out} is being written by another prepare (pid {holder}); wait for it to "
                            "end, or choose another --output")
        if _manifest_bytes(out) != seen:
            raise UserError(f"another prepare wrote --output {out} while this one started; rerun the same command "
                            "to continue from what it holds now, or choose another --output")
        for f in out.iterdir():  # leftovers of an interrupted run: temp files and unlisted shards
            if f.name.startswith(".") and f.name.endswith(".tmp") or (
                    f.suffix == ".npy" and f.name not in {s["file"] for s in kept}):
                f.unlink()
        atomic_write_json(out / MANIFEST, m)

    bar = Progress(tokens, progress, already=sum(s["tokens"] for s in kept))
    try:
        try:
            _disk_full_is_one_line(lambda: _write(m, out, plan[len(kept):], src, tok, workers, bar, begin), m, out)
        except (SourceError, WorkerDied) as e:
            done = sum(s["tokens"] for s in m["shards"])
            raise UserError(f"{e}; {done:,} tokens in {len(m['shards'])} complete shards are saved in {out}: "
                            "rerun the same command to continue") from None
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted: {len(m['shards'])} complete shards saved in {out}; rerun the same command "
                  "to continue", flush=True)
            raise
        finally:
            bar.close()
        print_summary(m, out, bar.elapsed())
        return _disk_full_is_one_line(lambda: finish_legacy(out, m, legacy), m, out) if out != legacy else m
    finally:
        lock.release()  # after finish_legacy: joining the parts into x.npy is part of the one prepare


def _manifest_bytes(out: Path) -> bytes | None:
    try:
        return (out / MANIFEST).read_bytes() if (out / MANIFEST).is_file() else None
    except OSError:
        return None


def _disk_full_is_one_line(step: Callable[[], dict | None], m: dict, out: Path) -> dict | None:
    """Run a writing step; a full disk (or a read-only one) becomes one line naming the fix. Temp files
    are removed at once (they hold the space the user needs); listed shards are complete by construction."""
    try:
        return step()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        for f in out.glob(".*.tmp") if out.is_dir() else ():  # only in the dataset dir, which prepare owns
            f.unlink(missing_ok=True)
        where = e.filename or out
        done = sum(s["tokens"] for s in m["shards"])
        saved = f"{done:,} tokens in {len(m['shards'])} complete shards are kept in {out}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            need = m["shard_tokens"] * np.dtype(m["dtype"]).itemsize
            raise UserError(f"disk full writing {where} ({saved}); free at least {need / 1e6:,.0f} MB (one shard) "
                            "there, or choose an --output on another disk, then rerun the same command") from None
        raise UserError(f"cannot write {where} ({e.strerror}); make {out.parent} writable or choose another "
                        f"--output ({saved})") from None


def _write(m: dict, out: Path, todo: list[tuple[str, int, int]], src: Source, tok: Tokenizer,
           workers: int, bar: Progress, begin: Callable[[], None]) -> None:
    if not todo:
        begin()
        return
    end = m["shards"][-1]["end"] if m["shards"] else {"doc": 0, "offset": 0, "hint": None}
    doc, offset, hint = end["doc"], end["offset"], end["hint"]
    if m["shards"] and m["shards"][-1]["split"] == "val" and todo[0][0] == "train":
        doc, offset = doc + 1, 0  # train starts after the document that straddles the end of val
    dtype, doc0 = np.dtype(m["dtype"]), doc
    # a few work items per worker even for tiny runs; ~1M chars each (amortises pickling) for big ones
    chars = int(min(BATCH_CHARS, max(BATCH_CHARS // 16, 4 * sum(t[2] for t in todo) // (8 * workers))))
    split, idx, size = todo.pop(0)
    buf, fill, ndocs = np.empty(size, dtype=dtype), 0, 0
    straddled = False

    with closing(tokenized(src.batches(doc, hint, chars), tok, m["dtype"], workers)) as stream:
        for n_batch, (batch, arr, bounds) in enumerate(stream):
            if n_batch == 0:
                begin()  # the first document is read and tokenized: only now touch the disk
            starts = bounds[:-1][np.diff(bounds) > 0]  # where each non-empty document's EOT sits
            cur = int(bounds[doc - batch.first]) + offset if batch.first <= doc else 0
            offset = 0
            while cur < len(arr):
                take = min(size - fill, len(arr) - cur)
                buf[fill: fill + take] = arr[cur: cur + take]
                ndocs += int(np.searchsorted(starts, cur + take) - np.searchsorted(starts, cur))
                fill, cur = fill + take, cur + take
                if fill < size:
                    break
                # position after the shard: the document holding its last token, and how far into it
                j = int(np.searchsorted(bounds, cur - 1, side="right")) - 1
                pos = {"doc": batch.first + j, "offset": cur - int(bounds[j]), "hint": hint}
                _save_shard(m, out, split, idx, buf, ndocs, pos)
                bar.shard_done(m["shards"][-1]["file"], sum(s["tokens"] for s in m["shards"]), pos["doc"] - doc0)
                if not todo:
                    return
                if split == "val" and todo[0][0] == "train":
                    straddled = True
                    cur = int(bounds[j + 1])  # drop the rest of the straddling document
                split, idx, size = todo.pop(0)
                buf, fill, ndocs = np.empty(size, dtype=dtype), 0, 0
            hint = batch.hint
            bar.update(sum(s["tokens"] for s in m["shards"]) + fill, batch.first + len(batch.texts) - doc0)
    # the source ran dry before --tokens
    if split == "val" or not fill and not any(s["split"] == "train" for s in m["shards"]):
        raise UserError(_no_train_data(m, out, sum(s["tokens"] for s in m["shards"]) + fill, straddled))
    if fill:
        pos = {"doc": batch.first + len(batch.texts), "offset": 0, "hint": batch.hint}
        _save_shard(m, out, split, idx, buf[:fill], ndocs, pos, exhausted=True)
    else:  # an extension that found no further documents
        begin()
        m.update(complete=True, source_exhausted=True)
        atomic_write_json(out / MANIFEST, m)


def _no_train_data(m: dict, out: Path, got: int, straddled: bool) -> str:
    """The source ended inside (or right after) the validation split. With one long text (a single .txt is
    one document) no --val-tokens can help: the document straddling the end of validation is dropped whole,
    so the message names the layout that has no validation cut."""
    why = " (the document that straddles its end is dropped, so no text is in both splits)" if straddled else ""
    single = out.with_name(out.name + ".npy")
    return (f"the source ran out after {got:,} tokens, leaving no training data after the {m['val_tokens']:,}-token "
            f"validation split{why}; add documents (several .txt files, or .jsonl with one document a line), lower "
            f"--val-tokens, or for one long text use the single-file layout, which has no validation cut: "
            f"--output {single} (then train with --val-frac 0.05)")


def _save_shard(m: dict, out: Path, split: str, idx: int, buf: np.ndarray, ndocs: int, pos: dict,
                exhausted: bool = False) -> None:
    name = shard_name(split, idx)
    atomic_save_npy(out / name, buf)
    m["shards"].append({"file": name, "split": split, "tokens": int(len(buf)), "documents": ndocs,
                        "max_token_id": int(buf.max()) if len(buf) else 0, "end": pos})
    m["documents_consumed"] = pos["doc"] + (1 if pos["offset"] else 0)
    m["complete"] = exhausted or sum(s["tokens"] for s in m["shards"]) >= m["target_tokens"]
    m["source_exhausted"] = exhausted
    atomic_write_json(out / MANIFEST, m)


# ---- the older single-file layout: x.npy + x.npy.meta ----------------------------------------
def start_legacy(path: Path, tokens: int, val_tokens: int | None, tok: Tokenizer) -> Path | None:
    """Work dir for a resumable run behind x.npy, or None when x.npy already holds the data."""
    if val_tokens:
        raise UserError("a single-file x.npy output has no validation split; drop --val-tokens (train with "
                        "--val-frac) or write a directory with --output DIR")
    meta = path.with_name(path.name + ".meta")
    if path.exists():
        try:
            info = read_meta(meta)
            have = int(info["tokens"])
        except (OSError, KeyError, ValueError, UserError):
            raise UserError(f"--output {path} exists and is not a prepared dataset (no valid {meta.name}); "
                            "choose a new --output") from None
        if info.get("tokenizer") not in (tok.name, None) or info["vocab_size"] != tok.vocab_size:
            raise UserError(f"{path} holds {info.get('tokenizer')} tokens (vocab {info['vocab_size']:,}), not "
                            f"--tokenizer {tok.name}'s; choose a new --output for {tok.name} tokens")
        if have >= tokens:
            return None
        raise UserError(f"{path} holds {have:,} tokens and a single-file output cannot be extended; "
                        "use a new --output (a directory output can be extended)")
    return path.with_name(path.name + ".parts")


def finish_legacy(parts: Path, m: dict, path: Path) -> dict:
    """Concatenate the work dir's shards into x.npy (atomically), write x.npy.meta, drop the work dir."""
    total = sum(s["tokens"] for s in m["shards"])
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # plain writes, not a memmap: a full disk under a memmap is SIGBUS (a crash), here it is an OSError
        dtype = np.dtype(m["dtype"])
        with open(tmp, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (total,)}
            np.lib.format.write_array_header_1_0(f, header)
            for s in m["shards"]:
                shard = np.load(parts / s["file"], mmap_mode="r")
                for i in range(0, len(shard), 1 << 24):
                    f.write(np.ascontiguousarray(shard[i: i + (1 << 24)]).tobytes())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # ours (a full disk needs the space back); the parts dir stays for a rerun
        raise
    os.replace(tmp, path)
    meta = {k: m[k] for k in ("tokenizer", "vocab_size", "eot_id", "dtype", "source")}
    meta.update(tokens=total, documents=sum(s["documents"] for s in m["shards"]))
    atomic_write_json(path.with_name(path.name + ".meta"), meta)
    shutil.rmtree(parts)
    return meta
