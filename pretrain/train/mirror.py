"""Checkpoints that outlive the machine: `--mirror URL` copies every saved checkpoint, with train.jsonl and
summary.md, to an fsspec location (s3://, gs://, hf://, a mounted path) in a background thread, and a run dir
with no checkpoint pulls the newest good one back, so the same command resumes on a new machine.

This file is the policy (when to pull, what a start does to the mirror, the upload queue, retries, the bounded
waits at the end); what lives on the mirror and how bytes move is pretrain/train/mirror_store.py. The newest
max(--keep-last, 1) good steps are kept. Training never waits on the mirror beyond handing it an open file:
failures are warned, retried with backoff, given up for the next checkpoint, and reported in summary.md.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pretrain import stopping
from pretrain.errors import UserError
from pretrain.train.mirror_store import MirrorStore, mirror_problem
from pretrain.units import fmt_bytes

BACKOFF_S = (2.0, 10.0, 30.0)  # waits between the tries of one upload (then the next checkpoint tries again)
LIST_BACKOFF_S = (1.0, 3.0)  # waits between the tries of the listing a pull needs at start
FINAL_WAIT_S = 1800.0  # a finished run waits this long for its last checkpoint to reach the mirror
STOP_WAIT_S = 10.0  # a stopped (preempted) run waits only this long: the machine may go at any moment
FILES_WAIT_S = 30.0  # train.jsonl and summary.md at the very end


def _stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class _Job:
    step: int
    best: bool
    file: IO[bytes]  # last.pt as saved: the open file survives the next save replacing it and pruning


@dataclass
class MirrorStatus:
    """What summary.md reports (`as_info`)."""

    url: str
    uploads_ok: int = 0
    uploads_failed: int = 0
    superseded: int = 0  # checkpoints skipped because a newer one was saved while the mirror was busy
    last_step: int | None = None  # newest step whose checkpoint and marker are on the mirror
    last_seconds: float | None = None
    last_bytes: int | None = None
    last_error: str | None = None
    pending_step: int | None = None  # a checkpoint not (yet) mirrored when the run ended
    pulled_step: int | None = None
    seconds: list[float] = field(default_factory=list)

    def as_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "seconds"}


def describe(info: dict[str, Any]) -> str:
    """One line of a run's mirror status (summary.md), from MirrorStatus.as_info()."""
    last = info.get("last_step")
    text = f"{info.get('url')}: {info.get('uploads_ok', 0)} checkpoint(s) copied"
    text += f", newest step {last}" if last is not None else ", none yet"
    if info.get("last_seconds") is not None and info.get("last_bytes"):
        text += f" ({fmt_bytes(info['last_bytes'])} in {info['last_seconds']:.1f} s)"
    if info.get("pulled_step") is not None:
        text += f"; this session resumed from its step {info['pulled_step']}"
    if info.get("superseded"):
        text += f"; {info['superseded']} skipped for a newer one"
    if info.get("uploads_failed"):
        text += f"; {info['uploads_failed']} failed (last: {info.get('last_error')})"
    if info.get("pending_step") is not None:
        text += f"; step {info['pending_step']} NOT mirrored (upload unfinished at exit)"
    return text


class Mirror:
    """One run dir's mirror: pull at start, background uploads after every save, a bounded wait at the end."""

    def __init__(self, url: str, run_dir: Path, keep_last: int, warn: Callable[[str], None] | None = None) -> None:
        if why := mirror_problem(url):
            raise UserError(why)
        self.run_dir = Path(run_dir)
        self.warn = warn or _stderr
        self.store = MirrorStore(url, self.run_dir, keep_last, self.warn)
        self.url = self.store.url
        self.status = MirrorStatus(self.url)
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._files = False  # train.jsonl + summary.md asked for
        self._first: Callable[[], None] | None = None  # the start's reconcile step, before any upload
        self._current: _Job | None = None  # the checkpoint being uploaded
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ pull
    def pull(self, check: Callable[[dict, Path], str | None]) -> int | None:
        """Into a run dir without checkpoints: download the newest good checkpoint (marker, size, sha256, then
        the trainer's own load and `check`), as step_<N>.pt and last.pt, plus train.jsonl. Returns its step."""
        from pretrain.train.checkpoint import _atomic_alias, checkpoint_paths, load_checkpoint

        paths = checkpoint_paths(self.run_dir)
        if paths["last"] or paths["best"] or paths["numbered"]:
            return None
        markers = self.store.markers(self._list_at_start())
        if markers:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        for step, marker in markers:
            local = self.run_dir / f"step_{step}.pt"
            why = self.store.download(f"step_{step}.pt", local, marker)
            if why is None:
                try:
                    state = load_checkpoint(local)
                except UserError as e:  # truncated or corrupt although its hash matched: written damaged
                    why = str(e)
                else:
                    try:
                        why = check(state, local)
                    except UserError:  # a sound checkpoint of another experiment: stop, as for a local one
                        local.unlink(missing_ok=True)
                        raise
            if why is not None:
                local.unlink(missing_ok=True)
                self.warn(f"mirror: skipping step {step} of {self.url}: {why}; trying an older one")
                continue
            _atomic_alias(local, self.run_dir / "last.pt")
            self._pull_best(step, marker)
            if not (self.run_dir / "train.jsonl").exists():
                try:
                    self.store.download("train.jsonl", self.run_dir / "train.jsonl", None)
                except FileNotFoundError:
                    pass
            self.status.pulled_step = step
            print(f"mirror: pulled step {step} from {self.url} into an empty {self.run_dir}", file=sys.stderr,
                  flush=True)
            return step
        return None

    def _pull_best(self, step: int, marker: dict[str, Any]) -> None:
        from pretrain.train.checkpoint import _atomic_alias

        best = self.store.best_marker()
        if best is None or best["step"] > step:  # none mirrored (a run without evals), or from a later step
            return
        target = self.run_dir / "best.pt"
        if best.get("sha256") == marker.get("sha256"):  # the same bytes: a second name, as the writer does
            _atomic_alias(self.run_dir / f"step_{step}.pt", target)
        elif (why := self.store.download("best.pt", target, best)) is not None:
            target.unlink(missing_ok=True)
            self.warn(f"mirror: best.pt not pulled: {why}")

    def _list_at_start(self) -> dict[str, int]:
        for delay in (*LIST_BACKOFF_S, None):
            try:
                return self.store.listing()
            except Exception as e:  # noqa: BLE001 - network, auth: retried, then one line
                if delay is None:
                    raise UserError(f"--mirror: cannot list {self.url} to look for a checkpoint to resume "
                                    f"({type(e).__name__}: {e}); check the URL and credentials (an S3-compatible "
                                    "endpoint is set with AWS_ENDPOINT_URL), or drop --mirror") from None
                time.sleep(delay)
        return {}

    # ---------------------------------------------------------------------------------------------- upload
    def check_start(self, start: Any, overwrite: bool) -> None:
        """Before the run dir's first write, given where training starts (resume.StartPoint): what the mirror
        must do first, or a UserError.

        A fresh start where the mirror holds this run's checkpoints would replace them: only with --overwrite
        (they are removed first). A rollback removes the mirrored steps past the resumed one (the run dir keeps
        them in abandoned/). A resumed run makes sure the mirror holds the checkpoint it resumed from.
        """
        if not start.resumed:
            if self.holds_checkpoints():
                if not overwrite:
                    raise UserError(f"--mirror {self.url} holds checkpoints of a run that this command would start "
                                    "afresh and replace; pass --overwrite to replace them, or use another --mirror "
                                    "URL or --out-dir")
                self._first = lambda: self.store.remove_steps(None)
        elif start.abandon:
            self._first = lambda: self.store.remove_steps(start.state["step"])
        elif self.status.pulled_step is None:
            self._first = lambda: self._ensure(start.state["step"], Path(start.path))

    def _ensure(self, step: int, path: Path) -> None:
        """Queue the resumed checkpoint when the mirror lacks it (the last session's upload did not finish)."""
        if any(s == step for s, _ in self.store.markers(self.store.listing())):
            return
        with self._cond:
            if self._job is None:
                self._job = _Job(step, False, open(path, "rb"))  # noqa: SIM115 - closed by _run

    def begin(self, ckpt: Any) -> None:
        """Start the upload thread and have `ckpt` (a CheckpointManager) hand it every checkpoint it saves."""
        self._thread = threading.Thread(target=self._run, name="ckpt-mirror", daemon=True)  # never holds up exit
        self._thread.start()
        ckpt.on_saved = self.push

    def holds_checkpoints(self) -> bool:
        """Whether the mirror holds a good checkpoint of this run (a fresh start would replace it)."""
        return bool(self.store.markers(self._list_at_start()))

    def push(self, step: int, best: bool) -> None:
        """A checkpoint was saved (called by the checkpoint writer): queue it. Opens last.pt and returns."""
        try:
            f = open(self.run_dir / "last.pt", "rb")  # noqa: SIM115 - closed by the upload thread
        except OSError as e:
            self.warn(f"mirror: cannot read the checkpoint of step {step} ({e}); not mirrored")
            return
        with self._cond:
            if self._job is not None:  # the mirror is behind: only the newest checkpoint is worth sending
                self._job.file.close()
                self.status.superseded += 1
                best = best or self._job.best
            self._job = _Job(step, best, f)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._first or self._job or self._files or self._closing):
                    self._cond.wait()
                if not (self._first or self._job or self._files):
                    return
                first, self._first = self._first, None
                job = None if first else self._job
                files = not first and not job and self._files
                if job is not None:
                    self._job = None
                self._current, self._busy = job, True
                if files:
                    self._files = False
            try:
                if first:
                    self._attempt(first, "cleaning up the mirror", None)
                elif job is not None:
                    ok = self._attempt(lambda j=job: self._upload(j), f"upload of step {job.step}", job)
                    job.file.close()
                    if ok:
                        self.status.uploads_ok += 1
                elif files:
                    self._attempt(lambda: self.store.put_files(summary=True), "upload of train.jsonl/summary.md", None)
            finally:
                with self._cond:
                    self._current, self._busy = None, False
                    self._cond.notify_all()

    def _upload(self, job: _Job) -> None:
        t0 = time.perf_counter()
        size = self.store.upload_checkpoint(job.file, job.step, job.best)
        st = self.status
        st.last_seconds, st.last_bytes, st.last_step = time.perf_counter() - t0, size, job.step
        st.seconds.append(st.last_seconds)

    def _attempt(self, fn: Callable[[], None], what: str, job: _Job | None) -> bool:
        """fn() with retries; False when it gave up (warned) or a newer checkpoint superseded `job`."""
        for delay in (*BACKOFF_S, None):
            try:
                if job is not None:
                    job.file.seek(0)
                fn()
                return True
            except Exception as e:  # noqa: BLE001 - a mirror problem must never reach the training loop
                why = f"{type(e).__name__}: {e}"[:300]
                self.status.last_error = why
                if delay is None:
                    self.status.uploads_failed += 1
                    self.warn(f"mirror: gave up on the {what} to {self.url} ({why}); training goes on, the next "
                              "checkpoint is tried again")
                    return False
                self.warn(f"mirror: {what} to {self.url} failed ({why}); retrying in {delay:g} s, training goes on")
            with self._cond:  # a newer checkpoint or the run's end cuts the wait short
                self._cond.wait_for(lambda: (job is not None and self._job is not None) or self._closing, delay)
                if job is not None and self._job is not None:
                    self.status.superseded += 1
                    return False
        return False

    def drain(self, timeout: float) -> str:
        """Wait (at most `timeout` s) until the queued checkpoint is mirrored; a stop request arriving meanwhile
        ends the wait. Returns the status line summary.md shows."""
        deadline, stopped_before = time.monotonic() + timeout, stopping.requested()
        with self._cond:
            while (self._job or self._first or self._busy) and time.monotonic() < deadline:
                if stopping.requested() and not stopped_before:
                    break
                self._cond.wait(0.2)
            pending = self._job or self._current
        self.status.pending_step = pending.step if pending else None
        if pending:
            self.warn(f"mirror: step {pending.step} is not on {self.url} yet (waited {timeout:g} s); the run dir "
                      "has it; a resumed run uploads it first")
        return describe(self.status.as_info())

    def close(self) -> None:
        """Send train.jsonl and summary.md (bounded wait), then stop the thread."""
        with self._cond:
            self._files = True
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            # Behind an upload that drain() already gave up on, these small files would wait for it: do not.
            wait = FILES_WAIT_S if self.status.pending_step is None else min(FILES_WAIT_S, 1.0)
            self._thread.join(wait)
            if self._thread.is_alive():
                self.warn(f"mirror: train.jsonl / summary.md not copied to {self.url} within {wait:g} s")
        with self._cond:
            if self._job is not None:
                self._job.file.close()
                self._job = None


def open_and_pull(cfg: Any, run_dir: Path, dist: Any, check: Callable[[dict, Path], str | None]) -> Mirror | None:
    """The run's mirror (None without --mirror, and on ranks other than 0), after pulling the newest good
    checkpoint into a run dir that has none (--resume auto). Raises UserError for a bad URL or another run's."""
    mirror = Mirror(cfg.mirror, run_dir, cfg.keep_last) if cfg.mirror and dist.is_main else None
    if mirror is not None and cfg.resume == "auto":
        mirror.pull(check)
    if cfg.mirror and dist.enabled:
        from pretrain.train import distributed as dist_lib

        dist_lib.any_rank(False, dist)  # a collective: the other ranks look for checkpoints after rank 0's pull
    return mirror
