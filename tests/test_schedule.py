"""Sequence-length schedule, LR schedules and token planning (shared by the launcher and the trainer)."""

from __future__ import annotations

import pytest

from pretrain.errors import UserError
from pretrain.schedule import (
    lr_at,
    parse_count,
    parse_seq_schedule,
    phases,
    planned_tokens,
    seq_len_at,
    steps_for_tokens,
)


def test_parse_schedule_and_lookup():
    pts = parse_seq_schedule("512@0,1024@2000", 2048, 2048)
    assert pts == [(0, 512), (2000, 1024)]
    assert [seq_len_at(pts, s) for s in (0, 1999, 2000, 10**6)] == [512, 512, 1024, 1024]
    # A schedule starting later runs at the default length first.
    assert parse_seq_schedule("1024@100", 256, 1024) == [(0, 256), (100, 1024)]
    assert parse_seq_schedule("", 256, 1024) == [(0, 256)]


@pytest.mark.parametrize("spec, match", [
    ("4096@0", "block size"), ("512@10,256@5", "increase"), ("512-0", "LEN@STEP"), ("0@0", "positive"),
])
def test_bad_schedules_name_the_fix(spec, match):
    with pytest.raises(UserError, match=match):
        parse_seq_schedule(spec, 512, 2048)


def test_planned_tokens_equal_brute_force_sum():
    pts = parse_seq_schedule("128@0,256@7,512@19", 512, 512)
    for steps in (1, 7, 8, 19, 20, 33):
        brute = sum(seq_len_at(pts, s) * 6 for s in range(steps))
        assert planned_tokens(pts, steps, 6) == brute
    assert sum(p.steps for p in phases(pts, 10)) == 10 and phases(pts, 10)[-1].seq_len == 256


@pytest.mark.parametrize("target", [1, 768, 769, 5000, 10_000, 123_457])
def test_steps_for_tokens_is_minimal(target):
    pts = parse_seq_schedule("128@0,256@7,512@19", 512, 512)
    steps = steps_for_tokens(pts, target, 6)
    assert planned_tokens(pts, steps, 6) >= target
    assert steps == 1 or planned_tokens(pts, steps - 1, 6) < target


def test_lr_schedules():
    kw = dict(lr=1.0, min_lr=0.1, total_steps=100, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    cos = [lr_at(s, **kw, schedule="cosine") for s in range(10, 100)]
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    wsd = [lr_at(s, **kw, schedule="wsd", decay_frac=0.2) for s in range(10, 100)]
    assert wsd[:70] == [1.0] * 70 and wsd[-1] == pytest.approx(0.1) and wsd[75] < 1.0
    assert lr_at(99, **kw, schedule="constant") == 1.0


@pytest.mark.parametrize("text, value", [("500K", 500_000), ("100M", 10**8), ("1B", 10**9), ("2.5b", 2_500_000_000),
                                         ("2000000", 2_000_000), ("10_000", 10_000), ("1.5m", 1_500_000),
                                         ("2k", 2000)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["ten", "-5M", "0", "1Q", "", "nanB", "abc", "-5"])
def test_parse_count_rejects_junk(text):
    with pytest.raises(UserError):
        parse_count(text)
