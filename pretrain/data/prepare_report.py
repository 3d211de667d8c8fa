"""What prepare shows: a live progress bar (rich, on a TTY) or plain lines, and the end summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pretrain.units import fmt_bytes, fmt_count, fmt_duration


class Progress:
    """Tokens done of the target, tokens/s, docs/s and ETA (rates over this session)."""

    def __init__(self, total: int, mode: str = "auto", already: int = 0, every: float = 10.0) -> None:
        self.total, self.already, self.every = total, already, every
        self.t0 = self.last = time.monotonic()
        self.done, self.docs = already, 0
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode, self._bar = mode, None
        if mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, TaskProgressColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("prepare"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self._task = self._bar.add_task("prepare", total=total, completed=already, info="")
            self._bar.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _line(self) -> str:
        dt = max(self.elapsed(), 1e-9)
        rate = (self.done - self.already) / dt
        eta = fmt_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{fmt_count(self.done)}/{fmt_count(self.total)} tokens | {fmt_count(rate)} tok/s | "
                f"{fmt_count(self.docs / dt)} docs/s | ETA {eta}")

    def update(self, done: int, docs: int) -> None:
        self.done, self.docs = done, docs
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=self._line())
        elif self.mode == "plain" and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(f"prepare: {self._line()}", flush=True)

    def shard_done(self, name: str, done: int, docs: int) -> None:
        self.done, self.docs = done, docs
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=self._line())
            self._bar.console.print(f"wrote {name}")
        elif self.mode == "plain":
            self.last = time.monotonic()
            print(f"prepare: wrote {name} | {self._line()}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def print_summary(m: dict, out: Path, seconds: float) -> None:
    """One block at the end: what was written, how big, how long."""
    by = {sp: [s for s in m["shards"] if s["split"] == sp] for sp in ("val", "train")}
    tok = {sp: sum(s["tokens"] for s in v) for sp, v in by.items()}
    total = tok["val"] + tok["train"]
    size = sum((out / s["file"]).stat().st_size for s in m["shards"] if (out / s["file"]).exists())
    src = m["source"]
    where = src.get("path") if src.get("kind") == "hub" else f"{len(src.get('files', []))} local file(s)"
    print(f"prepared {out}: {total:,} tokens (val {tok['val']:,} in {len(by['val'])} shard(s), train "
          f"{tok['train']:,} in {len(by['train'])} shard(s)), "
          f"{sum(s.get('documents', 0) for s in m['shards']):,} documents, {fmt_bytes(size)} on disk, "
          f"{fmt_duration(seconds)} this run")
    print(f"  tokenizer {m['tokenizer']} (vocab {m['vocab_size']}, {m['dtype']}); source {where}"
          + (f" {src.get('name')}" if src.get("name") else ""))
    if m.get("source_exhausted"):
        print(f"  note: the source ran out before --tokens {m['target_tokens']:,}")
