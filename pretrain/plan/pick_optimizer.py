"""The optimizer a tier picks by what fits: the first of the tier's preference order whose training step fits the
card in the most memory-frugal execution the planner may then use (micro-batch 1, full activation checkpointing,
unless a flag fixes them), with the reason as its source. pretrain/plan/fit.py then picks, for that optimizer, the
fastest execution that fits (no checkpointing, selective, full): it exists whenever the frugal one fits.

AdamW is preferred (the best-known update), then AdamW with 8-bit moments (the same update, ~2 instead of 8 bytes
of state per parameter: bench/optim_state.py measures the loss gap), then Lion (4 bytes, a different update
needing its own LR). A tier with no preference order (Tier.optimizers empty) keeps its one optimizer.
"""

from __future__ import annotations

from dataclasses import replace

from pretrain.errors import UserError
from pretrain.plan.fit import step_peak_bytes, verdict, with_micro
from pretrain.plan.memory import GiB
from pretrain.plan.resolve import Origin, Resolved, Source, source_of, tier_source
from pretrain.plan.tiers import Tier
from pretrain.schedule import default_min_lr
from pretrain.train.config import TrainConfig
from pretrain.train.optim_registry import DEFAULT_BETA2, OPTIMIZERS, default_lr, default_lr_source


def choose_optimizer(res: Resolved, tier: Tier, capacity: int) -> None:
    """Set res's optimizer (and the LR, beta2 and min LR that default from it) to the tier's first choice that
    fits, unless a flag or the resumed run fixed the optimizer. Nothing fitting keeps the tier's fallback."""
    if not tier.optimizers or not source_of(res.sources, "optimizer").planner_chose:
        return
    longest = max(t for _, t in res.points)
    frugal, how = _frugal(res)
    fits, notes = [], []
    for name in tier.optimizers:
        try:
            OPTIMIZERS[name].check_available()
        except UserError:
            notes.append(f"{name} needs {OPTIMIZERS[name].requires} (not installed)")
            continue
        peak, _ = step_peak_bytes(res.mcfg, replace(frugal, optimizer=name), longest, res.nproc)
        if verdict(peak, capacity) == "fits":
            fits.append(name)
        else:
            notes.append(f"{name} does not (est. {peak / GiB:.1f} GiB)")
    if not fits:
        return  # the tier's fallback stays; the plan says "won't fit" with a suggestion
    chosen = fits[0]
    why = (f"fits {capacity / GiB:.1f} GiB {how}: {', '.join(fits)}"
           + (f"; {'; '.join(notes)}" if notes else "") + f"; took {chosen} (order: {', '.join(tier.optimizers)})")
    _set(res, chosen, tier_source(tier, why))


def _frugal(res: Resolved) -> tuple[TrainConfig, str]:
    """The execution using the least memory that the planner may choose for `res` (what a flag or the resumed run
    fixed stays: --no-grad-checkpoint, --checkpoint-policy, the micro-batch), and how the plan says it."""
    mine = lambda k: source_of(res.sources, k).planner_chose  # noqa: E731
    cfg = res.cfg
    if mine("grad_checkpoint"):
        cfg = replace(cfg, grad_checkpoint=True)
    if cfg.grad_checkpoint and mine("checkpoint_policy"):
        cfg = replace(cfg, checkpoint_policy="full")
    if all(mine(k) for k in ("batch_size", "grad_accum", "micro_batch_schedule")):
        cfg = with_micro(cfg, 1, cfg.batch_size * cfg.grad_accum)
    ckpt = f"{cfg.checkpoint_policy} checkpointing" if cfg.grad_checkpoint else "no checkpointing"
    return cfg, f"at micro-batch {cfg.batch_size} with {ckpt}"


def _set(res: Resolved, name: str, source: Source) -> None:
    """The optimizer, and what resolve() defaulted from it (LR, beta2, min LR) unless a flag or run fixed those."""
    v, src = res.values, res.sources
    v["optimizer"], src["optimizer"] = name, source
    size = v["size"]
    if source_of(src, "lr").kind is Origin.DEFAULT and v.get("lr") is not None:
        v["lr"] = default_lr(size, name)
        src["lr"] = Source(Origin.DEFAULT, f"default for {size} {name}: {default_lr_source(size, name)}")
    if source_of(src, "beta2").kind is Origin.DEFAULT:
        v["beta2"], src["beta2"] = DEFAULT_BETA2[name], Source(Origin.DEFAULT, f"default for {name}")
    if source_of(src, "min_lr").kind is Origin.DEFAULT and v.get("lr") is not None:
        v["min_lr"] = float(f"{default_min_lr(v['lr']):.6g}")
