"""Optimizers: parameter groups, AdamW / Lion, bf16 weights with stochastic rounding, on-device step skipping.

Skipping a step whose gradients are not finite must not cost a host sync every step, so every optimizer
here honours a `found_inf` tensor (1.0 = skip) the way torch's fused AdamW does for GradScaler. torch's
foreach and single-tensor AdamW refuse `found_inf`, so the paths without the fused kernel (--no-opt-fused,
MPS) use our AdamW, which takes it (and equals torch's AdamW on fp32 weights, tested).

Stochastic rounding draws its noise from a generator the optimizer owns, seeded from --seed, never from the
global one: under DDP every replica must round identically or the replicas drift apart, and a generator
that only the optimizer advances stays in lockstep across ranks whatever else consumes randomness on a rank.
Its state is checkpointed (`rounding_rng_state`), so a resume draws the noise an uninterrupted run would.

bf16 weights (`--param-dtype bf16`): an update smaller than half a bf16 ulp would round away, and so would
weight decay (lr * wd ~ 1e-5 is far below bf16's 2^-8 relative resolution). Instead of an fp32 master copy
(+4 bytes/param) we keep optimizer state in fp32, compute the update in fp32, and write the weight back with
stochastic rounding, which is unbiased: small updates and decay take effect in expectation.
Memory per parameter: bf16 weight 2 + bf16 grad 2 + fp32 state (AdamW 8, Lion 4) = 12 (AdamW) / 8 (Lion)
bytes, versus 16 / 12 with fp32 weights and grads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

# torch's fused AdamW, and on CPU its one-pass kernel: pretrain/train/cpu_adamw.py.
from pretrain.train.cpu_adamw import FusedAdamW

# The registry is torch-free in optim_registry.py (the parsers read it); its names stay importable from here.
from pretrain.train.optim_registry import (  # noqa: F401
    DEFAULT_BETA2,
    OPTIMIZERS,
    PEAK_LR,
    default_lr,
    default_lr_source,
)

if TYPE_CHECKING:
    from pretrain.train.config import TrainConfig


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up or down with probability given by the distance."""
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # Adding noise below bf16's last mantissa bit then truncating rounds stochastically; the result has
    # zero low bits so the bf16 copy is exact.
    dst.copy_(((bits + noise) & -65536).view(torch.float32))


def _write_back(p: Tensor, new: Tensor, generator: torch.Generator | None) -> None:
    if p.dtype == torch.bfloat16:
        stochastic_round_(p, new, generator)
    else:
        p.copy_(new)


def _keep(found_inf: Tensor | None) -> Tensor | None:
    """1.0 when the step should apply, 0.0 when it is skipped (None: always apply)."""
    return None if found_inf is None else 1.0 - found_inf.float()


# Large tensors are updated in slices so the fp32 temporaries of one update stay ~16 MB each instead of
# several copies of the whole tensor (the 1b embedding's update alone would need ~3.8 GB).
CHUNK = 1 << 22


def _slices(p: Tensor, *state: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Matching 1-D slices of a parameter, its gradient and its state tensors (views: writes land in place)."""
    flat = [p.view(-1), p.grad.reshape(-1), *(t.view(-1) for t in state)]
    for i in range(0, flat[0].numel(), CHUNK):
        yield tuple(f[i:i + CHUNK] for f in flat)


class _SkipAwareOptimizer(torch.optim.Optimizer):
    """Base for our optimizers: honours `found_inf`, keeps fp32 state, owns the stochastic-rounding generator."""

    def __init__(self, params, defaults: dict, generator: torch.Generator | None = None) -> None:
        super().__init__(params, defaults)
        self.found_inf: Tensor | None = None
        self.generator = generator  # None: the global generator (direct use in tests)

    def rounding_rng_state(self) -> Tensor | None:
        return None if self.generator is None else self.generator.get_state()

    def load_rounding_rng_state(self, state: Tensor | None) -> None:
        if self.generator is not None and state is not None:
            self.generator.set_state(state)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter's dtype: with bf16 weights the fp32 moments
        would become bf16 on every resume (lossy, and no longer the state an uninterrupted run has). Load,
        then put back each saved tensor with its own dtype, on the parameter's device."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _params_with_grad(self) -> Iterator[tuple[dict, Tensor, dict]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p, self.state[p]


class _Adam(_SkipAwareOptimizer):
    """What both AdamWs share: the per-parameter prologue (state created on first use, the step counter advanced
    unless the step is skipped) and the update itself; they differ only in how the moments are stored."""

    def _init_state(self, p: Tensor, state: dict) -> None:
        raise NotImplementedError

    def _adam_params(self, keep: Tensor | None) -> Iterator[tuple[dict, Tensor, dict, Tensor]]:
        """(group, parameter, state, bias-correction step t) per parameter with a gradient; `keep` 0 (a skipped
        step) leaves the counter where it was."""
        for group, p, state in self._params_with_grad():
            if not state:
                self._init_state(p, state)
            state["step"] += 1.0 if keep is None else keep.to(p.device)
            yield group, p, state, state["step"].clamp(min=1)


def _adam_update(group: dict, t: Tensor, w: Tensor, g: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AdamW's new (weights, first moment, second moment) from fp32 weights, gradient and moments at step t."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    new_m = m * beta1 + g * (1 - beta1)
    new_v = v * beta2 + g * g * (1 - beta2)
    step_dir = (new_m / (1 - beta1**t)) / ((new_v / (1 - beta2**t)).sqrt_() + eps)
    return w * (1 - lr * wd) - lr * step_dir, new_m, new_v


class Lion(_SkipAwareOptimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), bf16-safe and skip-aware.

    update = sign(beta1 * m + (1 - beta1) * g); p -= lr * (update + wd * p); m = beta2 * m + (1 - beta2) * g.
    Matches lion_pytorch.Lion on fp32 weights (tested).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), generator)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        keep = _keep(self.found_inf)
        for group, p, state in self._params_with_grad():
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            for p_s, g_s, m in _slices(p, state["exp_avg"]):
                g, w = g_s.float(), p_s.float()
                update = (m * beta1 + g * (1 - beta1)).sign_()
                new_w = w * (1 - lr * wd) - lr * update
                new_m = m * beta2 + g * (1 - beta2)
                if keep is not None:
                    new_w = torch.where(keep.bool(), new_w, w)
                    new_m = torch.where(keep.bool(), new_m, m)
                m.copy_(new_m)
                _write_back(p_s, new_w, self.generator)


class AdamWSR(_Adam):
    """AdamW (Loshchilov & Hutter) with fp32 state; bf16 weights are written back by stochastic rounding.

    On fp32 weights it is plain AdamW: the path for --no-opt-fused and MPS, where torch's own AdamW cannot
    skip a step on the device.
    """

    def __init__(self, params, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), generator)

    def _init_state(self, p: Tensor, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        keep = _keep(self.found_inf)
        for group, p, state, t in self._adam_params(keep):
            for p_s, g_s, m, v in _slices(p, state["exp_avg"], state["exp_avg_sq"]):
                w = p_s.float()
                new_w, new_m, new_v = _adam_update(group, t, w, g_s.float(), m, v)
                if keep is not None:
                    flag = keep.bool()
                    new_w, new_m, new_v = (torch.where(flag, a, b) for a, b in ((new_w, w), (new_m, m), (new_v, v)))
                m.copy_(new_m)
                v.copy_(new_v)
                _write_back(p_s, new_w, self.generator)


class AdamW8bit(_Adam):
    """AdamW whose two moments are stored in 8 bits: block-wise dynamic quantization (Dettmers et al. 2022,
    "8-bit Optimizers via Block-wise Quantization"), with torchao's quantization maps and kernels.

    State per parameter: 1 byte per moment plus one fp32 scale per BLOCK values, ~2.03 bytes instead of AdamW's
    8. The update itself runs in fp32 from the unquantized new moments (as torchao's AdamW8bit does); only what
    is kept between steps is 8-bit. Tensors smaller than MIN_NUMEL or not a multiple of BLOCK keep fp32 moments
    (norms, gains: a negligible share), as torchao and bitsandbytes do.

    Why not torchao's own AdamW8bit class: it torch.compiles its step per parameter shape (minutes of Inductor
    C++ builds on a CPU), cannot skip a step on the device (`found_inf`), needs a tensor lr, and rounds bf16
    weights with the global generator instead of the optimizer's own. The state here is plain uint8/fp32
    tensors, so checkpoints, resume and the planner's fake-tensor estimate need nothing special.
    """

    BLOCK = 256
    MIN_NUMEL = 4096

    def __init__(self, params, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), generator)
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torchao.optim import quant_utils, subclass_8bit  # optional dependency: checked by validate()

        self._q = quant_utils
        # The maps are constants torchao computes with torch ops and reads back as floats: the planner builds this
        # optimizer on fake tensors (pretrain/plan/memory.py), where reading a value back is impossible.
        with unset_fake_temporarily():
            self._maps = {True: subclass_8bit.get_qmap_signed(), False: subclass_8bit.get_qmap_unsigned()}
        self._qmaps: dict[tuple[torch.device, bool], Tensor] = {}

    def _qmap(self, device: torch.device, signed: bool) -> Tensor:
        key = (device, signed)
        if key not in self._qmaps:
            self._qmaps[key] = torch.tensor(self._maps[signed], dtype=torch.float32, device=device)
        return self._qmaps[key]

    def quantized(self, p: Tensor) -> bool:
        return p.numel() >= self.MIN_NUMEL and p.numel() % self.BLOCK == 0

    def _init_state(self, p: Tensor, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in ("exp_avg", "exp_avg_sq"):
            if self.quantized(p):
                state[f"{name}_codes"] = torch.zeros_like(p, dtype=torch.uint8)
                state[f"{name}_scale"] = torch.zeros(p.numel() // self.BLOCK, dtype=torch.float32, device=p.device)
            else:
                state[name] = torch.zeros_like(p, dtype=torch.float32)

    def _moments(self, p: Tensor, state: dict) -> Iterator[tuple[Tensor, Callable, Callable]]:
        """Per slice of `p`: (param slice, grad slice, read() -> (m, v) fp32, write(m, v, keep))."""
        if not self.quantized(p):
            for p_s, g_s, m, v in _slices(p, state["exp_avg"], state["exp_avg_sq"]):
                def write(new_m: Tensor, new_v: Tensor, flag: Tensor | None, m=m, v=v) -> None:
                    m.copy_(new_m if flag is None else torch.where(flag, new_m, m))
                    v.copy_(new_v if flag is None else torch.where(flag, new_v, v))
                yield p_s, g_s, (lambda m=m, v=v: (m, v)), write
            return
        qm, qv = self._qmap(p.device, True), self._qmap(p.device, False)
        cm_all, cv_all = state["exp_avg_codes"].view(-1), state["exp_avg_sq_codes"].view(-1)
        for i, (p_s, g_s, cm, cv) in enumerate(_slices(p, cm_all, cv_all)):
            lo = i * CHUNK // self.BLOCK  # CHUNK is a multiple of BLOCK: slices hold whole blocks
            sm = state["exp_avg_scale"][lo:lo + cm.numel() // self.BLOCK]
            sv = state["exp_avg_sq_scale"][lo:lo + cv.numel() // self.BLOCK]

            def read(cm=cm, cv=cv, sm=sm, sv=sv) -> tuple[Tensor, Tensor]:
                return self._q.dequant_with_qmap(cm, qm, sm), self._q.dequant_with_qmap(cv, qv, sv)

            def write(new_m: Tensor, new_v: Tensor, flag: Tensor | None, cm=cm, cv=cv, sm=sm, sv=sv) -> None:
                # A skipped step keeps the old codes and scales as they are (requantizing would not be exact).
                for codes, scale, new, qmap in ((cm, sm, new_m, qm), (cv, sv, new_v, qv)):
                    scaled, s = self._q.scale_tensor(new, self.BLOCK)
                    new_codes = self._q.quantize_8bit_with_qmap(scaled, qmap)
                    codes.copy_(new_codes if flag is None else torch.where(flag, new_codes, codes))
                    scale.copy_(s if flag is None else torch.where(flag, s, scale))
            yield p_s, g_s, read, write

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        keep = _keep(self.found_inf)
        for group, p, state, t in self._adam_params(keep):
            for p_s, g_s, read, write in self._moments(p, state):
                w = p_s.float()
                new_w, new_m, new_v = _adam_update(group, t, w, g_s.float(), *read())
                flag = None if keep is None else keep.bool()
                if flag is not None:
                    new_w = torch.where(flag, new_w, w)
                write(new_m, new_v, flag)
                _write_back(p_s, new_w, self.generator)


# Parameters that are >= 2-D but are not weight matrices: the null attention key/value (model/attention.py,
# shape (kv_heads, 1, head_dim)) is a learned token, a gain-like offset. Decaying the null key pulls its score
# toward 0 and so changes how much attention "nothing" gets: that is not the regularisation decay is for.
NO_DECAY_NAMES = ("null_k", "null_v")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and embeddings; none on norms, gains, temperatures, null key/value."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        matrix = p.dim() >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES
        (decay if matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def rounding_generator(device: torch.device, seed: int) -> torch.Generator:
    """The stochastic-rounding generator: same seed on every rank, so DDP replicas round alike."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _build_adamw(groups: list[dict], lr: float, betas: tuple[float, float], cfg: TrainConfig, device: torch.device,
                 gen: torch.Generator | None) -> torch.optim.Optimizer:
    """torch's fused AdamW for fp32 weights on CPU/CUDA; ours (skip-aware, bf16-safe) for bf16 weights,
    --no-opt-fused and devices without the fused kernel."""
    fused = cfg.opt_fused and device.type in ("cuda", "cpu")
    if gen is not None or not fused:
        return AdamWSR(groups, lr=lr, betas=betas, eps=cfg.eps, generator=gen)
    return FusedAdamW(groups, lr=lr, betas=betas, eps=cfg.eps, fused=True)


def _build_lion(groups: list[dict], lr: float, betas: tuple[float, float], cfg: TrainConfig, device: torch.device,
                gen: torch.Generator | None) -> torch.optim.Optimizer:
    return Lion(groups, lr=lr, betas=betas, generator=gen)


def _build_adamw8bit(groups: list[dict], lr: float, betas: tuple[float, float], cfg: TrainConfig,
                     device: torch.device, gen: torch.Generator | None) -> torch.optim.Optimizer:
    return AdamW8bit(groups, lr=lr, betas=betas, eps=cfg.eps, generator=gen)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer for `cfg`, built by its registry entry (OPTIMIZERS)."""
    lr = peak_lr(cfg)
    betas = (cfg.beta1, cfg.beta2 if cfg.beta2 is not None else DEFAULT_BETA2[cfg.optimizer])
    groups = param_groups(model, cfg.weight_decay)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    gen = rounding_generator(device, cfg.seed) if bf16 else None
    return OPTIMIZERS[cfg.optimizer].build(groups, lr, betas, cfg, device, gen)


def peak_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else default_lr(cfg.size, cfg.optimizer)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def rounding_rng_state(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The stochastic-rounding generator's state for a checkpoint (None: the optimizer has none)."""
    get = getattr(optimizer, "rounding_rng_state", None)
    return get() if get is not None else None


def load_rounding_rng_state(optimizer: torch.optim.Optimizer, state: Tensor | None) -> None:
    load = getattr(optimizer, "load_rounding_rng_state", None)
    if load is not None:
        load(state)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Apply the step unless `found_inf` is 1, decided on the device (no host sync)."""
    optimizer.found_inf = found_inf.float().reshape(())  # type: ignore[attr-defined]
    optimizer.step()
    optimizer.found_inf = None  # type: ignore[attr-defined]
