"""The run status type renders exactly the strings train.jsonl's `end` event has always held, and reads them back."""

import signal

import pytest

from pretrain.runstatus import COMPLETE, COMPLETED, Ending, RunStatus, stopped, stopped_by_signal

WRITTEN = ["completed", "complete", "stopped by signal SIGTERM", "stopped by signal on another rank",
           "stopped: 3 non-finite steps in a row at step 7", "stopped by signal SIGINT before its first step",
           "stopped by signal SIGTERM; final save failed", "completed; final save failed"]


@pytest.mark.parametrize("text", WRITTEN)
def test_status_strings_round_trip(text):
    assert str(RunStatus.parse(text)) == text


def test_status_kinds():
    assert str(stopped_by_signal(signal.SIGTERM)) == "stopped by signal SIGTERM"
    assert str(stopped_by_signal(None)) == "stopped by signal on another rank"
    assert str(stopped("shard changed")) == "stopped: shard changed"
    assert RunStatus.parse("completed").finished and RunStatus.parse("complete") == COMPLETE
    assert not RunStatus.parse("completed; final save failed").finished
    assert RunStatus.parse("completed; final save failed") != COMPLETED
    before = RunStatus.parse("stopped by signal SIGHUP before its first step")
    assert before.by_signal and before.before_first_step and before.detail == "SIGHUP"
    assert RunStatus.parse("stopped: x").kind is Ending.STOPPED_ERROR
    assert RunStatus.parse("unfinished") is None and RunStatus.parse(None) is None
