"""wandb for the trainer: one run per run dir, continued across resumes, never fatal.

`finish` waits until the offline `run-<id>.wandb` file holds its exit record, which takes a reader of that
binary format (wandb 0.31 ships none for Python): `iter_wandb_records`. What tests read back from those files
(history rows) is in tests/wandb_records.py.
"""

from __future__ import annotations

import os
import secrets
import shlex
import string
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

RUN_ID_FILE = "wandb_run_id.txt"
DEFAULT_PROJECT = "pretrain-1b"  # when neither --wandb-project nor WANDB_PROJECT names one
STEP_METRIC = "tokens"  # every chart's x-axis: runs with other batch or seq-len schedules line up


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def new_run_id() -> str:
    """An 8-character id like wandb's own (its generator moved between wandb versions)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_location(url: str | None, sync_command: str | None) -> str | None:
    """The line naming where the run is: its URL, or offline the command that uploads it."""
    if url:
        return f"wandb: {url}"
    if sync_command:
        return f"wandb (offline): upload every session of this run with: {sync_command}"
    return None


def stored_run_id(run_dir: str | os.PathLike) -> str | None:
    """The wandb run id saved in run_dir, if any."""
    try:
        text = (Path(run_dir) / RUN_ID_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


class WandbRun:
    """A wandb run that continues across resumes with strictly increasing steps.

    Several events share a step (the train line, then the eval and the checkpoint at that step): `log`
    gathers them into one row that is sent when a later step arrives, at `flush()` or at `finish()`, because
    wandb refuses a second row at a step it already has.

    The run id is, in order: `run_id` (from the checkpoint), the id in run_dir/wandb_run_id.txt (unless
    fresh=True, for a --overwrite restart), or a new id. Any failure at init prints one warning and turns
    this object into a no-op: a wandb outage must never stop a paid-for training run.

    Project and entity: the flag, else WANDB_PROJECT / WANDB_ENTITY as wandb users set them, else
    DEFAULT_PROJECT (and wandb's default entity). Every metric family is charted against STEP_METRIC: each new
    family (`diag/*`, `downstream/*`, a table) gets its define_metric before its first row is sent.
    """

    def __init__(self, run_dir: str | os.PathLike, config: Mapping[str, Any], enabled: bool,
                 project: str | None, entity: str | None = None, name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 run_id: str | None = None, *, fresh: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        self._run: Any = None
        self._warn = warn or _warn
        self._last_step = -1
        self._pending: dict[str, Any] = {}
        self._pending_step: int | None = None
        self._offline = False
        self._wandb_dir = Path(run_dir) / "wandb"
        self._run_id: str | None = None
        self._sync_file: Path | None = None
        self._defined: set[str] = set()  # metric families already put on the tokens axis
        self._tables: dict[str, Any] = {}  # incremental tables by key: each round adds rows, none is re-sent
        if not enabled or mode == "disabled":
            return
        run_dir = Path(run_dir)
        try:
            import wandb

            run_id = run_id or (None if fresh else stored_run_id(run_dir)) or new_run_id()
            run_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                dir=str(run_dir), id=run_id, resume="allow", name=name,
                project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=entity or os.environ.get("WANDB_ENTITY") or None,
                group=group, tags=list(tags) if tags else None, mode=mode, config=dict(config),
                allow_val_change=True,  # steps and cadences may legitimately change on resume
            )
            self._run_id = self._run.id
            self._offline = bool(getattr(self._run.settings, "_offline", False))
            sync_file = getattr(self._run.settings, "sync_file", None)
            self._sync_file = Path(sync_file) if sync_file else None
            (run_dir / RUN_ID_FILE).write_text(self._run_id + "\n")
            # A run resumed online already holds history up to its last step; wandb rejects lower steps.
            self._last_step = int(getattr(self._run, "step", 0) or 0) - 1
            # Charts default to tokens on the x-axis (each family is defined as it first appears, _on_tokens_axis);
            # wandb's own Step stays selectable. Every row carries "tokens" (see RunState.emit).
            self._run.define_metric(STEP_METRIC)
            self._run.define_metric("val/loss", step_metric=STEP_METRIC, summary="min")
        except Exception as e:  # any wandb problem (network, auth, bad flags) is non-fatal
            self._warn(f"wandb disabled, training continues without it ({type(e).__name__}: {e})")
            self._finish_quietly()

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def url(self) -> str | None:
        return getattr(self._run, "url", None) if self._run is not None else None

    @property
    def sync_command(self) -> str | None:
        """Offline: the `wandb sync` command uploading every session of this run (one dir per session).

        The trailing `*` matters: a session started within the same second as the one before gets wandb's
        `-1` suffix (`offline-run-<time>-<id>-1`)."""
        if self._run_id is None or not self._offline:
            return None
        return f"wandb sync {shlex.quote(str(self._wandb_dir))}/offline-run-*-{self._run_id}*"

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Add metrics to the row of `step`; the row is sent once a later step arrives (or at flush/finish).

        A step at or below the last row sent is dropped: only an online resume gets there, for steps the
        server already holds from the session before.
        """
        step = int(step)
        if self._run is None or step <= self._last_step:
            return
        if self._pending_step is not None and step < self._pending_step:
            return  # steps only go forward within a session; never reorder what wandb receives
        if self._pending_step is not None and step != self._pending_step:
            self.flush()
        self._pending_step = step
        self._pending.update({k: v for k, v in metrics.items() if v is not None})

    def flush(self) -> None:
        """Send the gathered row now (called after a checkpoint, so a kill -9 loses no saved step's row)."""
        if self._run is None or self._pending_step is None:
            return
        row, step = self._pending, self._pending_step
        self._pending, self._pending_step = {}, None
        try:
            self._on_tokens_axis(row)
            self._run.log(row, step=step, commit=True)
            self._last_step = step
        except Exception as e:
            self._warn(f"wandb log failed, disabling wandb for this run ({type(e).__name__}: {e})")
            self._finish_quietly()

    def _on_tokens_axis(self, row: Mapping[str, Any]) -> None:
        for key in row:
            family = key.split("/", 1)[0]
            if key != STEP_METRIC and family not in self._defined:
                self._run.define_metric(f"{family}/*" if "/" in key else key, step_metric=STEP_METRIC)
                self._defined.add(family)

    def add_table_rows(self, key: str, columns: Sequence[str], rows: list[list[Any]], step: int, tokens: int) -> None:
        """Append rows to the run's incremental table `key` and log it at `step`: one table that grows, each log
        sending only the rows added since the last (wandb's INCREMENTAL log mode)."""
        if self._run is None:
            return
        if self._pending_step is not None and step > self._pending_step:
            self.flush()  # an earlier step's row holds this table: it must be sent before the table grows
        try:
            table = self._tables.get(key)
            if table is None:
                import wandb

                table = self._tables[key] = wandb.Table(columns=list(columns), log_mode="INCREMENTAL")
            for r in rows:
                table.add_data(*r)
        except Exception as e:
            self._warn(f"wandb table {key} failed, left out ({type(e).__name__}: {e})")
            return
        self.log({key: table, STEP_METRIC: tokens}, step=step)

    @property
    def sync_file(self) -> Path | None:
        """This session's run-<id>.wandb file (a resumed offline run gets a new one per session)."""
        return self._sync_file

    def finish(self, exit_code: int = 0, wait_s: float = 10.0) -> None:
        """End the run; then wait (at most wait_s) until the .wandb file holds its exit record.

        wandb 0.31's finish() can return before wandb-core has written the file out (seen: a 7-byte file
        that fills in ~0.3 s later), which would make a read-back or a `wandb sync` right after miss data.
        """
        self.flush()
        if self._run is None:
            return
        try:
            self._run.finish(exit_code=exit_code)
        except Exception as e:
            self._warn(f"wandb finish failed ({type(e).__name__}: {e})")
        self._run = None
        if self._sync_file is not None:
            wait_for_exit_record(self._sync_file, wait_s)

    def _finish_quietly(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # already warned once
                pass


# ------------------------------------------------------------- offline .wandb reader (finish waits with it)
# Layout (wandb-core's store): a 7-byte file header "<4sHB" = (b":W&B", 0xBEE1, version 0), then
# leveldb-log records in 32 KiB blocks: header "<IHB" = (checksum, length, type), type FULL=1 FIRST=2
# MIDDLE=3 LAST=4; a block tail shorter than 7 bytes is zero padding. The checksum is zlib's CRC-32
# (IEEE, not leveldb's CRC-32C) of the data, seeded with the CRC of the type byte.

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_wandb_records(path: str | os.PathLike) -> Iterator[Any]:
    """Yield `wandb_internal_pb2.Record`s of a .wandb file; stops quietly at a torn tail."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack_from("<4sHB", data, 0) if len(data) >= _HEADER else (b"", 0, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a wandb datastore file (header {ident!r} {magic:#x} v{version})")
    pos, pending = _HEADER, b""
    while True:
        if _BLOCK - pos % _BLOCK < _HEADER:
            pos += _BLOCK - pos % _BLOCK  # zero padding at a block end
        if pos + _HEADER > len(data):
            return
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _HEADER: pos + _HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return  # the writer was killed mid-record
        pos += _HEADER + length
        if kind == _FULL:
            pending, payload = b"", chunk
        elif kind in (_FIRST, _MIDDLE):
            pending = (b"" if kind == _FIRST else pending) + chunk
            continue
        elif kind == _LAST:
            pending, payload = b"", pending + chunk
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def wait_for_exit_record(path: str | os.PathLike, timeout_s: float) -> bool:
    """Poll until the .wandb file ends with its exit record; False if it did not within timeout_s."""
    deadline, delay, last_size = time.monotonic() + timeout_s, 0.02, -1
    while True:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        if size != last_size and size > 0:  # parse only when the file grew
            last_size = size
            try:
                if any(r.WhichOneof("record_type") == "exit" for r in iter_wandb_records(path)):
                    return True
            except ValueError:
                pass  # header not written yet
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
