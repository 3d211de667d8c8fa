"""AdamW's update on CPU in one kernel pass, with the gradient clip's factor folded into it (issue 23.1).

On CPU a clipped step multiplied every gradient in place (torch's clip_grads_with_norm_: a read and a write of all
of them) and then torch's fused AdamW read them again, one parallel region per tensor. Here
`model/csrc/cpu_adamw.cpp` does both in one pass over all of an optimizer group's tensors, in one region: each
gradient is multiplied by the clip's factor as the update reads it, and each new weight's bf16 cast that
model/weight_casts.py keeps is written in the same pass (the next forward's casts, otherwise a read of every weight).
Its arithmetic is torch's fused CPU kernel, as torch's build compiles it, so weights and moments are torch's bit for
bit (tests/test_cpu_adamw.py holds that at each host ISA torch dispatches); the gradients are left unclipped, which
nothing reads before zero_grad.

`FusedAdamW` (here; pretrain/train/optim.py builds it for fp32 weights on CPU and CUDA) takes this path where
`applies` says so: plain CPU fp32 weights and gradients whose sizes are multiples of 16 (so torch's scalar tail,
which its build compiles differently, never runs), state already made by torch's first step, no amsgrad, maximize,
tensor lr or GradScaler, and the kernels built. Anywhere else it is torch's fused AdamW after torch's clip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model import cpu_kernels, weight_casts

_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")


def _live(group: dict) -> list[torch.Tensor]:
    return [p for p in group["params"] if p.grad is not None]


def applies(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` (torch's AdamW, fused) can take its next step in the kernel (module docstring)."""
    if getattr(optimizer, "grad_scale", None) is not None:
        return False
    tensors: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        if (any(group.get(k) for k in _UNSUPPORTED) or not isinstance(group["lr"], float)
                or not all(isinstance(b, float) for b in group["betas"])):
            return False
        for p in _live(group):
            if p.device.type != "cpu":
                return False  # a GPU run's step: decided before any look at the CPU library
            state = optimizer.state.get(p, {})
            if "step" not in state or "exp_avg" not in state or "exp_avg_sq" not in state:
                return False  # torch's first step makes them
            four = (p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"])
            if not all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == p.shape for t in four):
                return False
            if p.numel() % 16:
                return False
            tensors += four
    return not tensors or cpu_kernels.enabled_for(*tensors)


@torch.no_grad()
def kernel_step(optimizer: torch.optim.Optimizer, factor: float, found_inf: torch.Tensor | None) -> None:
    """One AdamW step of every parameter with a gradient, each gradient read times `factor` (a float32 value, 1.0:
    none); nothing at all when `found_inf` is 1, as torch's fused step with found_inf leaves weights, moments and
    step counts. Only where `applies(optimizer)`."""
    if found_inf is not None and found_inf.item() == 1.0:
        return
    for group in optimizer.param_groups:
        params = _live(group)
        if not params:
            continue
        states = [optimizer.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)  # as torch's _fused_adamw: fp32 step counts, read back as double
        casts = weight_casts.kept_casts(params)
        cpu_kernels.adamw([p.detach() for p in params], [p.grad for p in params], [s["exp_avg"] for s in states],
                          [s["exp_avg_sq"] for s in states], casts, torch.stack(steps).tolist(), group["lr"],
                          group["betas"], group["weight_decay"], group["eps"], factor)
        # Written through pointers: the version counters move as an in-place op's would, then the casts made in the
        # same pass are marked current (model/weight_casts.py).
        torch.autograd.graph.increment_version(params)
        weight_casts.written([p for p, c in zip(params, casts, strict=True) if c is not None])


class FusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW (fp32 weights on CPU/CUDA), the only torch AdamW path that takes `found_inf`.

    Loading a state saved by our AdamW (a run with --no-opt-fused, which may change on resume) would bring
    param groups without `fused`, and torch would fall back to its foreach path, which refuses `found_inf`:
    the implementation flags are this optimizer's own, never the checkpoint's.
    """

    IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")
    _grad_factor: float | None = None

    def fold_grad_factor(self, factor: float) -> bool:
        """Take the gradient clip's factor instead of its multiply: the next step reads each gradient times it, in
        one pass on CPU (`kernel_step`). False where that step would be torch's, which needs the gradients
        multiplied first."""
        if not applies(self):
            return False
        self._grad_factor = factor
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        factor, self._grad_factor = self._grad_factor, None
        if closure is None and (factor is not None or applies(self)):  # a factor: applies() held at the clip
            kernel_step(self, 1.0 if factor is None else factor, getattr(self, "found_inf", None))
            return None
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if factor is not None:  # a closure after the clip handed its factor over: multiply as torch's clip would
            torch._foreach_mul_([p.grad for p in params], factor)
        weight_casts.stale(params)  # torch's kernel moves no version counter (model/weight_casts.py)
        return super().step(closure)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in self.IMPLEMENTATION:
                group[key] = self.defaults[key]
