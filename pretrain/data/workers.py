"""Tokenizer worker processes for prepare: batches of texts in, (tokens, document bounds) out, in order.

Not multiprocessing.Pool: its workers share one task-queue lock, and a worker killed while holding it
(a terminal's Ctrl-C reaches the whole process group) makes Pool.terminate() wait on that lock forever.
Here every worker has its own pipe and nothing is shared. Workers (and the forkserver they fork from)
start with SIGINT/SIGTERM blocked, inherited from the parent's signal mask while it starts them, so a
group signal never reaches them, not even while they import numpy (a KeyboardInterrupt traceback there
would be printed under the parent's "interrupted" line). The parent alone decides to stop, then kills
them; they also exit when their pipe closes (parent gone, even by kill -9). The parent waits on each
worker's pipe *and* its process sentinel, so a dead worker is noticed at once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait

import numpy as np

from pretrain.data.sources import DocBatch
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

_ENC = None
_DTYPE = None


class WorkerDied(UserError):
    """A tokenizer process died (out of memory, killed); prepare adds how far it got."""


def default_workers() -> int:
    """Cores this process may use: the affinity mask where the OS has one (Linux), else all cores (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def init_encoder(tok: Tokenizer, dtype: str) -> None:
    global _ENC, _DTYPE
    _ENC, _DTYPE = tok.build(), np.dtype(dtype)


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch -> (tokens with an EOT before each non-empty document, per-document bounds)."""
    eot = np.array([_ENC.eot_token], dtype=_DTYPE)
    parts, n = [], 0
    bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    for i, text in enumerate(texts):
        if text:  # per-document np.array + one concatenate: the cheapest list -> array path
            ids = np.array(_ENC.encode_ordinary(text), dtype=_DTYPE)
            parts += (eot, ids)
            n += 1 + len(ids)
        bounds[i + 1] = n
    return (np.concatenate(parts) if parts else np.empty(0, dtype=_DTYPE)), bounds


def _serve(conn: Connection, tok: Tokenizer, dtype: str) -> None:
    """Worker main: encode each batch received until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    init_encoder(tok, dtype)
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (True, encode(texts))
        except Exception:
            reply = (False, traceback.format_exc(limit=3))
        try:
            conn.send(reply)
        except OSError:
            return


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while children start (they inherit the mask); signals that
    arrive meanwhile are delivered to the parent when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    stop = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        # the forkserver starts multiprocessing's resource tracker first, which unblocks these signals on
        # its way out: start it now, then block again, so the forkserver itself inherits the block
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Pool:
    """N worker processes, one private pipe each, at most one batch in flight per worker (so neither
    side can block sending while the other is blocked sending back)."""

    def __init__(self, n: int, tok: Tokenizer, dtype: str) -> None:
        # forkserver, not fork: the parent may run threads (pyarrow, HF streaming) that fork would copy mid-lock
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload([__name__])  # workers fork with numpy + tiktoken already imported
        self.procs: list = []
        self.conns: list[Connection] = []
        try:
            with _signals_blocked():
                for i in range(n):
                    ours, theirs = ctx.Pipe()
                    p = ctx.Process(target=_serve, args=(theirs, tok, dtype), name=f"tokenizer-{i}", daemon=True)
                    p.start()
                    theirs.close()
                    self.procs.append(p)
                    self.conns.append(ours)
        except BaseException:  # including a Ctrl-C held back until the workers existed
            self.close()
            raise

    def _died(self, i: int) -> None:
        p = self.procs[i]
        p.join(1.0)
        code = p.exitcode
        if code is not None and -code in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            raise KeyboardInterrupt  # signalled before it could ignore signals: the same as a Ctrl-C
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        raise WorkerDied(f"tokenizer worker {i} {how} (out of memory?); lower --workers if memory is short")

    def submit(self, i: int, texts: list[str]) -> None:
        try:
            self.conns[i].send(texts)
        except OSError:  # broken pipe: the worker is gone
            self._died(i)

    def result(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        conn, sentinel = self.conns[i], self.procs[i].sentinel
        while True:
            ready = wait([conn, sentinel], timeout=1.0)
            if conn in ready:
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):
                    self._died(i)
                if not ok:
                    raise RuntimeError(f"tokenizer worker {i} failed:\n{value}")
                return value
            if sentinel in ready:
                self._died(i)

    def close(self) -> None:
        """Kill and reap every worker: nothing here waits on a lock a dead process may hold."""
        for c in self.conns:
            c.close()
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5.0)


def tokenized(batches: Iterator[DocBatch], tok: Tokenizer, dtype: str,
              workers: int) -> Iterator[tuple[DocBatch, np.ndarray, np.ndarray]]:
    """Yield (batch, tokens, bounds) in source order; with workers > 1, one batch per worker in flight
    (never the whole source read ahead into memory)."""
    if workers <= 1:
        init_encoder(tok, dtype)
        for b in batches:
            yield (b, *encode(b.texts))
        return
    pool = _Pool(workers, tok, dtype)
    try:
        pending: deque[tuple[DocBatch, int]] = deque()
        idle = deque(range(workers))
        for b in batches:
            if not idle:
                b0, i = pending.popleft()
                out = pool.result(i)
                idle.append(i)
                yield (b0, *out)
            i = idle.popleft()
            pool.submit(i, b.texts)
            pending.append((b, i))
        while pending:
            b0, i = pending.popleft()
            yield (b0, *pool.result(i))
    finally:
        pool.close()
