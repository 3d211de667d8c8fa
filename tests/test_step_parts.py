"""bench/step_parts.py: a step's CPU (or wall) time by part (loss, blocks, clipping, optimizer), each beside its own
GEMMs."""

from __future__ import annotations

import re

import pytest

from bench import step_parts


def _figures(out: str) -> dict[str, tuple[float, float | None]]:
    """name -> (part CPU-ms, its GEMMs' CPU-ms or None) from the report's lines."""
    got = {}
    for line in out.splitlines()[1:]:
        m = re.match(r"  (.+?)\s+([\d.]+)(?:   its GEMMs alone\s+([\d.]+): [\d.]+% of it, -?[\d.]+ outside them)?$",
                     line)
        assert m, line
        got[m.group(1)] = (float(m.group(2)), float(m.group(3)) if m.group(3) else None)
    return got


def test_the_parts_make_up_the_step_and_their_gemms_the_steps_floor(capsys):
    assert step_parts.main(["--preset", "tiny", "--batch", "1", "--seq-len", "32", "--iters", "3",
                            "--threads", "1", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step by part, preset tiny 1 x 32, fp32, 1 threads, host ISA: ")
    got = _figures(out)
    loss, blocks = got["loss (LM head + CE, with its gradient)"], got["blocks (+ embedding, final norm), fwd + bwd"]
    clip, opt, step = got["gradient clipping"], got["optimizer step + zero_grad"], got["the step"]
    # The loss is timed inside the forward (its own autograd node), the blocks are the rest of forward + backward:
    # both were seen, and the four parts account for the step (medians of parts against the median step).
    assert loss[0] > 0 and blocks[0] > 0 and clip[0] > 0 and opt[0] > 0
    assert 0.8 * step[0] < loss[0] + blocks[0] + clip[0] + opt[0] < 1.2 * step[0]
    # Every GEMM of the step is in exactly one part: the LM head's in the loss, the rest in the blocks.
    assert loss[1] > 0 and blocks[1] > 0
    assert loss[1] + blocks[1] == pytest.approx(step[1], abs=0.15)


@pytest.mark.parametrize("wall", [False, True])
def test_wall_times_every_figure_by_the_wall_clock(wall, monkeypatch):
    """--wall: the parts, the step and the GEMMs by perf_counter. With the CPU clock stopped, a CPU-timed report reads
    zero everywhere and a wall-timed one reads the time that passed."""
    import time

    monkeypatch.setattr(time, "process_time", lambda: 0.0)
    res = step_parts.child({"preset": "tiny", "batch": 1, "seq_len": 32, "iters": 2, "precision": "fp32",
                            "wall": wall})
    figures = [*res["parts"].values(), *res["gemms"].values()]
    assert all(f > 0 for f in figures) if wall else all(f == 0 for f in figures)


def test_bad_counts_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        step_parts.main(["--iters", "0"])
    assert exit_.value.code == 2
    assert "--iters, --batch and --seq-len must be at least 1" in capsys.readouterr().err
