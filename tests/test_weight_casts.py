"""bf16 weight casts kept between CPU steps (model/weight_casts.py) and written by the CPU update
(pretrain/train/cpu_adamw.py): torch's cast bit for bit, made again after any other edit of the weight, and a
training run that takes them equal, loss for loss and weight for weight, to one whose every step casts anew."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from model import cpu_kernels, weight_casts
from pretrain.track.runlog import read_jsonl
from pretrain.train import cpu_adamw, weight_cache
from pretrain.train.checkpoint import load_checkpoint
from pretrain.train.config import parse_config
from pretrain.train.cpu_adamw import FusedAdamW
from pretrain.train.loop import train

needs_kernels = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="CPU kernels not built here")


@needs_kernels
def test_a_kept_cast_is_torchs_and_is_made_again_after_an_edit():
    w = torch.nn.Parameter(torch.randn(64, 32))
    first = weight_casts.cast_of(w, torch.bfloat16)
    assert torch.equal(first, w.detach().to(torch.bfloat16))
    with torch.no_grad():
        w.data.mul_(3)  # no version moves: a cast not written by the update is made again on every call
    assert torch.equal(weight_casts.cast_of(w, torch.bfloat16), w.detach().to(torch.bfloat16))
    opt = FusedAdamW([w], lr=1e-2, fused=True)
    for _ in range(2):  # torch's first step (it moves no version either), then the kernel's
        w.grad = torch.randn_like(w)
        opt.step()
        assert weight_casts.cast_of(w, torch.bfloat16).equal(w.detach().to(torch.bfloat16))
    with torch.no_grad():
        w.mul_(3)  # after the update wrote it: the version moved
    assert torch.equal(weight_casts.cast_of(w, torch.bfloat16), w.detach().to(torch.bfloat16))
    assert not weight_casts.applies(w.detach()[:, :16], torch.bfloat16)  # strided: the callers cast themselves
    assert not weight_casts.applies(w, torch.float16)


@needs_kernels
@pytest.mark.parametrize("lr", [0.0, 3e-3])
def test_the_update_writes_torchs_cast_of_each_new_weight(lr):
    """lr 0 keeps the weights: special values (ties to even, denormals, infinities, the largest float) reach the
    kernel's conversion as they are; lr 3e-3: the cast of each updated weight, written in the update's pass."""
    torch.manual_seed(0)
    special = torch.tensor([0x3F808000, 0x3F818000, 0x00012345, 0x80400000, 0x7F800000, 0xFF800000, 0x7F7FFFFF,
                            0x3F80FFFF, 0x7F7F8000, 0, 0x80000000, 0x3F7FFFFF, 0x00008000, 0x40490FDB, 0x3EAAAAAB,
                            0xC2F6E979], dtype=torch.int64).to(torch.int32).view(torch.float32)
    ws = [torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.cat([special, torch.randn(16)]))]
    opt = FusedAdamW(ws, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    for step in range(3):
        for w in ws:
            w.grad = torch.randn_like(w)
            weight_casts.cast_of(w, torch.bfloat16)  # the forward's casts: kept from here on
        opt.step()
        for w in ws:
            kept = weight_casts._KEPT[w]
            # Written by the kernel's update (steps 2, 3), not by torch's first.
            assert (kept.version == w._version) == (step > 0)
            if step > 0:
                assert torch.equal(kept.cast.view(torch.int16), w.detach().to(torch.bfloat16).view(torch.int16))


@needs_kernels
def test_a_step_by_torchs_kernel_after_the_updates_makes_the_casts_again(monkeypatch):
    """torch's fused AdamW writes the weights without moving their version: a cast the kernel's update wrote before
    must not survive it."""
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = FusedAdamW([w], lr=1e-2, fused=True)
    for torchs in (False, False, True):  # torch's first step (it makes the state), the kernel's, torch's again
        if torchs:
            monkeypatch.setattr(cpu_adamw, "applies", lambda optimizer: False)
        weight_casts.cast_of(w, torch.bfloat16)
        w.grad = torch.randn_like(w)
        opt.step()
    assert torch.equal(weight_casts.cast_of(w, torch.bfloat16), w.detach().to(torch.bfloat16))


FLAGS = [*TINY_TRAIN, "--n-layer", "2", "--steps", "4", "--log-every", "1", "--lr", "3e-2", "--warmup-steps", "1",
         "--grad-clip", "0.5"]


def _run(data: Path, out: Path) -> tuple[list[float], dict]:
    train(parse_config(["--data", str(data), "--out-dir", str(out), *FLAGS]))
    losses = [e["loss"] for e in read_jsonl(out / "train.jsonl") if e["type"] == "train"]
    return losses, load_checkpoint(out / "last.pt")["model"]


@needs_kernels
def test_a_run_on_kept_casts_equals_one_that_casts_every_step(byte_data, tmp_path, monkeypatch):
    """Clipped bf16 steps on CPU: from the third step on the forwards find every cast made (by the update), and
    every loss and weight equals, bit for bit, a run whose casts are all made anew each step by torch."""
    fresh: list[bool] = []
    cast_of = weight_casts.cast_of

    def seen(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        kept = weight_casts._KEPT.get(weight)
        fresh.append(kept is not None and kept.version == weight._version)
        return cast_of(weight, dtype)

    monkeypatch.setattr(weight_casts, "cast_of", seen)
    losses, weights = _run(byte_data, tmp_path / "kept")
    # The evals before step 1 and after step 4 cast the LM head; each step casts 2 layers x 4 linears and the LM head.
    # Steps 1 and 2 make them (torch's first update writes none); steps 3, 4 and the last eval find them written.
    per_step = 2 * 4 + 1
    assert len(fresh) == 2 + 4 * per_step
    assert fresh[:1 + 2 * per_step] == [False] * (1 + 2 * per_step) and all(fresh[1 + 2 * per_step:])

    monkeypatch.setattr(weight_cache, "kept_casts_dtype", lambda cfg, device: None)
    monkeypatch.setattr(weight_casts, "applies", lambda weight, dtype: False)
    ref_losses, ref_weights = _run(byte_data, tmp_path / "torch")
    assert losses == ref_losses and len(losses) == 4
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
