"""What a checkpoint mirror holds and how bytes get there and back (pretrain/train/mirror.py runs it).

Layout under URL/<run dir name>/ on any fsspec filesystem: `step_<N>.pt` (the bytes of that save's last.pt),
train.jsonl, then the marker `step_<N>.json` (size and sha256), written last: a checkpoint is good only when its
marker exists and the bytes match it, so a half-uploaded file is never taken for one. `best.pt` + `best.json`
likewise (a server-side copy of the step). Every write is a plain object put, so S3, GCS, the Hub and a mounted
directory behave alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_STEP = re.compile(r"step_(\d+)\.(pt|json)")
CHUNK = 16 << 20
TMP_PREFIX = ".ckpt-tmp-"  # the checkpoint manager's prefix: a pull killed mid-way leaves nothing loadable


class MirrorStore:
    """One run's directory on the mirror: list its good checkpoints, upload one, download one, prune."""

    def __init__(self, url: str, run_dir: Path, keep: int, warn: Callable[[str], None]) -> None:
        import fsspec

        self.run_dir = Path(run_dir)
        self.url = mirror_url(url, self.run_dir)
        self.warn = warn
        # A fresh instance: fsspec caches them, with their listings and endpoints, across runs of one process.
        self.fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        self.root = root.rstrip("/")
        self.keep = max(1, int(keep))  # good steps kept: the newest stands in for last.pt, so at least one
        self._made_root = False

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def listing(self) -> dict[str, int]:
        """Name -> size of the files in the run's mirror dir ({} when it does not exist)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                if e.get("type") != "directory"}

    def markers(self, listing: dict[str, int]) -> list[tuple[int, dict[str, Any]]]:
        """(step, marker) of each checkpoint whose marker exists and whose data has the marker's size, newest first."""
        out = []
        for name in listing:
            m = _STEP.fullmatch(name)
            if not m or m.group(2) != "json" or f"step_{m.group(1)}.pt" not in listing:
                continue
            try:
                marker = json.loads(self.fs.cat_file(self.path(name)))
            except Exception as e:  # noqa: BLE001 - a damaged marker is a checkpoint that is not good
                self.warn(f"mirror: ignoring {self.path(name)} ({type(e).__name__}: {e})")
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
        return _upload(self.fs, src, self.path(name))

    def upload_checkpoint(self, file: IO[bytes], step: int, best: bool) -> int:
        """The checkpoint in `file` as step `step` (and best.pt), train.jsonl, the marker, then pruning; its size."""
        marker_name = f"step_{step}.json"
        if self.fs.exists(self.path(marker_name)):  # the same step saved again: unmark before overwriting
            self.fs.rm_file(self.path(marker_name))
        size, sha = self._put(file, f"step_{step}.pt")
        self.put_files(summary=False)  # before the marker: a good checkpoint's log holds every step up to it
        marker = {"step": step, "size": size, "sha256": sha, "time": time.time()}
        self.fs.pipe_file(self.path(marker_name), json.dumps(marker).encode())  # last: now it is good
        if best:
            if self.fs.exists(self.path("best.json")):
                self.fs.rm_file(self.path("best.json"))
            self.fs.copy(self.path(f"step_{step}.pt"), self.path("best.pt"))
            self.fs.pipe_file(self.path("best.json"), json.dumps(marker).encode())
        self.prune()
        return size

    def put_files(self, summary: bool) -> None:
        """train.jsonl as it is now (and summary.md)."""
        for name in ("train.jsonl", "summary.md") if summary else ("train.jsonl",):
            local = self.run_dir / name
            if local.is_file():
                with open(local, "rb") as f:
                    self._put(f, name)

    def prune(self) -> None:
        """Keep the newest `keep` good steps; drop older ones and data left without a marker by a failed upload."""
        listing = self.listing()
        good = [s for s, _ in self.markers(listing)]
        if not good:
            return
        keep = set(good[: self.keep])
        steps = {int(m.group(1)) for n in listing if (m := _STEP.fullmatch(n))}
        for step in sorted(s for s in steps if s not in keep and s < good[0]):
            for name in (f"step_{step}.json", f"step_{step}.pt"):  # the marker first: never a good orphan
                if name in listing:
                    self.fs.rm_file(self.path(name))

    def remove_steps(self, after: int | None) -> None:
        """Remove this run's checkpoints from the mirror: those past step `after` (a rollback), or all (None)."""
        listing = self.listing()
        best_step = (self.best_marker() or {}).get("step") if "best.json" in listing else None
        drop_best = after is None or (best_step is not None and best_step > after)
        names = sorted(listing, key=lambda n: not n.endswith(".json"))  # markers first: never a good orphan
        for name in names:
            m = _STEP.fullmatch(name)
            if (m and (after is None or int(m.group(1)) > after)) or (drop_best and name in ("best.json", "best.pt")):
                self.fs.rm_file(self.path(name))

    def best_marker(self) -> dict[str, Any] | None:
        """best.json (the step best.pt holds, its size and sha256), or None when absent or unreadable."""
        try:
            best = json.loads(self.fs.cat_file(self.path("best.json")))
        except Exception:  # noqa: BLE001 - unreadable: treated as absent
            return None
        return best if isinstance(best, dict) and isinstance(best.get("step"), int) else None

    def download(self, name: str, local: Path, marker: dict[str, Any] | None) -> str | None:
        """Remote `name` -> `local` atomically; why it does not match `marker` (then nothing is left), else None."""
        tmp = local.with_name(f"{TMP_PREFIX}{local.name}-mirror")
        digest, size = hashlib.sha256(), 0
        try:
            with self.fs.open(self.path(name), "rb") as src, open(tmp, "wb") as dst:
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
