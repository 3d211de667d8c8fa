"""The launch plan: the resolved settings (pretrain/plan/resolve.py) and what the run will cost.

`build_plan()` adds to a Resolved the execution choices (checkpointing, micro-batch per phase:
pretrain/plan/fit.py), the per-phase token plan (pretrain.schedule, the same code the trainer runs), the
peak-memory estimate per phase (pretrain.plan.memory) with a verdict and a flag change that would fit, the time
estimate, checkpoint disk and the exact trainer command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from model import PRESETS, ModelConfig
from pretrain import invocation
from pretrain.plan.cpu_rate import Rate, keep_rates, kept_rates, load_now, rate_source
from pretrain.plan.fit import (
    choose_execution,
    recompute_factor,
    step_peak_bytes,
    suggest_fix,
    verdict,
    weight_cache_reason,
    with_micro,
)
from pretrain.plan.instrument_memory import pass_peak_bytes, run_passes, turn_down
from pretrain.plan.memory import GiB
from pretrain.plan.pick_optimizer import choose_optimizer
from pretrain.plan.probe import PhaseProbe, probe_plan
from pretrain.plan.resolve import DEFAULT, MFU_SOURCE, Origin, Request, Resolved, Source, derived, source_of
from pretrain.plan.tiers import GpuInfo, Tier, memory_capacity, peak_flops, tier_cards
from pretrain.schedule import (
    eval_seq_len_at,
    format_step_schedule,
    micro_batch_at,
    parse_micro_batch_schedule,
    phases,
    planned_tokens,
)
from pretrain.train.config import TrainConfig, flag_args, flag_name, model_config_from
from pretrain.train.staging import host_ram_bytes

# A CPU plan's time without a kept measured rate (pretrain/plan/cpu_rate.py): the FLOP estimate, and how to measure.
CPU_NOT_TIMED = ("not timed on this CPU, and a small model's step can be several times slower than its FLOPs (loss, "
                 "optimizer, Python overhead): add --probe to time real steps of each phase; later dry runs of these "
                 "settings on this host show that rate (after --run, the trainer's own)")
CPU_KEPT = "kept: later dry runs of these settings on this host show it"
FLOPS_CONVENTION = ("model FLOPs, PaLM convention (6N + full S x S attention, no causal halving); the time "
                    "estimate is peak x MFU / these")
# Printed in the trainer command even at their trainer defaults, so the command documents the run.
ALWAYS_SHOWN = ("size", "data", "out_dir", "device", "batch_size", "grad_accum", "steps", "seq_schedule",
                "optimizer", "lr", "min_lr", "lr_schedule", "warmup_steps", "weight_decay", "grad_clip",
                "param_dtype", "amp_dtype", "grad_checkpoint", "compile")


@dataclass
class PhasePlan:
    """One stretch of the run at one sequence length: its tokens, memory verdict and time estimate."""

    start_step: int
    end_step: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    tokens_per_step: int
    tokens: int
    tensor_peak_bytes: int
    peak_memory_bytes: int
    verdict: str  # fits | tight | won't fit
    tokens_per_second: float
    seconds: float
    breakdown: dict[str, int] = field(default_factory=dict)
    flops_tokens_per_second: float = 0.0  # peak FLOP/s x MFU / FLOPs per token, whatever tok/s the plan uses
    # The peak (and its tensors and breakdown above) is the largest of the training step and of every pass the
    # run makes beside it (instrument_memory.py): which one, and each one's device bytes.
    peak_of: str = "training step"
    peaks: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.verdict != "won't fit"


@dataclass
class Plan:
    """Everything the dry run shows; `to_json()` is the --json output."""

    resolved: Resolved
    cfg: TrainConfig
    tier: Tier
    tier_how: str
    phases: list[PhasePlan]
    memory_capacity_bytes: int
    memory_capacity_how: str
    peak_flops: float
    peak_flops_how: str
    mfu: float
    suggestion: str | None
    checkpoint_bytes: int
    disk_bytes: int
    command: list[str]
    run: dict[str, Any]
    data: dict[str, Any] | None
    warnings: list[str]
    rate_how: str = ""  # where the time estimate's tok/s comes from
    rate_measured: bool = False  # tok/s of real steps (--probe, or kept from one on CPU), not peak x MFU
    probes: list[PhaseProbe] = field(default_factory=list)
    host_ram_bytes: int = 0  # host RAM a checkpoint save needs (snapshot + staging: pretrain/train/staging.py)
    eval_lengths_seconds: float = 0.0  # --eval-seq-lens at every eval (length_eval_seconds), on top of the steps

    @property
    def nproc(self) -> int:
        return self.resolved.nproc

    @property
    def steps(self) -> int:
        return self.cfg.steps

    @property
    def planned_tokens(self) -> int:
        return planned_tokens(self.resolved.points, self.cfg.steps, self.resolved.sequences_per_step)

    def to_json(self) -> dict[str, Any]:
        m = self.resolved.mcfg
        params = m.num_params()
        return {
            "tier": self.tier.name, "tier_how": self.tier_how, "run": self.run, "data": self.data,
            "params": params, "non_embedding_params": m.num_params(non_embedding=True),
            "model": m.to_dict(), "kv_cache_bytes_per_token": m.kv_cache_bytes_per_token(2),
            "steps": self.steps, "planned_tokens": self.planned_tokens,
            "tokens_per_step": self.phases[-1].tokens_per_step, "tokens_per_param": self.planned_tokens / params,
            "phases": [dataclasses.asdict(p) | {"fits": p.fits} for p in self.phases],
            "memory_capacity_bytes": self.memory_capacity_bytes, "memory_capacity_how": self.memory_capacity_how,
            "suggestion": self.suggestion,
            "estimate": {"peak_flops": self.peak_flops, "peak_flops_how": self.peak_flops_how,
                         "assumed_mfu": round(self.mfu / recompute_factor(self.cfg), 9),
                         "mfu_source": MFU_SOURCE, "effective_mfu": self.mfu,
                         "grad_checkpoint_factor": recompute_factor(self.cfg),
                         "checkpoint_policy": self.cfg.checkpoint_policy if self.cfg.grad_checkpoint else None,
                         "rate_how": self.rate_how, "seconds": sum(p.seconds for p in self.phases),
                         "eval_lengths_seconds": self.eval_lengths_seconds,
                         # Per phase length: model FLOPs (PaLM's convention, full attention: the time and MFU use
                         # these) beside the causal count of what the attention kernels actually run.
                         "flops_convention": FLOPS_CONVENTION,
                         "flops_per_token": {p.seq_len: m.flops_per_token(p.seq_len) for p in self.phases},
                         "causal_flops_per_token": {p.seq_len: m.flops_per_token(p.seq_len, causal=True)
                                                    for p in self.phases}},
            "fits": all(p.fits for p in self.phases),
            "probe": [p.to_dict() for p in self.probes] or None,
            "checkpoint_bytes": self.checkpoint_bytes, "disk_bytes": self.disk_bytes,
            "host_ram_bytes": self.host_ram_bytes,
            "cards": [{"name": c.name, "memory_bytes": c.total_bytes, "bf16": c.has_bf16}
                      for c in tier_cards(self.tier.name)],
            "settings": {k: {"value": self.cfg.to_dict()[k], "source": source_of(self.resolved.sources, k)}
                         for k in self.cfg.to_dict()},
            "warnings": self.warnings, "command": self.command, "nproc": self.nproc,
        }


def trainer_argv(cfg: TrainConfig) -> list[str]:
    """Trainer flags reproducing `cfg`: those differing from the trainer defaults, plus ALWAYS_SHOWN."""
    argv: list[str] = []
    default = TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value is None or (value == getattr(default, f.name) and f.name not in ALWAYS_SHOWN):
            continue
        if isinstance(value, bool):
            argv += flag_args(f.name, value)
        elif value != "" or f.name not in ALWAYS_SHOWN:
            argv += [flag_name(f.name), str(value)]
    return argv


def command_for(cfg: TrainConfig, nproc: int) -> list[str]:
    """The full command line, naming the trainer as the launcher was started (python train_v29.py, pretrain-train,
    python -m pretrain.train: see pretrain/invocation.py), or torchrun for several processes."""
    prefix = invocation.command("train") if nproc == 1 else \
        ["torchrun", "--standalone", "--nproc-per-node", str(nproc), *invocation.torchrun_target("train")]
    return prefix + trainer_argv(cfg)


def choose_micro_batches(res: Resolved, tier: Tier, capacity: int) -> None:
    """Apply the planner's execution rules (pretrain/plan/fit.py) to settings no flag or resumed run fixed:
    of no checkpointing, selective and full checkpointing the one that fits with the lowest estimated step time,
    the largest fitting micro-batch per phase."""
    v, src = res.values, res.sources
    mine = lambda k: source_of(src, k).planner_chose  # noqa: E731
    split_free = all(mine(k) for k in ("batch_size", "grad_accum", "micro_batch_schedule"))
    policy_free = mine("checkpoint_policy") and (mine("grad_checkpoint") or res.values["grad_checkpoint"])
    if not split_free and not mine("grad_checkpoint") and not policy_free:
        return
    cfg = res.cfg
    per_proc = cfg.batch_size * cfg.grad_accum
    lengths = [ph.seq_len for ph in phases(res.points, cfg.steps)]
    given = None
    if not split_free:
        points = parse_micro_batch_schedule(cfg.micro_batch_schedule, per_proc)
        given = {ph.seq_len: micro_batch_at(points, ph.start_step, cfg.batch_size, cfg.grad_accum)[0]
                 for ph in phases(res.points, cfg.steps)}
    choice = choose_execution(res.mcfg, cfg, lengths, capacity, res.nproc, per_proc, tier.micro_batch,
                              None if mine("grad_checkpoint") else cfg.grad_checkpoint, given,
                              None if policy_free else cfg.checkpoint_policy)
    if choice is None:
        return  # nothing fits: the tier's values stay and the plan says "won't fit" with a suggestion
    if mine("grad_checkpoint"):
        v["grad_checkpoint"] = choice.grad_checkpoint
        src["grad_checkpoint"] = Source(Origin.DERIVED, choice.why_checkpoint)  # fit.py's text says "derived: "
    if policy_free and choice.grad_checkpoint:
        v["checkpoint_policy"] = choice.checkpoint_policy
        src["checkpoint_policy"] = Source(Origin.DERIVED, choice.why_policy)
    if split_free:
        _set_micro(res, [(ph.start_step, choice.micro[ph.seq_len]) for ph in phases(res.points, cfg.steps)],
                   per_proc, derived("the largest micro-batch whose estimate fits each phase"))


def choose_weight_cache(res: Resolved, capacity: int) -> None:
    """--bf16-weight-cache, unless a flag or the resumed run fixed it: on where a step has several micro-batches and
    every phase fits with the cast weights held (pretrain/plan/fit.py weight_cache_reason)."""
    if not source_of(res.sources, "bf16_weight_cache").planner_chose:
        return
    cfg = res.cfg
    per_proc = cfg.batch_size * cfg.grad_accum
    points = parse_micro_batch_schedule(cfg.micro_batch_schedule, per_proc)
    micro = {ph.seq_len: micro_batch_at(points, ph.start_step, cfg.batch_size, cfg.grad_accum)[0]
             for ph in phases(res.points, cfg.steps)}
    why = weight_cache_reason(res.mcfg, cfg, micro, capacity, res.nproc, per_proc)
    res.values["bf16_weight_cache"] = why is not None
    res.sources["bf16_weight_cache"] = Source(Origin.DERIVED, why) if why else DEFAULT


def _set_micro(res: Resolved, points: list[tuple[int, int]], per_proc: int, how: Source) -> None:
    """Write per-phase micro-batches as --batch-size/--grad-accum (the last phase) + --micro-batch-schedule."""
    merged = [pt for i, pt in enumerate(points) if i == 0 or pt[1] != points[i - 1][1]]
    last = merged[-1][1]
    v, src = res.values, res.sources
    v["batch_size"], src["batch_size"] = last, how
    v["grad_accum"], src["grad_accum"] = per_proc // last, derived(f"{per_proc} sequences per step / {last}")
    v["micro_batch_schedule"] = format_step_schedule(merged) if len(merged) > 1 else ""
    src["micro_batch_schedule"] = how if len(merged) > 1 else DEFAULT


def nothing_fits(cfg: TrainConfig, vocab: int, capacity: int, nproc: int, gpu: GpuInfo | None) -> str:
    """One line when no flag change fits this model: what was tried, and the largest smaller --size that fits."""
    fp16 = cfg.amp and cfg.amp_dtype == "fp16"
    tried = "micro-batch 1, --grad-checkpoint" + ("" if fp16 else ", --param-dtype bf16") + " nor --optimizer lion"
    why = ""
    if fp16:
        card = f"{gpu.name} (compute capability {'.'.join(map(str, gpu.capability))})" if gpu else "this card"
        why = f"; {card} has no bf16: it trains with fp16 autocast and fp32 weights"
    sizes = list(PRESETS)  # smallest first
    for size in reversed(sizes[:sizes.index(cfg.size)] if cfg.size in sizes else []):
        trial = dataclasses.replace(cfg, size=size, block_size=None, grad_checkpoint=True,
                                    checkpoint_policy="full")
        small = model_config_from(trial, vocab)
        peak, _ = step_peak_bytes(small, trial, small.block_size, nproc)
        if verdict(peak, capacity) == "fits":
            return (f"nothing fits at --size {cfg.size}: not {tried}{why}; --size {size} fits "
                    f"(est. {peak / GiB:.1f} GiB at seq {small.block_size}, micro-batch {cfg.batch_size})")
    return f"nothing fits: not {tried}{why}; use a smaller --size or a GPU with more memory"


def build_plan(res: Resolved, req: Request, tier: Tier, tier_how: str, gpu: GpuInfo | None,
               data: dict[str, Any] | None, run: dict[str, Any]) -> Plan:
    """Execution choices, phases with memory and time, checkpoint disk, and the trainer command."""
    warnings = list(res.warnings)
    capacity, capacity_how = memory_capacity(tier, tier_how, gpu)
    choose_optimizer(res, tier, capacity)
    choose_micro_batches(res, tier, capacity)
    choose_weight_cache(res, capacity)
    cfg, mcfg = res.cfg, res.mcfg
    per_proc = cfg.batch_size * cfg.grad_accum
    micro_points = parse_micro_batch_schedule(cfg.micro_batch_schedule, per_proc)
    probes: list[PhaseProbe] = []
    load = load_now()  # before --probe's steps: whether other processes were taking the CPUs
    if req.probe:
        planned = [(ph.seq_len, micro_batch_at(micro_points, ph.start_step, cfg.batch_size, cfg.grad_accum)[0])
                   for ph in phases(res.points, cfg.steps)]
        probes = probe_plan(mcfg, cfg, planned, capacity, per_proc)
        picked = [p.picked_micro_batch or p.planned_micro_batch for p in probes]
        fixed = not all(source_of(res.sources, k).planner_chose
                        for k in ("batch_size", "grad_accum", "micro_batch_schedule"))
        if picked != [b for _, b in planned] and fixed:
            warnings.append("--probe would use micro-batches " + ", ".join(map(str, picked)) + " per phase, but the "
                            "split was given (flag or the run being resumed): kept")
        elif picked != [b for _, b in planned]:
            _set_micro(res, [(ph.start_step, b) for ph, b in zip(phases(res.points, cfg.steps), picked)], per_proc,
                       Source(Origin.PROBE, "probe: the largest micro-batch whose measured peak fits each phase"))
            cfg = res.cfg
            micro_points = parse_micro_batch_schedule(cfg.micro_batch_schedule, per_proc)
        for p in probes:
            if p.picked_micro_batch is None:
                warnings.append(f"--probe: seq {p.seq_len} did not fit even at micro-batch {p.tried[-1].micro_batch} "
                                "(measured); the trainer will run out of memory")
    flops, flops_how = peak_flops(req.peak_tflops, tier, gpu)
    mfu = req.assume_mfu * recompute_factor(cfg)
    seqs = res.sequences_per_step
    out: list[PhasePlan] = []
    rate_how, rate_measured = f"{flops_how} x MFU", False
    state_bytes = 0
    # The trainer's diagnostics and --eval-seq-lens use one length: --eval-seq-len, else the longest trained.
    instrument_len = cfg.eval_seq_len or max(ph.seq_len for ph in phases(res.points, cfg.steps))
    cpu_rates = _cpu_rates(mcfg, cfg, res, probes, load)
    for i, ph in enumerate(phases(res.points, cfg.steps)):
        micro, accum = micro_batch_at(micro_points, ph.start_step, cfg.batch_size, cfg.grad_accum)
        phase_cfg = with_micro(cfg, micro, per_proc)
        peak, est = step_peak_bytes(mcfg, phase_cfg, ph.seq_len, res.nproc)
        state_bytes = est.state_bytes
        passes = run_passes(mcfg, cfg, eval_seq_len_at(res.points, ph.end_step, cfg.eval_seq_len), instrument_len)
        peaks = {"training step": (peak, est)} | {name: pass_peak_bytes(mcfg, cfg, work, res.nproc)
                                                   for name, work in passes.items()}
        peak_of = max(peaks, key=lambda name: peaks[name][0])
        peak, est = peaks[peak_of]
        tok_s = flops_tok_s = res.nproc * flops * mfu / mcfg.flops_per_token(ph.seq_len)
        measured = probes[i].picked if probes else None
        if measured is not None and measured.tok_s:
            tok_s, rate_how = res.nproc * measured.tok_s, "measured by --probe (real steps on this device)"
            rate_how, rate_measured = rate_how + (f"; {CPU_KEPT}" if cfg.device == "cpu" else ""), True
        elif cpu_rates:
            tok_s, rate_measured = cpu_rates[i].tok_s, True
            rate_how = f"measured: real steps of each phase timed on this CPU {rate_source(cpu_rates)}"
        elif cfg.device == "cpu":
            rate_how, rate_measured = f"{flops_how} x MFU: {CPU_NOT_TIMED}", False
        tokens = ph.steps * ph.seq_len * seqs
        out.append(PhasePlan(ph.start_step, ph.end_step, ph.seq_len, micro, accum, ph.seq_len * seqs, tokens,
                             est.tensor_peak_bytes, peak, verdict(peak, capacity), tok_s, tokens / tok_s,
                             est.breakdown, flops_tok_s, peak_of, {k: v[0] for k, v in peaks.items()}))
    worst = max(out, key=lambda p: p.peak_memory_bytes)
    suggestion = None
    if worst.verdict != "fits" and worst.peak_of != "training step" and \
            verdict(worst.peaks["training step"], capacity) == "fits":
        suggestion = turn_down(worst.peak_of)
    elif worst.verdict != "fits":
        worst_cfg = with_micro(cfg, worst.micro_batch, per_proc)
        suggestion = suggest_fix(mcfg, worst_cfg, worst.seq_len, capacity, res.nproc) or \
            nothing_fits(worst_cfg, mcfg.vocab_size, capacity, res.nproc, gpu)
    if worst.verdict == "won't fit":
        warnings.append(f"estimated peak {worst.peak_memory_bytes / GiB:.1f} GiB exceeds {capacity / GiB:.1f} GiB: "
                        f"the trainer will likely run out of memory; {suggestion}")
    checkpoint_bytes = state_bytes
    host_ram = host_ram_bytes(checkpoint_bytes, cfg.device)
    # last.pt and the newest step_<N>.pt are one file (hard link); best.pt may pin one older save, and one
    # write is in flight at a time: at most keep_last + 2 distinct copies on disk.
    disk_bytes = checkpoint_bytes * (max(cfg.keep_last, 1) + 2)
    total = planned_tokens(res.points, cfg.steps, seqs)
    if data is not None:
        data = dict(data, passes=total / data["train_tokens"])
        if data["passes"] > 1:
            warnings.append(f"the plan reads the training data {data['passes']:.2f} times (repeated tokens "
                            "help less); prepare more data with prepare_fineweb.py --tokens or lower the budget")
    return Plan(res, cfg, tier, tier_how, out, capacity, capacity_how, flops, flops_how, mfu, suggestion,
                checkpoint_bytes, disk_bytes, command_for(cfg, res.nproc), run, data, warnings, rate_how,
                rate_measured, probes, host_ram,
                length_eval_seconds(cfg, mcfg, out, instrument_len, res.nproc))


def _cpu_rates(mcfg: ModelConfig, cfg: TrainConfig, res: Resolved, probes: list[PhaseProbe],
               load: float) -> list[Rate]:
    """A CPU plan's measured tok/s per phase (pretrain/plan/cpu_rate.py): what --probe timed now is kept for later
    dry runs; without --probe, the rates kept for these very steps, when every phase has one. [] when there are
    none (the plan uses the FLOP estimate) and on a GPU."""
    if cfg.device != "cpu":
        return []
    per_proc = cfg.batch_size * cfg.grad_accum
    points = parse_micro_batch_schedule(cfg.micro_batch_schedule, per_proc)
    steps = [(with_micro(cfg, micro_batch_at(points, ph.start_step, cfg.batch_size, cfg.grad_accum)[0], per_proc),
              ph.seq_len) for ph in phases(res.points, cfg.steps)]
    if probes:
        timed = [(with_micro(cfg, p.picked_micro_batch, per_proc), seq_len, p.picked.tok_s)  # the step it timed
                 for (_, seq_len), p in zip(steps, probes) if p.picked is not None and p.picked.tok_s]
        keep_rates(mcfg, timed, load)
        return []
    return kept_rates(mcfg, steps) or []


def length_eval_seconds(cfg: TrainConfig, mcfg: ModelConfig, out: list[PhasePlan], instrument_len: int,
                        nproc: int) -> float:
    """Time --eval-seq-lens adds: at every eval (step 0, every --eval-every, the end) rank 0 alone scores every
    length over the longest length's windows, at the FLOP rate one process trains at in the last phase."""
    if not cfg.eval_seq_lens:
        return 0.0
    from pretrain.evals.lengths import length_eval_flops, parse_eval_lengths  # torch: only when it is used

    flops = length_eval_flops(mcfg, parse_eval_lengths(cfg.eval_seq_lens), cfg.batch_size * instrument_len,
                              cfg.eval_iters)
    evals = len({0, cfg.steps} | set(range(cfg.eval_every, cfg.steps, cfg.eval_every) if cfg.eval_every else []))
    last = out[-1]
    return evals * flops / (last.tokens_per_second / nproc * mcfg.flops_per_token(last.seq_len))
