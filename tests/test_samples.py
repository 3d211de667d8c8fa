"""Text samples during training (train.jsonl + wandb Table) and the generate CLI, through their entry points."""

from __future__ import annotations

import pytest
from conftest import cli_exit, plots_unrendered
from test_train import FAST
from wandb_records import read_wandb_history

from pretrain.track.runlog import read_jsonl
from pretrain.train.loop import main as train_main


def _train(data, out, *flags) -> int:
    return train_main(["--data", str(data), "--out-dir", str(out), *FAST, *flags])


@pytest.fixture(scope="module")
def sampled_run(made_bytes, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("In the beginning\n\nAnd God said\n")
    with pytest.MonkeyPatch.context() as m:
        plots_unrendered(m)  # read here: train.jsonl and the .wandb file
        assert _train(made_bytes, out, "--steps", "4", "--sample-every", "2", "--sample-prompts", str(prompts),
                      "--sample-tokens", "12", "--wandb", "--wandb-mode", "offline") == 0
    return out


def test_samples_go_to_train_jsonl_and_a_wandb_table(sampled_run):
    samples = [e for e in read_jsonl(sampled_run / "train.jsonl") if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [2, 4]
    for e in samples:
        assert [r["prompt"] for r in e["samples"]] == ["In the beginning", "And God said"]
        assert all(isinstance(r["greedy"], str) and isinstance(r["sampled"], str) for r in e["samples"])
    rows = [r for f in sampled_run.glob("wandb/offline-run-*/run-*.wandb") for r in read_wandb_history(f)]
    tables = {r["_step"]: r for r in rows if r.get("samples/_type") == "incremental-table-file"}
    assert sorted(tables) == [2, 4] and tables[4]["samples/nrows"] == 4  # one table, grown by each round
    # The final eval shares step 4 with the last train line and the samples: all three reach wandb.
    assert any(r["_step"] == 4 and "val/loss" in r for r in rows)
    assert "sample step 4: 'In the beginning' -> " in (sampled_run / "summary.md").read_text()


def test_generate_streams_a_continuation_from_the_run(sampled_run, capsys):
    from pretrain.generate import main

    argv = [str(sampled_run), "--prompt", "And God", "--max-new-tokens", "10", "--temperature", "0"]
    assert cli_exit(main, argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("And God") and len(out) > len("And God")
    assert "best.pt" in err and "step 4" in err
    assert cli_exit(main, [*argv, "--checkpoint", "last"]) == 0
    assert capsys.readouterr().out == out  # greedy: best.pt and last.pt are the same step here


def test_generate_without_a_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    from pretrain.generate import main

    assert cli_exit(main, [str(tmp_path), "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and "no checkpoint" in err


def test_missing_prompt_file_stops_the_trainer_before_it_writes(made_bytes, tmp_path, capsys):
    from pretrain.train.entry import main

    out = tmp_path / "run"
    code = cli_exit(main, ["--data", str(made_bytes), "--out-dir", str(out), *FAST, "--steps", "2",
                           "--sample-every", "1", "--sample-prompts", str(tmp_path / "nope.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: --sample-prompts") and err.count("\n") == 1
    assert not out.exists()
