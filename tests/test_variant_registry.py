"""What varies by name is registered once (model/variants.py, optim.OPTIMIZERS, schedule.LR_SCHEDULES): every entry
reaches the trainer, the launcher, the demo and the docs table, and the module a block builds is the entry's."""

from __future__ import annotations

import pytest
import torch

from model import GPT, ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain import demo
from pretrain.plan import launch, paper_table
from pretrain.schedule import LR_SCHEDULES, lr_at
from pretrain.train.config import parse_config
from pretrain.train.optim import OPTIMIZERS, build_optimizer


@pytest.mark.parametrize("name", list(ATTENTION_VARIANTS))
def test_every_registered_variant_reaches_launcher_trainer_demo_and_docs(name, tmp_path):
    _, p = launch.plan_from_argv(["--vram", "cpu", "--variant", name, "--run-root", str(tmp_path)], gpu=None)
    assert p.resolved.mcfg.attn == name
    assert parse_config(p.command[2:]).attn == name  # the printed trainer command accepts it
    assert demo.build_parser().parse_args(["--variant", name]).variant == name
    assert f"| `{name}` |" in paper_table.DOC.read_text()


@pytest.mark.parametrize("name", list(ATTENTION_VARIANTS))
def test_blocks_build_the_entrys_module_with_its_head_dims(name):
    entry = ATTENTION_VARIANTS[name]
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, attn=name)
    attn = GPT(cfg).blocks[0].attn
    assert type(attn) is entry.module
    assert (attn.qk_head_dim, attn.v_head_dim) == entry.head_dims(cfg)[:2]
    assert attn.n_kv_head == entry.default_kv_heads(cfg.n_head) == cfg.n_kv_head


def test_unknown_variant_names_the_registered_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--attn", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(name in err for name in ATTENTION_VARIANTS)
    with pytest.raises(ValueError, match="use one of " + ", ".join(ATTENTION_VARIANTS)):
        ModelConfig(attn="nope")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_is_a_flag_that_builds_and_steps(name):
    cfg = parse_config(["--optimizer", name, "--size", "tiny"])
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=256))
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == OPTIMIZERS[name].peak_lr["tiny"][0]
    assert opt.param_groups[0]["betas"][1] == OPTIMIZERS[name].beta2
    before = model.lm_head.weight.detach().clone()
    model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8))).backward()
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)


@pytest.mark.parametrize("name", list(LR_SCHEDULES))
def test_every_registered_lr_schedule_is_a_flag_and_starts_at_peak(name):
    cfg = parse_config(["--lr-schedule", name])
    assert cfg.lr_schedule == name
    # Right after warmup every schedule is at the peak LR, and none goes below min_lr.
    lrs = [lr_at(s, lr=1.0, min_lr=0.1, total_steps=100, warmup_steps=10, schedule=name) for s in range(100)]
    assert lrs[10] == pytest.approx(1.0, abs=1e-3) and min(lrs) >= 0.1 - 1e-12
