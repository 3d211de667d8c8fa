"""Checkpoints that outlive the machine: `--mirror URL` copies every saved checkpoint, with train.jsonl and
summary.md, to an fsspec location (s3://, gs://, hf://, a mounted path) in a background thread, and a run dir
with no checkpoint pulls the newest good one back, so the same command resumes on a new machine.

Layout under URL/<run dir name>/: `step_<N>.pt` (the bytes of that save's last.pt), then its marker
`step_<N>.json` (size and sha256), written last: a checkpoint is good only when its marker exists and the bytes
match it, so a half-uploaded file is never taken for one. `best.pt` + `best.json` likewise (a server-side copy).
The newest max(--keep-last, 1) good steps are kept. Training never waits on the mirror beyond handing it an open
file: failures are warned, retried with backoff, given up for the next checkpoint, and reported in summary.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pretrain import stopping
from pretrain.cli import UserError
from pretrain.units import fmt_bytes

_STEP = re.compile(r"step_(\d+)\.(pt|json)")
CHUNK = 16 << 20
BACKOFF_S = (2.0, 10.0, 30.0)  # waits between the tries of one upload (then the next checkpoint tries again)
LIST_BACKOFF_S = (1.0, 3.0)  # waits between the tries of the listing a pull needs at start
FINAL_WAIT_S = 1800.0  # a finished run waits this long for its last checkpoint to reach the mirror
STOP_WAIT_S = 10.0  # a stopped (preempted) run waits only this long: the machine may go at any moment
FILES_WAIT_S = 30.0  # train.jsonl and summary.md at the very end
TMP_PREFIX = ".ckpt-tmp-"  # the checkpoint manager's prefix: a pull killed mid-way leaves nothing loadable


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
        self.run_dir = Path(run_dir)
        self.keep = max(1, int(keep_last))  # the mirror's newest step stands in for last.pt
        self.warn = warn or _stderr
        self.url = mirror_url(url, self.run_dir)
        self.status = MirrorStatus(self.url)
        if why := mirror_problem(url):
            raise UserError(why)
        import fsspec

        # A fresh instance: fsspec caches them, with their listings and endpoints, across runs of one process.
        self.fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        self.root = root.rstrip("/")
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._files = False  # train.jsonl + summary.md asked for
        self._first: Callable[[], None] | None = None  # the start's reconcile step, before any upload
        self._current: _Job | None = None  # the checkpoint being uploaded
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._made_root = False

    # ---------------------------------------------------------------------------------------------- remote
    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _listing(self) -> dict[str, int]:
        """Name -> size of the files in the run's mirror dir ({} when it does not exist)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                if e.get("type") != "directory"}

    def _markers(self, listing: dict[str, int]) -> list[tuple[int, dict[str, Any]]]:
        """(step, marker) of each checkpoint whose marker exists and whose data has the marker's size, newest first."""
        out = []
        for name in listing:
            m = _STEP.fullmatch(name)
            if not m or m.group(2) != "json" or f"step_{m.group(1)}.pt" not in listing:
                continue
            try:
                marker = json.loads(self.fs.cat_file(self._path(name)))
            except Exception as e:  # noqa: BLE001 - a damaged marker is a checkpoint that is not good
                self.warn(f"mirror: ignoring {self._path(name)} ({type(e).__name__}: {e})")
                continue
            if isinstance(marker, dict) and marker.get("size") == listing[f"step_{m.group(1)}.pt"]:
                out.append((int(m.group(1)), marker))
        return sorted(out, key=lambda sm: -sm[0])

    def _put(self, src: IO[bytes], name: str) -> tuple[int, str]:
        """Stream `src` from its start to `name`; returns (bytes, sha256)."""
        if not self._made_root:
            try:
                self.fs.makedirs(self.root, exist_ok=True)  # a mounted dir needs it; an object store may refuse
            except Exception:  # noqa: BLE001 - buckets without create permission: the write itself says why
                pass
            self._made_root = True
        return _upload(self.fs, src, self._path(name))

    def _upload_checkpoint(self, job: _Job) -> None:
        t0 = time.perf_counter()
        marker_name = f"step_{job.step}.json"
        if self.fs.exists(self._path(marker_name)):  # the same step saved again: unmark before overwriting
            self.fs.rm_file(self._path(marker_name))
        size, sha = self._put(job.file, f"step_{job.step}.pt")
        self._put_files(summary=False)  # before the marker: a good checkpoint's log holds every step up to it
        marker = {"step": job.step, "size": size, "sha256": sha, "time": time.time()}
        self.fs.pipe_file(self._path(marker_name), json.dumps(marker).encode())  # last: now it is good
        if job.best:
            if self.fs.exists(self._path("best.json")):
                self.fs.rm_file(self._path("best.json"))
            self.fs.copy(self._path(f"step_{job.step}.pt"), self._path("best.pt"))
            self.fs.pipe_file(self._path("best.json"), json.dumps(marker).encode())
        self._prune()
        st = self.status
        st.last_seconds, st.last_bytes, st.last_step = time.perf_counter() - t0, size, job.step
        st.seconds.append(st.last_seconds)

    def _put_files(self, summary: bool) -> None:
        for name in ("train.jsonl", "summary.md") if summary else ("train.jsonl",):
            local = self.run_dir / name
            if local.is_file():
                with open(local, "rb") as f:
                    self._put(f, name)

    def _prune(self) -> None:
        """Keep the newest `keep` good steps; drop older ones and data left without a marker by a failed upload."""
        listing = self._listing()
        good = [s for s, _ in self._markers(listing)]
        if not good:
            return
        keep = set(good[: self.keep])
        steps = {int(m.group(1)) for n in listing if (m := _STEP.fullmatch(n))}
        for step in sorted(s for s in steps if s not in keep and s < good[0]):
            for name in (f"step_{step}.json", f"step_{step}.pt"):  # the marker first: never a good orphan
                if name in listing:
                    self.fs.rm_file(self._path(name))

    def _remove_steps(self, after: int | None) -> None:
        """Remove this run's checkpoints from the mirror: those past step `after` (a rollback), or all (None)."""
        listing = self._listing()
        names = sorted(listing, key=lambda n: not n.endswith(".json"))  # markers first: never a good orphan
        for name in names:
            m = _STEP.fullmatch(name)
            if (m and (after is None or int(m.group(1)) > after)) or (after is None and name.startswith("best.")):
                self.fs.rm_file(self._path(name))

    # ------------------------------------------------------------------------------------------------ pull
    def pull(self, check: Callable[[dict, Path], str | None]) -> int | None:
        """Into a run dir without checkpoints: download the newest good checkpoint (marker, size, sha256, then
        the trainer's own load and `check`), as step_<N>.pt and last.pt, plus train.jsonl. Returns its step."""
        from pretrain.train.checkpoint import checkpoint_paths, load_checkpoint

        paths = checkpoint_paths(self.run_dir)
        if paths["last"] or paths["best"] or paths["numbered"]:
            return None
        markers = self._markers(self._list_at_start())
        if markers:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        for step, marker in markers:
            local = self.run_dir / f"step_{step}.pt"
            why = self._download(f"step_{step}.pt", local, marker)
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
            os.link(local, self.run_dir / "last.pt")
            self._pull_best(step, marker)
            if not (self.run_dir / "train.jsonl").exists():
                try:
                    self._download("train.jsonl", self.run_dir / "train.jsonl", None)
                except FileNotFoundError:
                    pass
            self.status.pulled_step = step
            print(f"mirror: pulled step {step} from {self.url} into an empty {self.run_dir}", file=sys.stderr,
                  flush=True)
            return step
        return None

    def _pull_best(self, step: int, marker: dict[str, Any]) -> None:
        try:
            best = json.loads(self.fs.cat_file(self._path("best.json")))
        except Exception:  # noqa: BLE001 - no best.pt mirrored (a run without evals), or unreadable: not needed
            return
        if not isinstance(best, dict) or not isinstance(best.get("step"), int) or best["step"] > step:
            return
        target = self.run_dir / "best.pt"
        if best.get("sha256") == marker.get("sha256"):
            os.link(self.run_dir / f"step_{step}.pt", target)
        elif (why := self._download("best.pt", target, best)) is not None:
            target.unlink(missing_ok=True)
            self.warn(f"mirror: best.pt not pulled: {why}")

    def _list_at_start(self) -> dict[str, int]:
        for delay in (*LIST_BACKOFF_S, None):
            try:
                return self._listing()
            except Exception as e:  # noqa: BLE001 - network, auth: retried, then one line
                if delay is None:
                    raise UserError(f"--mirror: cannot list {self.url} to look for a checkpoint to resume "
                                    f"({type(e).__name__}: {e}); check the URL and credentials (an S3-compatible "
                                    "endpoint is set with AWS_ENDPOINT_URL), or drop --mirror") from None
                time.sleep(delay)
        return {}

    def _download(self, name: str, local: Path, marker: dict[str, Any] | None) -> str | None:
        """Remote `name` -> `local` atomically; why it does not match `marker` (then nothing is left), else None."""
        tmp = local.with_name(f"{TMP_PREFIX}{local.name}-mirror")
        digest, size = hashlib.sha256(), 0
        try:
            with self.fs.open(self._path(name), "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if marker is not None and (size != marker.get("size") or digest.hexdigest() != marker.get("sha256")):
                return f"its bytes do not match its marker ({size} bytes, sha256 {digest.hexdigest()[:12]}...)"
            os.replace(tmp, local)
            return None
        finally:
            tmp.unlink(missing_ok=True)

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
                self._first = lambda: self._remove_steps(None)
        elif start.abandon:
            self._first = lambda: self._remove_steps(start.state["step"])
        elif self.status.pulled_step is None:
            self._first = lambda: self._ensure(start.state["step"], Path(start.path))

    def _ensure(self, step: int, path: Path) -> None:
        """Queue the resumed checkpoint when the mirror lacks it (the last session's upload did not finish)."""
        if any(s == step for s, _ in self._markers(self._listing())):
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
        return bool(self._markers(self._list_at_start()))

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
                    ok = self._attempt(lambda j=job: self._upload_checkpoint(j), f"upload of step {job.step}", job)
                    job.file.close()
                    if ok:
                        self.status.uploads_ok += 1
                elif files:
                    self._attempt(lambda: self._put_files(summary=True), "upload of train.jsonl/summary.md", None)
            finally:
                with self._cond:
                    self._current, self._busy = None, False
                    self._cond.notify_all()

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


def mirror_url(url: str, run_dir: str | os.PathLike) -> str:
    """Where a run's checkpoints go: URL/<run dir name> (one --mirror URL holds many runs, like --run-root)."""
    return url.rstrip("/") + "/" + Path(run_dir).name


def mirror_problem(url: str) -> str | None:
    """Why fsspec cannot write to `url` on this machine (unknown protocol, its package missing), or None."""
    try:
        import fsspec

        fsspec.get_filesystem_class(fsspec.core.split_protocol(url)[0] or "file")
    except (ImportError, ValueError) as e:
        return (f"--mirror {url}: {e}; install the filesystem's package (s3fs, gcsfs, huggingface_hub) or pass a "
                "mounted directory")
    return None


def _upload(fs: Any, src: IO[bytes], path: str) -> tuple[int, str]:
    """Copy `src` to `path` on `fs` in chunks, hashing on the way. Module-level so tests can make it fail."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


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
