"""The launcher tells runs apart (issue 11.5): the seed is in the run name and plan, another token budget is
another run unless --extend, and the plan says what an extension does to the learning rate (issue 11.4)."""

from __future__ import annotations

import pytest
from conftest import trainers_in_process

from pretrain.plan import launch
from pretrain.schedule import lr_at
from pretrain.track.runlog import read_jsonl

SMALL = ["--vram", "cpu", "--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128",
         "--block-size", "64", "--batch-size", "4", "--seq-schedule", "32@0", "--eval-iters", "2", "--eval-every", "0",
         "--save-every", "0", "--log-every", "1", "--live", "off", "--lr", "1e-3", "--min-lr", "1e-4",
         "--warmup-steps", "1"]


def test_seed_and_budget_identify_a_run_and_only_extend_names_an_extension(tmp_path, byte_data, capsys, monkeypatch):
    trainers_in_process(monkeypatch)
    base = [*SMALL, "--data", str(byte_data), "--val-frac", "0.05", "--run-root", str(tmp_path), "--seed", "7"]
    assert launch.main([*base, "--steps", "4", "--run"]) == 0
    run = tmp_path / "tiny-baseline-s7"
    assert [e["step"] for e in read_jsonl(run / "train.jsonl") if e["type"] == "train"][-1] == 4
    capsys.readouterr()

    # Another seed or the default seed: other names; the plan shows the seed.
    assert launch.main([*base[:-2], "--seed", "8", "--steps", "4"]) == 0
    assert "tiny-baseline-s8 (fresh); seed 8" in capsys.readouterr().out
    _, default = launch.plan_from_argv([*base[:-2], "--steps", "4"], gpu=None)
    assert default.run["dir"] == str(tmp_path / "tiny-baseline")

    # The same command again: the run is complete. Another budget: a new run, and the plan says how to extend.
    _, same = launch.plan_from_argv([*base, "--steps", "4"], gpu=None)
    assert same.run["action"] == "complete"
    assert launch.main([*base, "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert f"{run}-2 (fresh)" in out and "holds a run of 4 steps and this plan has 8" in out and "--extend" in out

    # --extend continues it, and the plan states what happens to the LR; the LR then does exactly that.
    assert launch.main([*base, "--steps", "8", "--extend", "--run"]) == 0
    out = capsys.readouterr().out
    assert (f"{run} (resume: --extend: run length 4 -> 8 steps from step 4; LR keeps its cosine schedule over the "
            "original 4 steps; from step 4 on it stays at min_lr)") in out
    lrs = [e["lr"] for e in read_jsonl(run / "train.jsonl") if e["type"] == "train"]
    assert lrs == pytest.approx([lr_at(s, lr=1e-3, min_lr=1e-4, total_steps=4, warmup_steps=1) for s in range(8)])
    _, again = launch.plan_from_argv([*base, "--steps", "8"], gpu=None)  # now the 8-step run is this one
    assert again.run["dir"] == str(run) and again.run["action"] == "complete"
