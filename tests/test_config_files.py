"""`--config FILE` for the trainer and the launcher (issue 22, item 4): the run dir's config.toml fed back gives the
same run, flags override the file, --print-config prints without running, a bad key is one line and exit 2."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from pretrain.errors import run_cli
from pretrain.plan.entry import main as launch_main
from pretrain.train.entry import main as train_main

FAST = ["--size", "tiny", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--d-ff", "64", "--block-size", "32",
        "--batch-size", "2", "--val-frac", "0.05", "--eval-iters", "1", "--eval-every", "2", "--log-every", "1",
        "--warmup-steps", "1", "--device", "cpu", "--live", "off", "--save-minutes", "0", "--steps", "3"]


def _losses(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss"))) for r in rows if r["type"] in ("train", "eval")]


def test_the_written_config_fed_back_gives_the_same_run(byte_data, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert run_cli(train_main, ["--data", str(byte_data), "--out-dir", str(first), *FAST, "--optimizer", "lion"]) == 0
    written = first / "config.toml"
    cfg = tomllib.loads(written.read_text())
    flat = {k: v for table in cfg.values() for k, v in table.items()}
    assert flat["optimizer"] == "lion" and flat["d_model"] == 32 and flat["vocab_size"] == 256
    assert flat["lr"] > 0 and flat["min_lr"] == pytest.approx(flat["lr"] / 10)  # resolved, not left unset
    assert "overwrite" not in flat

    assert run_cli(train_main, ["--config", str(written), "--out-dir", str(again)]) == 0
    assert _losses(again) == _losses(first) and len(_losses(first)) >= 4
    assert (again / "config.toml").read_text().replace(str(again), "X") == written.read_text().replace(str(first), "X")

    # The same file with its run dir's out_dir resumes that run: nothing left to do, exit 0, no new steps.
    before = (first / "train.jsonl").read_text()
    assert run_cli(train_main, ["--config", str(first)]) == 0
    assert [r for r in (first / "train.jsonl").read_text().splitlines() if '"train"' in r] == \
        [r for r in before.splitlines() if '"train"' in r]


def test_flags_override_the_file_and_print_config_runs_nothing(tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nsize = "tiny"\nlayers = 3\n[optim]\nlr = 1e-3\n[eval]\neval-seq-lens = [64, 128]\n')
    out = tmp_path / "never"
    assert run_cli(train_main, ["--config", str(f), "--lr", "2e-3", "--out-dir", str(out), "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 2e-3 and printed["model"]["n_layer"] == 3
    assert printed["eval"]["eval_seq_lens"] == "64,128" and printed["schedule"]["min_lr"] == pytest.approx(2e-4)
    assert not out.exists()


def test_yaml_and_a_run_dir_are_accepted(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 6e-4\nattn_mode: gqa\nkv_head: 2\nn_head: 4\n")  # YAML reads 6e-4 as a string
    assert run_cli(train_main, ["--config", str(f), "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 6e-4 and printed["model"]["n_kv_head"] == 2


@pytest.mark.parametrize("text, words", [
    ("learning_rate = 1e-3\n", ["unknown key 'learning_rate'", "did you mean 'lr'"]),
    ("atn_mode = 'gqa'\n", ["unknown key 'atn_mode'", "did you mean 'attn'"]),
    ("steps = 'many'\n", ["steps = 'many'", "not a valid int"]),
    ("tie_qk = 1\n", ["tie_qk = 1", "true or false"]),
    ("attn = 'flash'\n", ["attn = 'flash'", "use one of"]),
    ("steps = \n", ["not readable as TOML"]),
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, capsys, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert run_cli(train_main, ["--config", str(f), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --config"), err
    for w in words:
        assert w in err, err


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert run_cli(train_main, ["--config", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_launcher_print_config_round_trips_the_plan(tmp_path, capsys, monkeypatch, untraced_plan_memory):
    monkeypatch.chdir(tmp_path)
    args = ["--vram", "24", "--size", "tiny", "--target-tokens", "1M", "--variant", "gqa", "--tag", "t1",
            "--lr", "4e-4", "--json"]
    assert launch_main([*args]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert launch_main([*args, "--print-config"]) == 0
    text = capsys.readouterr().out
    written = tomllib.loads(text)
    assert written["launcher"]["vram"] == "24" and written["trainer"]["lr"] == 4e-4
    (tmp_path / "launch.toml").write_text(text)
    assert launch_main(["--config", "launch.toml"]) == 0
    assert json.loads(capsys.readouterr().out) == plan
    # a flag overrides the file's value
    assert launch_main(["--config", "launch.toml", "--lr", "5e-4"]) == 0
    assert "--lr 0.0005" in " ".join(json.loads(capsys.readouterr().out)["command"])


def test_launcher_file_key_typo_is_one_line(tmp_path, capsys):
    f = tmp_path / "l.toml"
    f.write_text("target_token = '1B'\n")
    assert run_cli(launch_main, ["--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'target_tokens'" in err, err
