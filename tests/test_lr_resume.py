"""The learning rate is continuous across every resume, also when the run length changes (issue 11.4):
a cosine run keeps its original horizon and continues at min_lr, a wsd run mid-decay keeps its horizon, and a
wsd run still in its stable phase simply decays later."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_track_trust import FAST, events, sigterm_at_batch, trainer

from pretrain.errors import EXIT_STOPPED
from pretrain.schedule import lr_at

PEAK, MIN = 3e-3, 3e-4


def lrs(out: Path) -> list[float]:
    return [e["lr"] for e in events(out, "train")]


def expected(schedule: str, horizon: int, steps: int) -> list[float]:
    # The train line of step N carries the LR that step used, lr_at(N - 1).
    return [lr_at(s, lr=PEAK, min_lr=MIN, total_steps=horizon, warmup_steps=2, schedule=schedule, decay_frac=0.5)
            for s in range(steps)]


@pytest.mark.parametrize("schedule,stop_batch,first,then,horizon,says", [
    ("cosine", None, 6, 10, 6, "cosine schedule over the original 6 steps; from step 6 on it stays at min_lr"),
    ("wsd", 7, 8, 12, 8, "wsd schedule over the original 8 steps"),  # stopped mid-decay (decay starts at 4)
    ("wsd", 3, 8, 12, 12, "wsd still in its stable phase"),  # stopped at step 2, stable under both lengths
])
def test_lr_is_continuous_when_a_resume_changes_the_run_length(byte_data, tmp_path, monkeypatch, capsys,
                                                              schedule, stop_batch, first, then, horizon, says):
    assert float(FAST[FAST.index("--lr") + 1]) == PEAK
    out = tmp_path / "r"
    flags = ["--lr-schedule", schedule, "--decay-frac", "0.5", "--min-lr", str(MIN), "--eval-every", "0",
             "--save-every", "0"]
    if stop_batch:
        sigterm_at_batch(monkeypatch, stop_batch)
    assert trainer(byte_data, out, *flags, "--steps", str(first)) == (EXIT_STOPPED if stop_batch else 0)
    monkeypatch.undo()
    assert trainer(byte_data, out, *flags, "--steps", str(then)) == 0

    got = lrs(out)
    assert got == pytest.approx(expected(schedule, horizon, then))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(got[2:], got[3:]))  # after warmup it never rises
    assert got[-1] == pytest.approx(MIN)
    assert f"run length changed from {first} to {then} steps: " in capsys.readouterr().out
    resume = next(e for e in events(out, "resume"))
    assert resume["lr_horizon"] == horizon and says in resume["lr_note"]
    assert says in (out / "summary.md").read_text()
