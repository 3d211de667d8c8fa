"""TrainConfig: flags generated from the dataclass, round trips, validation, resume compatibility."""

from __future__ import annotations

import dataclasses

import pytest

from pretrain.errors import UserError
from pretrain.plan.plan import trainer_argv
from pretrain.train.config import (
    TrainConfig,
    build_parser,
    config_differences,
    model_config_from,
    parse_config,
)


def test_every_field_has_a_flag():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests


def test_argv_round_trip():
    """The launcher's printed trainer command (plan.trainer_argv) reproduces the config."""
    cfg = parse_config(["--size", "small", "--attn", "gqa", "--n-kv-head", "4", "--no-amp", "--lr", "3e-4",
                        "--seq-schedule", "256@0,1024@100", "--grad-checkpoint", "--wandb-tags", "a,b"])
    assert parse_config(trainer_argv(cfg)) == cfg


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "batch-size"),
    (["--lr", "-1"], "lr"),
    (["--param-dtype", "bf16", "--amp-dtype", "fp16"], "GradScaler"),
    (["--resume", "maybe"], "resume"),
    (["--val-frac", "0.7"], "val-frac"),
    (["--cpu-offload"], "needs --fsdp"),
    (["--fsdp", "--param-dtype", "bf16"], "fp32 parameters"),
    (["--fsdp", "--amp-dtype", "fp16"], "fp16"),
])
def test_validation(argv, match):
    with pytest.raises(UserError, match=match):
        parse_config(argv)


def test_bad_flag_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--optimizer", "sgd"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_model_config_overrides_and_errors():
    m = model_config_from(parse_config(["--size", "tiny", "--attn", "gqa", "--n-kv-head", "2"]), 50257)
    assert (m.attn, m.n_kv_head, m.vocab_size) == ("gqa", 2, 50257)
    with pytest.raises(UserError, match="n_kv_head|kv"):
        model_config_from(parse_config(["--attn", "gqa", "--n-kv-head", "3"]), 256)


def test_resume_differences_allow_cadence_not_model():
    saved = TrainConfig().to_dict()
    assert config_differences(saved, TrainConfig(steps=99, eval_every=5, wandb=True)) == []
    diffs = config_differences(saved, TrainConfig(d_model=256, lr=1e-3))
    assert len(diffs) == 2 and any("d_model" in d for d in diffs)


def test_warmup_default_rule_is_in_both_helps(capsys):
    """The trainer alone warms up 100 steps; the launcher 2 % of steps (at most 2000): both --help say so."""
    from pretrain.plan import launch
    from pretrain.schedule import default_warmup_steps

    rule = "--warmup-steps WARMUP_STEPS linear warmup steps (run_1b_launch.py: 2% of steps, at most 2000)"
    for main, tail in ((parse_config, " (default: 100)"), (launch.main, "")):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert rule + tail in text
    assert [default_warmup_steps(n) for n in (20, 5000, 10**6)] == [1, 100, 2000]
