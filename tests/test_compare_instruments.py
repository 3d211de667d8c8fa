"""Seeds and measured inference cost, as a user gets them: run_1b_launch.py --seeds N --run trains one run dir
per seed; python -m pretrain.evals.infer_bench / compare --measure measure each variant; compare shows seed groups
as mean ± sd (and bands), the measured columns, and the val-loss-vs-KV-bytes scatter."""

from __future__ import annotations

import json

import pytest
from conftest import plots_unrendered, trainers_in_process

from model.variants import ATTENTION_VARIANTS
from pretrain.errors import run_cli
from pretrain.evals.infer_bench import main as bench_main
from pretrain.plan.launch import main as launch_main
from pretrain.track.compare import main as compare_main
from pretrain.track.runlog import read_jsonl
from pretrain.train.loop import main as train_main

SMALL = ["--vram", "cpu", "--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "128",
         "--block-size", "64", "--batch-size", "4", "--grad-accum", "1", "--train-seq-len", "32", "--steps", "4",
         "--eval-iters", "2", "--eval-every", "2", "--log-every", "1", "--save-every", "0", "--save-minutes", "0",
         "--live", "off", "--val-frac", "0.05", "--no-compile", "--no-grad-checkpoint", "--param-dtype", "fp32"]


def _launch(*args: str) -> int:
    return run_cli(launch_main, list(args))


@pytest.fixture(scope="module")
def runs(made_bytes, tmp_path_factory):
    """runs/: two seeds of baseline (one --seeds 2 launch, its trainers run in this process) and one gqa run."""
    root = tmp_path_factory.mktemp("cmp") / "runs"
    with pytest.MonkeyPatch.context() as m:
        trainers_in_process(m)
        plots_unrendered(m)  # compare draws its own plots from train.jsonl
        assert _launch("--data", str(made_bytes), *SMALL, "--seeds", "2", "--seed", "5", "--run-root", str(root),
                       "--run") == 0
        gqa = ["--attn", "gqa", "--n-kv-head", "1", "--out-dir", str(root / "tiny-gqa_kv1"), "--data", str(made_bytes)]
        assert train_main([*gqa, *SMALL[2:], "--device", "cpu"]) == 0
    return root


def test_launcher_plans_one_run_dir_per_seed(runs):
    seeded = sorted(d.name for d in runs.iterdir() if d.name.startswith("tiny-baseline"))
    assert seeded == ["tiny-baseline-s5", "tiny-baseline-s6"]
    seeds = [next(e for e in read_jsonl(runs / n / "train.jsonl") if e["type"] == "meta")["train_config"]["seed"]
             for n in seeded]
    assert seeds == [5, 6]


def test_infer_bench_presets_measure_kv_bytes_that_match_the_formula(capsys):
    assert bench_main(["--preset", "tiny", "--lengths", "64,128", "--decode-tokens", "2", "--json"]) == 0
    results = {r["variant"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(results) == set(ATTENTION_VARIANTS)
    for r in results.values():
        assert r["kv_match"] and r["lengths"] == [64, 128]
        assert r["decode_tok_s@128"] > 0 and r["prefill_tok_s@128"] > 0
        # Peak memory holds at least the weights and the cache itself.
        assert r["peak_mem_bytes@128"] > r["kv_bytes_per_token"] * 128
    assert results["gqa"]["kv_bytes_per_token"] < results["baseline"]["kv_bytes_per_token"]


def test_compare_measure_groups_seeds_and_adds_measured_columns(runs, capsys):
    out = runs.parent / "cmp.png"
    assert compare_main([str(runs), "--measure", "--measure-lengths", "32,64", "--decode-tokens", "2",
                         "--out", str(out)]) == 0
    text = capsys.readouterr().out
    header, _, *lines = text.splitlines()
    assert "seeds" in header and "KV B/tok meas" in header and "dec tok/s@64" in header
    base = next(ln for ln in lines if ln.startswith("tiny-baseline"))
    assert "(+1 seed)" in base and " ± " in base and " 2 " in base
    assert out.is_file() and out.with_name("cmp_kv.png").is_file()
    infer = [e for e in read_jsonl(runs / "tiny-gqa_kv1" / "train.jsonl") if e["type"] == "infer"]
    assert len(infer) == 1 and infer[0]["kv_match"] and infer[0]["lengths"] == [32, 64]

    assert compare_main([str(runs), "--json", "--no-plot"]) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)}
    base, gqa = rows["baseline"], rows["gqa kv1"]
    assert base["seeds"] == 2 and base["members"] == ["tiny-baseline-s5", "tiny-baseline-s6"]
    assert base["best_val_loss_sd"] > 0 and gqa["seeds"] == 1
    assert gqa["kv_measured"] == gqa["kv_bytes_per_token"] < base["kv_measured"]  # bf16: the formula's 2 bytes
    assert compare_main([str(runs), "--json", "--no-plot", "--per-seed"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_bad_bench_input_is_one_line_exit_2(tmp_path, capsys):
    for args in ([str(tmp_path)], ["--preset", "tiny", "--lengths", "1K,zero"], []):
        assert run_cli(bench_main, args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert _launch("--vram", "cpu", "--seeds", "0", "--run-root", str(tmp_path / "runs")) == 2
    assert capsys.readouterr().err.startswith("error: --seeds") and not any(tmp_path.iterdir())
