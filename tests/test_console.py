"""Console output: plain lines, the rich live view, and the pure line formatter."""

from __future__ import annotations

import io

from pretrain.track.console import Console, format_eval_line, format_train_line

FULL = {"loss": 4.231, "lr": 3e-4, "grad_norm": 0.912, "tok_s": 41234.0, "mfu": 0.381, "step_ms": 512.3,
        "mem_peak_gb": 12.34}


def test_format_train_line_full():
    line = format_train_line(120, 2000, FULL)
    assert line.startswith("step ") and "120/2000" in line
    assert line.split(" | ")[1:] == ["loss 4.2310", "lr 3.00e-04", "gnorm 0.91", "41.2k tok/s", "mfu 38.1%",
                                     "512ms", "mem 12.3GB"]


def test_format_train_line_missing_keys():
    line = format_train_line(5, 0, {"loss": 3.0, "mfu": None, "lr": None, "tok_s": 812.0})
    assert line == "step     5 | loss 3.0000 | 812 tok/s"
    assert "mfu" not in format_train_line(1, 10, {"mfu": None})
    assert format_train_line(1, 10, {}).strip() == "step     1/10"
    assert "loss nan" in format_train_line(1, 10, {"loss": float("nan")})
    assert "mem 0.5GB" in format_train_line(1, 10, {"mem_rss_gb": 0.5})
    assert "skipped 2" in format_train_line(1, 10, {"skipped": 2})


def test_format_eval_line():
    assert format_eval_line(100, {"val_loss": 3.0}) == "eval step 100 | val loss 3.0000 | ppl 20.09"


def test_basic_mode_prints_one_line_per_update():
    buf = io.StringIO()
    con = Console("basic", total_steps=2000, file=buf)
    con.update(120, FULL)
    con.print("warning: something")
    con.update(121, {"loss": 4.1})
    con.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert "120/2000" in lines[0] and "loss 4.2310" in lines[0] and "mfu 38.1%" in lines[0]
    assert lines[1] == "warning: something"
    assert "121/2000" in lines[2] and "eta " in lines[2]  # second update of the session has a pace


def test_auto_mode_on_non_tty_is_basic():
    con = Console("auto", total_steps=10, file=io.StringIO())
    assert con.mode == "basic"


def test_off_mode_prints_no_steps(capsys):
    buf = io.StringIO()
    con = Console("off", total_steps=10, file=buf)
    con.update(1, FULL)
    con.print("warning: kept")
    con.close()
    assert buf.getvalue() == ""
    assert "warning: kept" in capsys.readouterr().err


def test_rich_mode_to_non_tty_buffer():
    buf = io.StringIO()
    con = Console("rich", total_steps=100, start_step=10, file=buf)
    con.update(11, FULL)
    con.print("[not markup] checkpoint saved")
    con.update({"step": 12, "loss": 4.0, "mfu": None})  # update(metrics) form
    con.close()
    con.close()
    out = buf.getvalue()
    assert "[not markup] checkpoint saved" in out
    assert "loss 4.0000" in out and "12/100" in out
