"""A stop request ends any long pass of the trainer within ~2 s: the flag those passes poll, and the exception.

The trainer's signal handler (pretrain/train/loop.py `StopRequested`: SIGTERM, SIGINT, SIGUSR1, SIGHUP) records
the request here. Passes that only read the model (evals, diagnostics, samples, downstream) call `check()` once
per batch / token / item: it raises `StopNow`, which unwinds to the training loop; the loop saves the state of
the last full step and the trainer exits `EXIT_STOPPED` (pretrain/cli.py). A call that cannot poll (the first
forward of a compiled model compiles for up to minutes) runs inside `interruptible()`, where the handler
raises `StopNow` itself; the loop opens such a region only where no training state is mid-update (never around
the optimizer step or a checkpoint snapshot).

In-pass stops are off until the loop `arm`s them: a command that never installed the trainer's handler
(`python -m pretrain.evals.downstream`) is never stopped this way, and under torchrun, where every rank must
stop after the same step, the loop only checks the flag at step boundaries (all ranks agree there).
Signals are process-wide, so is this state.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class StopNow(BaseException):
    """A stop request cut a long pass short. BaseException, like KeyboardInterrupt: library code that catches
    Exception (torch.compile's suppress_errors, tracker clients) must not swallow it."""


_signum: int | None = None
_armed = False
_regions = 0  # depth of interruptible() regions the main thread is in


def reset() -> None:
    """Forget any request and disarm (a trainer starting or ending in this process)."""
    global _signum, _armed, _regions
    _signum, _armed, _regions = None, False, 0


def arm(on: bool = True) -> None:
    """Let passes stop mid-way (single-process runs) from now on; a request that already came applies at once."""
    global _armed
    _armed = on


def request(signum: int) -> None:
    """Record a stop request (called from the signal handler); raises StopNow inside an interruptible region."""
    global _signum
    first = _signum is None
    _signum = signum
    if first and _armed and _regions:
        raise StopNow(describe())


def requested() -> bool:
    return _signum is not None


def describe() -> str:
    """The run's end status for this request, as train.jsonl's `end` event has always written it."""
    name = signal.Signals(_signum).name if _signum else "on another rank"
    return f"stopped by signal {name}"


def check() -> None:
    """Raise StopNow when a stop was requested and passes may stop mid-way; cheap, call it per batch/token/item."""
    if _signum is not None and _armed:
        raise StopNow(describe())


@contextmanager
def interruptible() -> Iterator[None]:
    """A region the signal handler may leave by raising StopNow: only for work that changes no state the
    checkpoint holds, or whose partial effects the stop path discards (a micro-batch's gradients)."""
    global _regions
    check()
    _regions += 1
    try:
        yield
    finally:
        _regions -= 1
