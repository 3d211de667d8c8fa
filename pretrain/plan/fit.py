"""What fits the device: verdicts, the planner's per-phase micro-batch and checkpointing, and fixes to suggest.

The planner's rules for how a step is executed (what is trained never changes: the sequences per optimizer step
are fixed, accumulation = sequences per step / micro-batch):
  * of the executions that fit (no checkpointing, selective checkpointing, full checkpointing) the one with the
    lowest estimated step time: full recomputes the forward (6N -> 8N FLOPs per token, `recompute_factor`),
    selective only elementwise ops (no matmul FLOPs) but keeps more activations, so it is tried first and
    checkpointing stays off whenever every phase fits without it;
  * each phase of the sequence schedule gets the largest micro-batch whose estimated peak "fits" (<= 90 % of
    the device): fewer, larger kernels run the same tokens faster. Short phases thus take larger micro-batches.
Estimates cost ~2 s each for the 1b preset, so the search starts from a guess (the tier's micro-batch at the
longest sequence, then the same tokens per micro-batch at shorter ones) and only estimates a doubled
micro-batch when a proportional prediction from the last estimate says it may fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from model import ModelConfig
from pretrain.plan.memory import GiB, MemoryEstimate, allowance, comm_bytes, estimate_step_memory
from pretrain.train.config import TrainConfig, flag_args

FITS, TIGHT = 0.90, 1.00  # peak / device memory: <= 0.90 fits, <= 1.00 tight, above: won't fit
# A doubled micro-batch is estimated when its proportional prediction is below this times the fit limit: the
# prediction scales everything above weights + optimizer state, which overstates growth when part is constant.
PREDICTION_SLACK = 1.10
# Share of a training step's matmul FLOPs (6N: forward 2N, backward 4N) that each policy runs again in backward:
# full re-runs the blocks' forward (2N of 6N); selective keeps every matmul output and re-runs only elementwise ops,
# whose cost is memory bandwidth, not FLOPs. tests/test_selective_checkpoint.py counts both with FlopCounterMode.
RECOMPUTED_FLOPS = {"full": 1 / 3, "selective": 0.0}


def recompute_factor(cfg: TrainConfig) -> float:
    """What the MFU is multiplied by for the FLOPs checkpointing runs again: 6N / (6N + recomputed)."""
    if not cfg.grad_checkpoint:
        return 1.0
    return 1.0 / (1.0 + RECOMPUTED_FLOPS[cfg.checkpoint_policy])


def verdict(peak: int, capacity: int) -> str:
    return "fits" if peak <= FITS * capacity else "tight" if peak <= TIGHT * capacity else "won't fit"


def device_kind(cfg: TrainConfig) -> str:
    return "cpu" if cfg.device == "cpu" else "cuda"


def ddp_buckets(cfg: TrainConfig, nproc: int) -> bool:
    """Whether the run keeps DDP's gradient buckets: one gradient-sized allocation made when DDP wraps the model
    and held for the whole run (zero_grad(set_to_none) frees .grad, not the buckets it is a view of)."""
    return nproc > 1 and not cfg.fsdp


def step_peak_bytes(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, nproc: int) -> tuple[int, MemoryEstimate]:
    """Device bytes of one step at seq_len, with allowance; torchrun adds NCCL's buffers.

    Under DDP the gradients are views into its buckets (gradient_as_bucket_view), which exist before the forward
    whether or not gradients are accumulated: the step is estimated with gradients held through the forward, as
    accumulation holds them (without accumulation a single process frees them between steps; DDP does not)."""
    if ddp_buckets(cfg, nproc) and cfg.grad_accum == 1:
        cfg = replace(cfg, grad_accum=2)  # memory-wise: gradients present during the forward; nothing else differs
    est = estimate_step_memory(mcfg, cfg, seq_len)
    return est.device_bytes(device_kind(cfg)) + comm_bytes(nproc, device_kind(cfg)), est


def micro_options(sequences_per_proc: int) -> list[int]:
    """Micro-batches that split a step's sequences evenly (ascending)."""
    return [b for b in range(1, sequences_per_proc + 1) if sequences_per_proc % b == 0]


def with_micro(cfg: TrainConfig, micro: int, sequences_per_proc: int) -> TrainConfig:
    """`cfg` running `micro` sequences per forward pass, accumulation making up the step."""
    return replace(cfg, batch_size=micro, grad_accum=max(1, sequences_per_proc // micro), micro_batch_schedule="")


def _predicted(est: MemoryEstimate, ratio: float, kind: str, ddp_extra: int) -> int:
    """Device bytes when the micro-batch grows by `ratio`, scaling what is not weights or optimizer state."""
    fixed = est.param_bytes + est.optimizer_bytes + est.breakdown.get("grads", 0)
    tensors = fixed + int((est.tensor_peak_bytes - fixed) * ratio)
    return tensors + allowance(tensors, kind) + ddp_extra


def largest_fitting(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, capacity: int, nproc: int,
                    sequences_per_proc: int, guess: int, floor: int = 1) -> int | None:
    """The largest micro-batch (>= floor) whose step at seq_len fits, searched from `guess`; None if none does."""
    opts = [b for b in micro_options(sequences_per_proc) if b >= floor]
    if not opts:
        return None
    i = max(k for k, b in enumerate(opts) if b <= max(guess, opts[0]))

    def peak(k: int) -> tuple[int, MemoryEstimate]:
        return step_peak_bytes(mcfg, with_micro(cfg, opts[k], sequences_per_proc), seq_len, nproc)

    p, est = peak(i)
    if verdict(p, capacity) != "fits":
        # Walk down; after one step, try the smallest option first: when it does not fit either (the no-checkpointing
        # trial of a tier that needs checkpointing) nothing between does (memory grows with the micro-batch), which
        # saves the estimates of every option in between. Same answer as walking all the way down.
        floor_fits = False
        for k in range(i - 1, -1, -1):
            if k == i - 2 > 0:
                if verdict(peak(0)[0], capacity) != "fits":
                    return None
                floor_fits = True
            if (k == 0 and floor_fits) or verdict(peak(k)[0], capacity) == "fits":
                return opts[k]
        return None
    ddp_extra = comm_bytes(nproc, device_kind(cfg))
    while i + 1 < len(opts):
        if _predicted(est, opts[i + 1] / opts[i], device_kind(cfg), ddp_extra) > PREDICTION_SLACK * FITS * capacity:
            break
        p2, est2 = peak(i + 1)
        if verdict(p2, capacity) != "fits":
            break
        i, est = i + 1, est2
    return opts[i]


@dataclass
class Execution:
    """The planner's choice: checkpointing and its policy, and the micro-batch of each distinct sequence length."""

    grad_checkpoint: bool
    micro: dict[int, int]  # seq_len -> micro-batch
    why_checkpoint: str
    checkpoint_policy: str = "full"  # what checkpointing recomputes (full when it is off: the trainer's default)
    why_policy: str = ""


def execution_trials(cfg: TrainConfig, checkpoint: bool | None, policy: str | None) -> list[TrainConfig]:
    """The executions the planner may use, fastest estimated step first (ties: the order below).

    `checkpoint` / `policy` are given (a flag) or None (the planner's to choose). The plan's step time is tokens x
    FLOPs / (peak x MFU x recompute_factor): the micro-batch does not enter it, so the first of these that fits
    is the fitting execution with the lowest estimated step time. Without checkpointing the policy stays the
    trainer's default (the trainer refuses selective without --grad-checkpoint)."""
    trials = [replace(cfg, grad_checkpoint=False, checkpoint_policy="full")] if checkpoint is not True else []
    if checkpoint is not False:
        trials += [replace(cfg, grad_checkpoint=True, checkpoint_policy=p) for p in RECOMPUTED_FLOPS
                   if policy in (None, p)]
    return sorted(trials, key=lambda t: 1 / recompute_factor(t))  # stable: off before selective at equal time


def choose_execution(mcfg: ModelConfig, cfg: TrainConfig, seq_lens: list[int], capacity: int, nproc: int,
                     sequences_per_proc: int, guess: int, checkpoint: bool | None,
                     micro: dict[int, int] | None, policy: str | None = "full") -> Execution | None:
    """Checkpointing (unless `checkpoint` is given), its policy (unless `policy` is given) and per-length
    micro-batches (unless `micro` is given): the fitting execution with the lowest estimated step time
    (`execution_trials`), each phase at its largest fitting micro-batch.

    Returns None when nothing fits even at micro-batch 1 with checkpointing (the caller keeps its defaults and
    the plan says "won't fit" with a suggestion).
    """
    lengths = sorted(set(seq_lens), reverse=True)  # longest first: it needs the most memory
    for trial in execution_trials(cfg, checkpoint, policy):
        if micro is not None:  # given: only checkpointing is decided
            if all(verdict(step_peak_bytes(mcfg, with_micro(trial, micro[t], sequences_per_proc), t, nproc)[0],
                           capacity) == "fits" for t in lengths):
                return _chosen(trial, dict(micro), checkpoint, policy, lengths[0])
            continue
        chosen: dict[int, int] = {}
        prev_t, prev_b = lengths[0], guess
        for t in lengths:
            b = largest_fitting(mcfg, trial, t, capacity, nproc, sequences_per_proc,
                                guess=max(1, prev_b * prev_t // t), floor=chosen.get(prev_t, 1))
            if b is None:
                break
            chosen[t], prev_t, prev_b = b, t, b
        if len(chosen) == len(lengths):
            return _chosen(trial, chosen, checkpoint, policy, lengths[0])
    return None


def _chosen(trial: TrainConfig, micro: dict[int, int], checkpoint: bool | None, policy: str | None,
            longest: int) -> Execution:
    """The Execution of `trial`, with the plan's "why" for checkpointing and for its policy: the rule is the
    lowest estimated step time among the executions that fit (`execution_trials`)."""
    full = f"x{1 + RECOMPUTED_FLOPS['full']:.2f}"
    if checkpoint is not None:
        why = "flag"
    elif not trial.grad_checkpoint:
        why = (f"derived: off, every phase fits without it: the fastest execution (checkpointing would cost up to "
               f"{full} step time)")
    else:
        why = f"derived: on, seq {longest} does not fit without it even at micro-batch 1"
    why_policy = ""
    if trial.grad_checkpoint and policy is None:
        if trial.checkpoint_policy == "selective":
            why_policy = ("derived: the fitting execution with the lowest estimated step time: selective recomputes "
                          f"only elementwise ops (step time x1), full the forward ({full})")
        else:
            why_policy = (f"derived: selective does not fit (seq {longest}, even at micro-batch 1): full, which "
                          f"recomputes the forward ({full} step time)")
    return Execution(trial.grad_checkpoint, micro, why, trial.checkpoint_policy, why_policy)


def suggest_fix(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, capacity: int, nproc: int) -> str | None:
    """The cheapest flag change (in speed) whose estimate fits; else the closest "tight" one; else None.

    Changes are tried in order: a smaller micro-batch (accumulation keeps the sequences per step), then
    selective then full activation checkpointing, then bf16 weights, then Lion (half of AdamW's state); within
    each, the largest micro-batch that fits (memory only grows with it, so a bisection over the halvings finds it).
    """
    total = cfg.batch_size * cfg.grad_accum
    micro = [cfg.batch_size]
    while micro[-1] > 1:
        micro.append(micro[-1] // 2 if micro[-1] % 2 == 0 else 1)
    # Checkpointing: selective first (it recomputes no matmul), then full (the least activation memory).
    modes: list[dict[str, Any]] = [{}, {"grad_checkpoint": True, "checkpoint_policy": "selective"},
                                   {"grad_checkpoint": True, "checkpoint_policy": "full"}]
    if not (cfg.amp and cfg.amp_dtype == "fp16"):  # fp16 needs fp32 weights for its GradScaler
        modes += [modes[-1] | {"param_dtype": "bf16"}]
    modes += [modes[-1] | {"optimizer": "lion"}]

    def describe(change: dict[str, Any], b: int, peak: int, note: str = "") -> str:
        flags = [f for k, v in change.items() if getattr(cfg, k) != v for f in flag_args(k, v)]
        if b != cfg.batch_size:
            flags += ["--batch-size", str(b), "--grad-accum", str(max(1, total // b))]
        return f"{' '.join(flags)} (est. {peak / GiB:.1f} GiB{note})"

    closest: tuple[int, int, str] | None = None  # lowest "tight" candidate (then largest micro-batch)

    def fits(change: dict[str, Any], b: int) -> tuple[bool, int]:
        nonlocal closest
        candidate = replace(cfg, **change, batch_size=b, grad_accum=max(1, total // b), micro_batch_schedule="")
        peak, _ = step_peak_bytes(mcfg, candidate, seq_len, nproc)
        v = verdict(peak, capacity)
        if v == "tight" and (closest is None or (peak, -b) < closest[:2]):
            closest = (peak, -b, describe(change, b, peak, ", tight: watch the first steps"))
        return v == "fits", peak

    tried: set[tuple] = set()
    for change in modes:
        key = tuple(sorted((k, v) for k, v in change.items() if getattr(cfg, k) != v))
        if key in tried:
            continue
        tried.add(key)
        options = micro if key else micro[1:]  # with no other change, the current micro-batch already failed
        if not options or not fits(change, options[-1])[0]:
            continue
        lo, hi = 0, len(options) - 1  # options[hi] fits; find the first (largest micro-batch) that does
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(change, options[mid])[0] else (mid + 1, hi)
        return describe(change, options[lo], fits(change, options[lo])[1])
    return closest[2] if closest else None


def weight_cache_reason(mcfg: ModelConfig, cfg: TrainConfig, micro: dict[int, int], capacity: int, nproc: int,
                        sequences_per_proc: int) -> str | None:
    """Why --bf16-weight-cache should be on (None: off). On when some phase runs several micro-batches a step (the
    casts it saves: accumulation - 1 per weight, twice with checkpointing) and every phase still fits with the cast
    weights held through the step (2 bytes per block parameter; pretrain/train/weight_cache.py)."""
    if not cfg.amp or cfg.param_dtype != "fp32" or cfg.fsdp or cfg.float8:
        return None  # nothing to cache (validate() refuses the flag there)
    accum = {t: max(1, sequences_per_proc // b) for t, b in micro.items()}
    if max(accum.values(), default=1) == 1:
        return None
    cached = replace(cfg, bf16_weight_cache=True)
    for t, b in micro.items():
        if verdict(step_peak_bytes(mcfg, with_micro(cached, b, sequences_per_proc), t, nproc)[0], capacity) != "fits":
            return None
    return (f"derived: on, {max(accum.values())} micro-batches a step cast each block weight once, not per "
            "micro-batch, and every phase still fits")
