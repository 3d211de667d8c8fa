"""How a training run ended: a small type the trainer returns and readers test, and its one rendering.

train.jsonl's `end` event keeps the strings it always wrote (users and older tools read them): "completed" (ran
to its last step), "complete" (nothing to do: the run dir already held every step), "stopped by signal SIGTERM"
(or "... on another rank"), "stopped: <why>" (an error stop, e.g. non-finite steps), each stop optionally
followed by " before its first step", and any status by "; final save failed". `RunStatus.parse` reads them
back; no other code looks at the words.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, replace
from typing import Any

_SIGNAL = "stopped by signal "
_ERROR = "stopped: "
_BEFORE = " before its first step"
_SAVE_FAILED = "; final save failed"


class Ending(enum.Enum):
    COMPLETED = "completed"  # trained to its last step (and ran the final eval)
    COMPLETE = "complete"  # nothing to do: the run dir already held every step
    STOPPED_BY_SIGNAL = "stopped by signal"  # resumable: rerun the same command
    STOPPED_ERROR = "stopped"  # the trainer stopped itself (non-finite steps, a changed shard)


@dataclass(frozen=True)
class RunStatus:
    kind: Ending
    detail: str = ""  # the signal's name ("SIGTERM", "on another rank") or why the run stopped
    before_first_step: bool = False  # nothing was trained: the run dir's checkpoint is still current
    save_failed: bool = False  # the final save did not land

    def __str__(self) -> str:
        text = {Ending.COMPLETED: "completed", Ending.COMPLETE: "complete",
                Ending.STOPPED_BY_SIGNAL: _SIGNAL + self.detail, Ending.STOPPED_ERROR: _ERROR + self.detail}[self.kind]
        return text + _BEFORE * self.before_first_step + _SAVE_FAILED * self.save_failed

    @property
    def finished(self) -> bool:
        """Every planned step is trained (now or by an earlier session)."""
        return self.kind in (Ending.COMPLETED, Ending.COMPLETE) and not self.save_failed

    @property
    def by_signal(self) -> bool:
        return self.kind is Ending.STOPPED_BY_SIGNAL

    def with_failed_save(self) -> RunStatus:
        return replace(self, save_failed=True)

    @classmethod
    def parse(cls, text: Any) -> RunStatus | None:
        """The status an `end` event wrote; None for anything else (a missing or unknown value)."""
        if not isinstance(text, str):
            return None
        save_failed = text.endswith(_SAVE_FAILED)
        text = text.removesuffix(_SAVE_FAILED)
        if text in ("completed", "complete"):
            return cls(Ending(text), save_failed=save_failed)
        before = text.endswith(_BEFORE)
        text = text.removesuffix(_BEFORE)
        for prefix, kind in ((_SIGNAL, Ending.STOPPED_BY_SIGNAL), (_ERROR, Ending.STOPPED_ERROR)):
            if text.startswith(prefix):
                return cls(kind, text[len(prefix):], before, save_failed)
        return None


COMPLETED = RunStatus(Ending.COMPLETED)
COMPLETE = RunStatus(Ending.COMPLETE)


def stopped_by_signal(signum: int | None) -> RunStatus:
    """A stop request; None: this rank saw no signal, another rank did (torchrun ranks stop together)."""
    return RunStatus(Ending.STOPPED_BY_SIGNAL, signal.Signals(signum).name if signum else "on another rank")


def stopped(why: str) -> RunStatus:
    return RunStatus(Ending.STOPPED_ERROR, why)

