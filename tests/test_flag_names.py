"""TrainConfig speaks ModelConfig's words (n_layer, block_size, n_kv_head, attn), and so do the flags
(--n-layer, --block-size, --n-kv-head, --attn): commands written with the earlier spellings (FORMER_FLAGS) still
mean the same settings, in the trainer and in the launcher, whose printed command uses the current spellings."""

from __future__ import annotations

import json

from pretrain.plan import launch
from pretrain.train.config import FORMER_FLAGS, flag_name, parse_config

VALUES = {"n_layer": "3", "block_size": "128", "n_kv_head": "2", "attn": "gqa"}


def _argv(spell, names=VALUES) -> list[str]:
    return [arg for name in names for arg in (spell(name), VALUES[name])]


def test_trainer_takes_the_former_spellings_as_the_same_settings():
    current = parse_config(["--size", "tiny", *_argv(flag_name)])
    former = parse_config(["--size", "tiny", *_argv(FORMER_FLAGS.__getitem__)])
    assert (current.n_layer, current.block_size, current.n_kv_head, current.attn) == (3, 128, 2, "gqa")
    assert former == current
    assert set(FORMER_FLAGS) == set(VALUES)


def test_launcher_takes_the_former_spellings_and_prints_the_current_ones(capsys):
    model = ("n_layer", "block_size", "n_kv_head")  # the attention itself is the launcher's --variant
    argv = ["--vram", "cpu", "--size", "tiny", "--variant", "gqa", "--vocab-size", "256", "--steps", "2",
            *_argv(FORMER_FLAGS.__getitem__, model)]
    assert launch.main([*argv, "--json"]) == 0
    command = json.loads(capsys.readouterr().out)["command"]
    for name in model:
        assert flag_name(name) in command and FORMER_FLAGS[name] not in command, command
    cfg = parse_config(command[2:])
    assert (cfg.n_layer, cfg.block_size, cfg.n_kv_head, cfg.attn) == (3, 128, 2, "gqa")
