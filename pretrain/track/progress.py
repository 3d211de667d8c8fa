"""Progress of work that can take minutes outside the training steps (evals, downstream, the inference benchmark).

Silent when the work is quick: the first line comes after AFTER_SECONDS, then one every EVERY_SECONDS, and a
last one when done, on stderr ("downstream: 120/500 items (24%), 31 s, ~98 s left"). A time check per item
is all it costs, and it never runs inside the training step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

AFTER_SECONDS = 5.0
EVERY_SECONDS = 10.0

T = TypeVar("T")


class Progress:
    """Report `done` of `total` `unit` of `what` now and then (see the module docstring); `show=False`: silent."""

    def __init__(self, what: str, total: int, unit: str, show: bool = True) -> None:
        self.what, self.total, self.unit, self.show = what, total, unit, show
        self.start = time.monotonic()
        self.next = self.start + AFTER_SECONDS
        self.done = 0
        self.shown = False

    def step(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if not self.show or now < self.next:
            return
        self.next = now + EVERY_SECONDS
        self.shown = True
        elapsed = now - self.start
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        left = f", ~{elapsed / done * (self.total - done):.0f} s left" if done and self.total > done else ""
        print(f"{self.what}: {done}/{self.total} {self.unit}{pct}, {elapsed:.0f} s{left}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        """A last line, only when progress was shown (so the reader sees it ended)."""
        if self.show and self.shown:
            print(f"{self.what}: {self.done}/{self.total} {self.unit} in {time.monotonic() - self.start:.0f} s",
                  file=sys.stderr, flush=True)
            self.shown = False


def tracked(items: Iterable[T], what: str, unit: str, total: int | None = None, show: bool = True) -> Iterator[T]:
    """`items`, reporting progress as they are consumed (total: len(items) unless given)."""
    progress = Progress(what, len(items) if total is None else total, unit, show)  # type: ignore[arg-type]
    try:
        for i, item in enumerate(items, 1):
            yield item
            progress.step(i)
    finally:
        progress.close()
