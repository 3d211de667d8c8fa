"""What the loop measures between logging steps: on-device sums of the loss and skipped steps, read with one host
sync per train line, and the step timings (tok/s, MFU, step and data ms)."""

from __future__ import annotations

import time
from typing import Any

import torch

from pretrain.train import device as dev
from pretrain.train import distributed as dist_lib
from pretrain.train.state import RunState


class Meter:
    """On-device running sums, read (one host sync) only on logging steps.

    Checkpoints carry the open train-loss window (`checkpoint_fields`), so a run resumed mid-window logs the
    same mean loss and skipped count as one never interrupted; only timings (tok/s, ms) restart with the process.
    """

    WINDOW = ("loss", "good", "bad_streak")  # sums a checkpoint carries (`skipped` goes in as skipped_steps)

    def __init__(self, device: torch.device, start_step: int, skipped_before: int = 0,
                 window: dict[str, Any] | None = None) -> None:
        z = lambda: torch.zeros((), device=device)  # noqa: E731
        self.loss, self.good, self.skipped, self.bad_streak = z(), z(), z(), z()
        self.t0, self.step0, self.data_s = time.perf_counter(), start_step, 0.0
        self.window0, self.skipped_before = start_step, skipped_before  # window0: the loss window's first step
        ok = isinstance(window, dict) and isinstance(window.get("step0"), int) and 0 <= window["step0"] <= start_step
        if ok and all(isinstance(window.get(k), torch.Tensor) and window[k].numel() == 1 for k in self.WINDOW):
            for k in self.WINDOW:
                getattr(self, k).copy_(window[k].reshape(()))
            self.window0 = window["step0"]

    def checkpoint_fields(self, s: RunState) -> dict[str, Any]:
        """The exact skipped count and the open loss window, for a checkpoint (a collective under torchrun)."""
        window = {k: getattr(self, k) for k in self.WINDOW} | {"step0": self.window0}
        # Every rank resumes with the ranks' mean as its sum, so the mean the next train line takes is unchanged.
        window["loss"] = dist_lib.mean_across_ranks(self.loss, s.dist)
        return {"skipped_steps": self.skipped_before + int(self.skipped.item()), "train_window": window}

    def add(self, step_loss: torch.Tensor, found_inf: torch.Tensor) -> None:
        self.loss += torch.where(found_inf.bool(), 0.0, step_loss)
        self.good += 1 - found_inf
        self.skipped += found_inf
        self.bad_streak = (self.bad_streak + found_inf) * found_inf

    def pause(self, seconds: float) -> None:
        """Evals and checkpoint snapshots are not training time."""
        self.t0 += seconds

    def read(self, s: RunState, step: int, seq_len: int, lr: float, last_loss: torch.Tensor,
             grad_norm: torch.Tensor) -> dict[str, Any]:
        dev.synchronize(s.device)
        now, n = time.perf_counter(), step - self.step0
        tokens_per_step = s.cfg.batch_size * s.cfg.grad_accum * s.dist.world_size * seq_len
        tok_s = n * tokens_per_step / (now - self.t0)
        peak = dev.peak_flops(s.device)
        good = self.good.item()
        # A window of only skipped steps has no loss: NaN (null in train.jsonl), not a made-up 0.0.
        mean_loss = dist_lib.mean_across_ranks(self.loss, s.dist).item() / good if good else float("nan")
        last = dist_lib.mean_across_ranks(last_loss, s.dist).item()  # the global batch's loss, not rank 0's
        fields = {"tokens": s.prog.tokens, "loss": mean_loss, "last_loss": last, "lr": lr,
                  "grad_norm": grad_norm.item(), "tok_s": tok_s,
                  "mfu": tok_s * s.mcfg.flops_per_token(seq_len) / (peak * s.dist.world_size) if peak else None,
                  # The causal figure counts only unmasked attention (what the kernels run): both are reported.
                  "mfu_causal": tok_s * s.mcfg.flops_per_token(seq_len, causal=True) / (peak * s.dist.world_size)
                  if peak else None,
                  "seq_len": seq_len, "tokens_per_step": tokens_per_step, "step_ms": 1000 * (now - self.t0) / n,
                  "data_ms": 1000 * self.data_s / n, "skipped_steps": int(self.skipped.item()),
                  **dev.memory_stats(s.device)}
        self.loss.zero_()
        self.good.zero_()
        self.t0, self.step0, self.window0, self.data_s = now, step, step, 0.0
        return fields
