"""Run comparison (table, overlaid val-loss PNG, CLI errors) and TensorBoard files, on two tiny real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import plots_unrendered
from test_train import FAST

from pretrain.errors import run_cli
from pretrain.track.compare import compare_runs, format_table, main, plot_val_curves
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import parse_config
from pretrain.train.loop import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(byte_data, tmp_path_factory) -> dict[str, Path]:
    """A baseline run with --tb and a GQA run, 6 steps each, evals at 0, 3 and 6."""
    root = tmp_path_factory.mktemp("runs")
    variants = {"base": ["--tb"], "gqa": ["--attn", "gqa", "--n-kv-head", "2"]}
    with pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # compare draws its own plots from train.jsonl
        for name, flags in variants.items():
            cfg = parse_config(["--data", str(byte_data), "--out-dir", str(root / name), *FAST, "--steps", "6",
                                "--eval-every", "3", "--save-every", "0", *flags])
            train(cfg)
    return {name: root / name for name in variants}


def test_rows_hold_what_decides_between_variants(runs):
    base, gqa = compare_runs([runs["base"], runs["gqa"]])
    assert (base["run"], base["variant"], gqa["variant"]) == ("base", "baseline", "gqa kv2")
    assert base["params"] > gqa["params"] > 0  # fewer k/v heads, fewer projection weights
    # d_model 64, 2 layers, bf16: baseline caches 2 x 64 values per layer, GQA half of that.
    assert base["kv_bytes_per_token"] == 2 * 2 * 64 * 2 == 2 * gqa["kv_bytes_per_token"]
    evals = [e for e in read_jsonl(runs["base"] / "train.jsonl") if e["type"] == "eval"]
    assert base["final_val_loss"] == evals[-1]["loss"]
    assert base["best_val_loss"] == min(e["loss"] for e in evals)
    assert base["tokens"] == 6 * 4 * 32 and base["steps"] == 6 and base["planned_steps"] == 6
    assert base["status"] == "completed" and base["tok_s"] > 0


def test_table_lists_every_run_and_marks_the_best(runs):
    rows = compare_runs([runs["base"], runs["gqa"]])
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["run", "variant", "params"] and "KV B/tok" in lines[0]
    assert len(lines) == 4 and lines[2].startswith("base") and lines[3].startswith("gqa")
    assert sum(line.rstrip().endswith((" *", " ~")) or " * " in line or " ~ " in line for line in lines) == 1
    assert "6/6" in lines[2] and "completed" in lines[2]


def test_parent_dir_expands_to_its_runs(runs):
    assert [r["run"] for r in compare_runs([runs["base"].parent])] == ["base", "gqa"]


def test_unfinished_run_compares_as_far_as_it_got(runs, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (runs["base"] / "train.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["type"] != "end" and json.loads(line).get("step", 0) <= 3]
    (partial / "train.jsonl").write_text("\n".join(kept) + '\n{"type": "train", "step": 4, "lo')  # torn line
    (row,) = compare_runs([partial])
    assert row["status"] == "unfinished" and row["steps"] == 3 and row["final_val_loss"] is not None


def test_plot_is_a_png(runs, tmp_path):
    out = plot_val_curves([runs["base"], runs["gqa"]], tmp_path / "sub" / "cmp.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000


def test_cli_prints_table_and_writes_png(runs, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main([str(runs["base"]), str(runs["gqa"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best val" in printed and str(out) in printed
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert main([str(runs["base"]), "--json", "--no-plot"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["variant"] == "baseline"


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_bad_paths_are_one_line_errors(tmp_path, capsys, make):
    path = tmp_path / "x"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("not a run")
    assert run_cli(main, [str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err
    assert not list(tmp_path.glob("*.png"))


def test_tb_writes_readable_event_files(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((runs["base"] / "tb").glob("events.out.tfevents.*"))
    assert files, "--tb wrote no event file"
    acc = EventAccumulator(str(runs["base"] / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/loss"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 3, 6]
    assert not (runs["gqa"] / "tb").exists()  # off unless asked for


def test_an_extended_run_shows_its_new_length(runs, byte_data, tmp_path, capsys):
    """A run extended from 6 to 9 steps (same command, higher --steps) has done 9 of 9, not 9 of 6."""
    import shutil

    run = tmp_path / "base"
    shutil.copytree(runs["base"], run)
    train(parse_config(["--data", str(byte_data), "--out-dir", str(run), *FAST, "--steps", "9", "--eval-every", "3",
                        "--save-every", "0", "--tb"]))
    assert main([str(run), "--no-plot"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "base" in line)
    assert " 9/9 " in f" {row} " and "9/6" not in row


def test_steps_come_from_the_end_event_and_same_names_show_paths(runs, tmp_path):
    """A signal-stopped run saved one step past its last train line; two roots may hold the same run name."""
    stopped = tmp_path / "a" / "base"
    stopped.mkdir(parents=True)
    records = [r for r in read_jsonl(runs["base"] / "train.jsonl") if r["type"] in ("meta", "train", "eval")]
    records = [r for r in records if r.get("step", 0) <= 4]
    records.append({"type": "end", "status": "stopped by signal SIGINT", "step": 5, "tokens": 5 * 4 * 32})
    (stopped / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    a, b = compare_runs([stopped, runs["base"]])
    assert (a["steps"], a["tokens"], a["status"]) == (5, 640, "stopped by signal SIGINT")
    assert (a["run"], b["run"]) == (str(stopped), str(runs["base"]))


def test_seed_groups_count_finished_runs_once_per_recorded_seed(runs, byte_data, tmp_path, capsys):
    """A seed group's mean holds finished runs with distinct recorded seeds: a copy of a run (same seed) and a
    run killed after its step-0 eval are shown on rows of their own saying why, never averaged in."""
    import shutil

    seed2 = tmp_path / "base-seed2"
    train(parse_config(["--data", str(byte_data), "--out-dir", str(seed2), *FAST, "--steps", "6",
                        "--eval-every", "3", "--save-every", "0", "--seed", "2"]))
    copy = tmp_path / "zz-copy-of-base"  # the directory name says nothing; the recorded seed does
    shutil.copytree(runs["base"], copy)
    killed = tmp_path / "base-seed3"  # killed right after its step-0 eval
    records = [r for r in read_jsonl(runs["base"] / "train.jsonl") if r["type"] in ("meta", "eval")][:2]
    records[0]["train_config"]["seed"] = 3
    killed.mkdir()
    (killed / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    assert main([str(runs["base"]), str(seed2), str(copy), str(killed), "--json", "--no-plot"]) == 0
    rows = {r["run"].split(" ")[0]: r for r in json.loads(capsys.readouterr().out)}
    mean = rows["base"]
    assert mean["seeds"] == 2 and mean["members"] == ["base", "base-seed2"] and mean["seed_list"] == [2, 1337]
    finished = compare_runs([runs["base"], seed2])
    assert mean["best_val_loss"] == pytest.approx(sum(r["best_val_loss"] for r in finished) / 2)
    assert mean["status"] == "completed"
    assert "duplicate of base" in rows["zz-copy-of-base"]["note"] and "seed 1337" in rows["zz-copy-of-base"]["note"]
    assert "unfinished" in rows["base-seed3"]["note"] and rows["base-seed3"]["seeds"] is None

    out = tmp_path / "cmp.png"
    assert main([str(runs["base"]), str(seed2), str(copy), str(killed), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "note" and out.read_bytes()[:8] == PNG_MAGIC
    (mean_line,) = [line for line in table if line.startswith("base (+1 seed)")]
    assert " 2 " in mean_line and "completed" in mean_line and "mixed" not in mean_line
    (copy_line,) = [line for line in table if line.startswith("zz-copy-of-base")]
    assert "not in the mean" in copy_line and "*" not in copy_line  # the best mark is for counted rows only
