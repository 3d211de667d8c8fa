"""The paper's configurations (paper_decoupled, paper_bottleneck): trainer --exp, launcher --variant, and the
generated docs table being current."""

from __future__ import annotations

from pretrain.errors import run_cli
from pretrain.plan import launch, paper_table
from pretrain.track.runlog import read_jsonl
from pretrain.train.config import parse_config
from pretrain.train.loop import train

TINY = ["--size", "tiny", "--d-model", "64", "--n-head", "4", "--n-layer", "2", "--d-ff", "96", "--block-size", "32",
        "--attn-dim", "32", "--batch-size", "2", "--val-frac", "0.05", "--eval-iters", "1", "--steps", "1",
        "--device", "cpu", "--live", "off", "--save-minutes", "0"]


def test_trainer_exp_builds_the_papers_model(byte_data, tmp_path):
    out = tmp_path / "r"
    train(parse_config(["--data", str(byte_data), "--out-dir", str(out), *TINY, "--exp", "paper_bottleneck"]))
    meta = next(e for e in read_jsonl(out / "train.jsonl") if e["type"] == "meta")
    m = meta["model_config"]
    assert (m["attn"], m["null_attn"], m["learned_temp"], m["tie_qk"]) == ("bottleneck", True, True, False)
    assert meta["train_config"]["exp"] == "paper_bottleneck"
    cfg = parse_config(["--exp", "paper_decoupled"])
    assert (cfg.attn, cfg.tie_qk, cfg.null_attn, cfg.learned_temp) == ("decoupled", True, True, True)


def test_launcher_variant_plans_the_paper_preset(tmp_path):
    _, p = launch.plan_from_argv(["--vram", "cpu", "--variant", "paper_decoupled", "--run-root", str(tmp_path)],
                                 gpu=None)
    assert p.cfg.exp == "paper_decoupled" and p.resolved.mcfg.attn == "decoupled"
    assert p.resolved.mcfg.null_attn and p.resolved.mcfg.tie_qk and p.resolved.mcfg.learned_temp
    assert "--exp paper_decoupled" in " ".join(p.command)
    assert parse_config(p.command[2:]) == p.cfg  # the printed command round-trips through the trainer
    assert p.cfg.out_dir.endswith("tiny-paper_decoupled")


def test_launcher_paper_preset_with_contradicting_flag_is_one_line(tmp_path, capsys):
    argv = ["--vram", "cpu", "--variant", "paper_decoupled", "--no-tie-qk", "--run-root", str(tmp_path)]
    assert run_cli(launch.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "paper_decoupled means" in err and "--no-tie-qk" in err
    assert not any(tmp_path.iterdir())


def test_docs_table_is_generated_from_the_code():
    assert paper_table.main(["--check"]) == 0
    text = paper_table.DOC.read_text()
    assert "| `paper_decoupled` |" in text and "| `paper_bottleneck` |" in text and "## `1b`" in text
