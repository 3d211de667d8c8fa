"""Selective activation checkpointing (--checkpoint-policy selective): same gradients as no checkpointing, a memory
peak between full checkpointing and none (fake-tensor estimate = a real tracked step), no matmul recomputed, and the
trainer / planner surfaces that carry the flag."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, ModelConfig
from model.config import ATTN_VARIANTS
from pretrain.plan import launch
from pretrain.plan.memory import estimate_step_memory
from pretrain.plan.plan import recompute_factor
from pretrain.train.config import TrainConfig
from pretrain.train.loop import main as train_main
from tests.conftest import TINY_TRAIN


def _model(attn: str) -> GPT:
    torch.manual_seed(0)
    kw = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=48, attn=attn)
    if attn == "gqa":
        kw["n_kv_head"] = 2
    if attn in ("bottleneck", "decoupled"):
        kw |= dict(sem_dim=8, geo_dim=16, attn_dim=24)
    return GPT(ModelConfig(**kw)).train()


def _grads(model: GPT, idx: torch.Tensor, ckpt: bool, policy: str = "full") -> dict[str, torch.Tensor]:
    model.grad_checkpoint, model.checkpoint_policy = ckpt, policy
    model.zero_grad(set_to_none=True)
    model(idx, idx).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ATTN_VARIANTS)
def test_selective_gradients_equal_no_checkpointing_exactly(attn):
    model = _model(attn)
    idx = torch.randint(0, 100, (2, 16))
    plain = _grads(model, idx, False)
    selective = _grads(model, idx, True, "selective")
    assert plain.keys() == selective.keys() and plain
    for name, g in selective.items():
        assert torch.equal(g, plain[name]), name


def test_selective_recomputes_no_matmul_flops_and_the_plan_factor_says_so():
    model = _model("baseline")
    idx = torch.randint(0, 100, (2, 16))

    def step_flops(ckpt: bool, policy: str) -> int:
        model.grad_checkpoint, model.checkpoint_policy = ckpt, policy
        with FlopCounterMode(display=False) as fc:
            model(idx, idx).backward()
        return fc.get_total_flops()

    none, full, selective = step_flops(False, "full"), step_flops(True, "full"), step_flops(True, "selective")
    assert selective == none < full
    assert recompute_factor(TrainConfig(grad_checkpoint=True, checkpoint_policy="selective")) == none / selective
    assert recompute_factor(TrainConfig(grad_checkpoint=False, checkpoint_policy="selective")) == 1.0
    # full: the blocks' forward again; the LM head (outside the blocks) is not, so the real factor is a bit above
    assert recompute_factor(TrainConfig(grad_checkpoint=True)) == pytest.approx(0.75)
    assert 0.75 <= none / full < 0.85


def test_selective_peak_between_full_and_none_and_fake_equals_real():
    mcfg = ModelConfig.from_preset("tiny", vocab_size=256)
    cfgs = {name: TrainConfig(batch_size=4, **kw) for name, kw in
            {"none": {}, "full": {"grad_checkpoint": True},
             "selective": {"grad_checkpoint": True, "checkpoint_policy": "selective"}}.items()}
    peak = {name: estimate_step_memory(mcfg, cfg, 128).tensor_peak_bytes for name, cfg in cfgs.items()}
    assert peak["full"] < peak["selective"] < peak["none"], peak
    real = estimate_step_memory(mcfg, cfgs["selective"], 128, fake=False).tensor_peak_bytes
    assert abs(peak["selective"] - real) <= 0.10 * real  # tests/test_memory.py's tolerance


def test_trainer_runs_and_resumes_with_selective_policy(byte_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(byte_data), "--out-dir", str(out), *TINY_TRAIN, "--grad-checkpoint",
            "--checkpoint-policy", "selective", "--save-every", "2",
            "--log-every", "1"]
    assert train_main([*argv, "--steps", "2"]) == 0, capsys.readouterr().err
    assert train_main([*argv, "--steps", "4"]) == 0
    assert "at step 2" in capsys.readouterr().err  # resumed, not restarted
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines if d["type"] == "train"] == [1, 2, 3, 4], lines
    assert all(torch.isfinite(torch.tensor(d["loss"])) for d in lines if d["type"] == "train")


def test_plan_shows_the_policy_and_its_factor(tmp_path, capsys, untraced_plan_memory):
    argv = ["--vram", "80", "--size", "tiny", "--grad-checkpoint", "--run-root", str(tmp_path)]
    assert launch.main([*argv, "--checkpoint-policy", "selective", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimate"]
    assert est["checkpoint_policy"] == "selective" and est["grad_checkpoint_factor"] == 1.0
    assert est["effective_mfu"] == est["assumed_mfu"]
    assert launch.main([*argv, "--checkpoint-policy", "selective"]) == 0
    assert "x 1 (selective checkpointing recomputes only elementwise ops)" in capsys.readouterr().out
    assert launch.main([*argv, "--checkpoint-policy", "full", "--json"]) == 0  # without: the planner picks
    est = json.loads(capsys.readouterr().out)["estimate"]
    assert est["checkpoint_policy"] == "full" and est["grad_checkpoint_factor"] == 0.75
