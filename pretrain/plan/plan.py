"""The launch plan: every trainer setting with where it came from, then what the run will cost.

`resolve()` turns command-line flags + a VRAM tier (+ values adopted from an existing run) into one TrainConfig,
recording for each field its source: "flag", "tier <name>", "run" (kept from the run being resumed), "derived:
..." (computed, e.g. grad_accum from the global batch, steps from a token budget) or "default". Explicit flags
always win. `build_plan()` then adds the per-phase token plan (pretrain.schedule, the same code the trainer
runs), the peak-memory estimate per phase (pretrain.plan.memory) with a verdict and a flag change that would fit,
the time estimate, checkpoint disk and the exact trainer command.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from model import PAPER_PRESETS, ModelConfig
from pretrain.cli import UserError
from pretrain.plan.fit import choose_execution, step_peak_bytes, suggest_fix, verdict, with_micro
from pretrain.plan.memory import GiB
from pretrain.plan.probe import PhaseProbe, measured_rate, probe_plan
from pretrain.plan.tiers import OPTIMIZER_WHY, GpuInfo, Tier, memory_capacity, peak_flops
from pretrain.schedule import (
    format_step_schedule,
    micro_batch_at,
    parse_count,
    parse_micro_batch_schedule,
    parse_seq_schedule,
    phases,
    planned_tokens,
    steps_for_tokens,
)
from pretrain.train.config import TrainConfig, flag_name, model_config_from, paper_preset_fields, validate
from pretrain.train.device import cpu_has_fast_bf16
from pretrain.train.optim import DEFAULT_BETA2, default_lr, default_lr_source

VARIANTS: dict[str, tuple[str, int | None]] = {  # --variant -> (attn mode, kv heads; None = the model's default)
    "baseline": ("baseline", None), "gqa": ("gqa", None), "gqa_kv2": ("gqa", 2),
    "bottleneck": ("bottleneck", None), "decoupled": ("decoupled", None),
}
DEFAULT_VOCAB = ModelConfig.__dataclass_fields__["vocab_size"].default  # GPT-2's, used when there is no data
DEFAULT_TOKENS_PER_PARAM = 20.0  # compute-optimal ratio of Hoffmann et al. 2022 (Chinchilla)
CHECKPOINT_RECOMPUTE = 0.75  # activation checkpointing re-runs the forward: 6N model FLOPs cost 8N on hardware
# The planner's default model FLOPs utilisation for GPU time estimates. Published MFU of large bf16 training
# runs (Chowdhery et al. 2022, "PaLM", Table 3): GPT-3 21 %, Gopher 33 %, Megatron-Turing NLG 30 %, PaLM 46 %;
# a ~1B model on one GPU has no cross-node communication, so 40 % is a middle figure, not a promise. The
# trainer logs the real MFU; --probe measures tok/s on the card.
DEFAULT_MFU = 0.4
MFU_SOURCE = "--assume-mfu, default 0.4: between published 30-46 % (PaLM paper, Table 3); docs/tiers.md"
# Printed in the trainer command even at their trainer defaults, so the command documents the run.
ALWAYS_SHOWN = ("size", "data", "out_dir", "device", "batch_size", "grad_accum", "steps", "seq_schedule",
                "optimizer", "lr", "min_lr", "lr_schedule", "warmup_steps", "weight_decay", "grad_clip",
                "param_dtype", "amp_dtype", "grad_checkpoint", "compile")


@dataclass
class Request:
    """What the user asked for: TrainConfig fields given as flags, plus the launcher's own options."""

    flags: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None
    target_tokens: str | None = None
    tokens_per_param: float | None = None
    global_batch: int | None = None
    nproc: int = 1
    assume_mfu: float = DEFAULT_MFU
    peak_tflops: float | None = None
    probe: bool = False  # measure real steps per phase on the device (pretrain/plan/probe.py)


@dataclass
class Resolved:
    """A complete TrainConfig (out_dir still unset) with the source of every field."""

    values: dict[str, Any]
    sources: dict[str, str]
    mcfg: ModelConfig
    points: list[tuple[int, int]]
    warnings: list[str]
    nproc: int = 1

    @property
    def cfg(self) -> TrainConfig:
        return TrainConfig(**self.values)

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.values["batch_size"] * self.values["grad_accum"] * self.nproc


def resolve(req: Request, tier: Tier, gpu: GpuInfo | None, data_vocab: int | None,
            adopted: dict[str, Any] | None = None) -> Resolved:
    """Every TrainConfig value with its source. Raises UserError for settings that cannot work."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    adopted = adopted or {}
    t = f"tier {tier.name}"

    def pick(name: str, fallback: Any, source: str) -> Any:
        if name in req.flags:
            values[name], sources[name] = req.flags[name], "flag"
        elif name in adopted:
            values[name], sources[name] = adopted[name], "run"
        else:
            values[name], sources[name] = fallback, source
        return values[name]

    if req.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {req.nproc}")
    if not 0 < req.assume_mfu <= 1:
        raise UserError(f"--assume-mfu is a fraction in (0, 1], got {req.assume_mfu}")
    pick("size", tier.size, t)
    variant = req.variant or "baseline"
    if variant not in VARIANTS and variant not in PAPER_PRESETS:
        raise UserError(f"unknown --variant {variant!r}; use one of {', '.join([*VARIANTS, *PAPER_PRESETS])}")
    if variant in PAPER_PRESETS:
        # The paper's configurations: the trainer gets --exp plus the fields it stands for, so its command
        # still reads as plain flags; an explicit --no-null-attn etc. then fails validate() in one line.
        values["exp"], sources["exp"] = variant, f"flag (--variant {variant})"
        for name, value in paper_preset_fields(variant).items():
            pick(name, value, f"flag (--variant {variant})")
        pick("kv_head", None, "default")
    else:
        attn, kv = VARIANTS[variant]
        values["attn_mode"], sources["attn_mode"] = attn, f"flag (--variant {variant})" if req.variant else "default"
        pick("kv_head", kv, f"flag (--variant {variant})" if kv is not None else "default")
    pick("device", "cuda" if tier.is_gpu else "cpu", t)
    micro = pick("batch_size", tier.micro_batch, t)
    if micro <= 0:
        raise UserError(f"--batch-size must be a positive integer, got {micro}")
    global_batch = req.global_batch or tier.global_batch
    if global_batch <= 0:
        raise UserError(f"--global-batch must be a positive integer, got {global_batch}")
    accum = pick("grad_accum", max(1, math.ceil(global_batch / (micro * req.nproc))),
                 f"derived: {global_batch} sequences per step / ({micro} x {req.nproc} proc)")
    if sources["grad_accum"].startswith("derived") and micro * accum * req.nproc != global_batch:
        warnings.append(f"{global_batch} sequences per step is not a multiple of micro-batch {micro} x "
                        f"{req.nproc} processes; using {micro * accum * req.nproc}")
    pick("grad_checkpoint", tier.grad_checkpoint, t)
    pick("compile", tier.compile, t)
    if not tier.is_gpu and not cpu_has_fast_bf16():
        amp = pick("amp", False, "cpu: no native bf16 (AVX2 only): bf16 autocast is emulated, ~4-20x slower than fp32")
    else:
        amp = pick("amp", True, "default")
    if gpu is not None and tier.is_gpu and not gpu.has_bf16:
        amp_dtype = pick("amp_dtype", "fp16", f"gpu: {gpu.name} has no bf16")
    else:
        amp_dtype = pick("amp_dtype", "bf16", "default")
    if pick("param_dtype", tier.param_dtype, t) == "bf16" and amp and amp_dtype == "fp16" \
            and sources["param_dtype"] != "flag":
        values["param_dtype"], sources["param_dtype"] = "fp32", "fp16 autocast needs fp32 weights (GradScaler)"
    for f in fields(TrainConfig):  # model overrides: only what was given (None keeps the preset's value)
        if f.metadata["group"] == "model" and f.name not in values:
            pick(f.name, f.default, "default")
    partial = TrainConfig(**values)
    mcfg = model_config_from(partial, data_vocab or DEFAULT_VOCAB)
    if "vocab_size" not in req.flags:
        sources["vocab_size"] = "data" if data_vocab else f"default: {DEFAULT_VOCAB} (GPT-2), no data to read"

    block = mcfg.block_size
    seq_len = pick("train_seq_len", None, "default")
    if seq_len is not None and not 0 < seq_len <= block:
        raise UserError(f"--train-seq-len {seq_len} must be in 1..{block} (the model's block size); "
                        f"raise --block or lower --train-seq-len")
    tier_schedule = "" if "train_seq_len" in req.flags else tier.seq_schedule(block)
    schedule = pick("seq_schedule", tier_schedule, t if tier_schedule else "default")
    points = parse_seq_schedule(schedule, seq_len or block, block)

    _resolve_steps(req, tier, mcfg, points, micro * accum * req.nproc, values, sources)
    opt = pick("optimizer", tier.optimizer, f"{t}: {OPTIMIZER_WHY[tier.optimizer]}"
               if tier.optimizer in OPTIMIZER_WHY else "default")
    size = values["size"]
    lr = pick("lr", default_lr(size, opt), f"default for {size} {opt}: {default_lr_source(size, opt)}")
    pick("beta2", DEFAULT_BETA2[opt], f"default for {opt}")
    peak = lr if lr is not None else default_lr(size, opt)  # None (a resumed trainer-only run): its default
    pick("min_lr", float(f"{peak / 10:.6g}"), "default: lr / 10")
    pick("warmup_steps", min(2000, math.ceil(0.02 * values["steps"])), "default: 2% of steps, at most 2000")
    every = pick("eval_every", TrainConfig.eval_every, "default")
    # Diagnostics with every eval: on the bench they cost well under 2 % of training time at this cadence
    # (bench/diagnostics.py). FSDP cannot run them (rank 0 alone), so they stay off there.
    fsdp = req.flags.get("fsdp", adopted.get("fsdp", False))
    pick("analysis_every", 0 if fsdp else every, "default: off under --fsdp" if fsdp else "default: with every eval")
    for f in fields(TrainConfig):
        if f.name not in values:
            pick(f.name, f.default, "default")
    validate(TrainConfig(**values))
    return Resolved(values, sources, mcfg, points, warnings, req.nproc)


def _resolve_steps(req: Request, tier: Tier, mcfg: ModelConfig, points: list[tuple[int, int]], seqs: int,
                   values: dict[str, Any], sources: dict[str, str]) -> None:
    """--steps, or the fewest steps reaching --target-tokens / --tokens-per-param under the seq schedule."""
    given = [name for name, v in (("--steps", "steps" in req.flags), ("--target-tokens", req.target_tokens),
                                  ("--tokens-per-param", req.tokens_per_param)) if v not in (None, False)]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} both set the run length; give only one of them")
    if "steps" in req.flags:
        values["steps"], sources["steps"] = req.flags["steps"], "flag"
        if values["steps"] <= 0:
            raise UserError(f"--steps must be a positive integer, got {values['steps']}")
        return
    if req.target_tokens is not None:
        target = parse_count(req.target_tokens, "--target-tokens")
        how = f"derived: fewest steps reaching --target-tokens {req.target_tokens}"
    elif req.tokens_per_param is not None or tier.steps is None:
        tpp = req.tokens_per_param if req.tokens_per_param is not None else DEFAULT_TOKENS_PER_PARAM
        if not (isinstance(tpp, int | float) and math.isfinite(tpp) and tpp > 0):
            raise UserError(f"--tokens-per-param must be a positive number, got {tpp}")
        target = max(1, round(tpp * mcfg.num_params()))
        how = f"derived: {tpp:g} tokens/param ({'flag' if req.tokens_per_param is not None else 'default'})"
    else:
        values["steps"], sources["steps"] = tier.steps, f"tier {tier.name}"
        return
    values["steps"], sources["steps"] = steps_for_tokens(points, target, seqs), how


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
    probes: list[PhaseProbe] = field(default_factory=list)

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
                         "assumed_mfu": round(self.mfu / (CHECKPOINT_RECOMPUTE if self.cfg.grad_checkpoint else 1), 9),
                         "mfu_source": MFU_SOURCE, "effective_mfu": self.mfu,
                         "grad_checkpoint_factor": CHECKPOINT_RECOMPUTE if self.cfg.grad_checkpoint else 1.0,
                         "rate_how": self.rate_how, "seconds": sum(p.seconds for p in self.phases)},
            "fits": all(p.fits for p in self.phases),
            "probe": [p.to_dict() for p in self.probes] or None,
            "checkpoint_bytes": self.checkpoint_bytes, "disk_bytes": self.disk_bytes,
            "settings": {k: {"value": self.cfg.to_dict()[k], "source": self.resolved.sources.get(k, "default")}
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
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif value != "" or f.name not in ALWAYS_SHOWN:
            argv += [flag_name(f.name), str(value)]
    return argv


def command_for(cfg: TrainConfig, nproc: int, script: str = "train_v29.py") -> list[str]:
    """The full command line: python, or torchrun for several processes."""
    prefix = ["python", script] if nproc == 1 else ["torchrun", "--standalone", "--nproc-per-node", str(nproc), script]
    return prefix + trainer_argv(cfg)


def choose_micro_batches(res: Resolved, tier: Tier, capacity: int) -> None:
    """Apply the planner's execution rules (pretrain/plan/fit.py) to settings no flag or resumed run fixed:
    checkpointing off when every phase fits without it, the largest fitting micro-batch per phase."""
    v, src = res.values, res.sources
    mine = lambda k: src.get(k, "default").startswith(("tier", "derived", "default"))  # noqa: E731
    split_free = all(mine(k) for k in ("batch_size", "grad_accum", "micro_batch_schedule"))
    if not split_free and not mine("grad_checkpoint"):
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
                              None if mine("grad_checkpoint") else cfg.grad_checkpoint, given)
    if choice is None:
        return  # nothing fits: the tier's values stay and the plan says "won't fit" with a suggestion
    if mine("grad_checkpoint"):
        v["grad_checkpoint"], src["grad_checkpoint"] = choice.grad_checkpoint, choice.why_checkpoint
    if split_free:
        _set_micro(res, [(ph.start_step, choice.micro[ph.seq_len]) for ph in phases(res.points, cfg.steps)],
                   per_proc, "derived: the largest micro-batch whose estimate fits each phase")


def _set_micro(res: Resolved, points: list[tuple[int, int]], per_proc: int, how: str) -> None:
    """Write per-phase micro-batches as --batch-size/--grad-accum (the last phase) + --micro-batch-schedule."""
    merged = [pt for i, pt in enumerate(points) if i == 0 or pt[1] != points[i - 1][1]]
    last = merged[-1][1]
    v, src = res.values, res.sources
    v["batch_size"], src["batch_size"] = last, how
    v["grad_accum"], src["grad_accum"] = per_proc // last, f"derived: {per_proc} sequences per step / {last}"
    v["micro_batch_schedule"] = format_step_schedule(merged) if len(merged) > 1 else ""
    src["micro_batch_schedule"] = how if len(merged) > 1 else "default"


def build_plan(res: Resolved, req: Request, tier: Tier, tier_how: str, gpu: GpuInfo | None,
               data: dict[str, Any] | None, run: dict[str, Any]) -> Plan:
    """Execution choices, phases with memory and time, checkpoint disk, and the trainer command."""
    warnings = list(res.warnings)
    capacity, capacity_how = memory_capacity(tier, tier_how, gpu)
    choose_micro_batches(res, tier, capacity)
    cfg, mcfg = res.cfg, res.mcfg
    per_proc = cfg.batch_size * cfg.grad_accum
    micro_points = parse_micro_batch_schedule(cfg.micro_batch_schedule, per_proc)
    probes: list[PhaseProbe] = []
    if req.probe:
        planned = [(ph.seq_len, micro_batch_at(micro_points, ph.start_step, cfg.batch_size, cfg.grad_accum)[0])
                   for ph in phases(res.points, cfg.steps)]
        probes = probe_plan(mcfg, cfg, planned, capacity, per_proc)
        picked = [p.picked_micro_batch or p.planned_micro_batch for p in probes]
        fixed = not all(res.sources.get(k, "default").startswith(("tier", "derived", "default"))
                        for k in ("batch_size", "grad_accum", "micro_batch_schedule"))
        if picked != [b for _, b in planned] and fixed:
            warnings.append("--probe would use micro-batches " + ", ".join(map(str, picked)) + " per phase, but the "
                            "split was given (flag or the run being resumed): kept")
        elif picked != [b for _, b in planned]:
            _set_micro(res, [(ph.start_step, b) for ph, b in zip(phases(res.points, cfg.steps), picked)], per_proc,
                       "probe: the largest micro-batch whose measured peak fits each phase")
            cfg = res.cfg
            micro_points = parse_micro_batch_schedule(cfg.micro_batch_schedule, per_proc)
        for p in probes:
            if p.picked_micro_batch is None:
                warnings.append(f"--probe: seq {p.seq_len} did not fit even at micro-batch {p.tried[-1].micro_batch} "
                                "(measured); the trainer will run out of memory")
    flops, flops_how = peak_flops(req.peak_tflops, tier, gpu)
    mfu = req.assume_mfu * (CHECKPOINT_RECOMPUTE if cfg.grad_checkpoint else 1.0)
    seqs = res.sequences_per_step
    out: list[PhasePlan] = []
    rate_how = f"{flops_how} x MFU"
    est = None
    for i, ph in enumerate(phases(res.points, cfg.steps)):
        micro, accum = micro_batch_at(micro_points, ph.start_step, cfg.batch_size, cfg.grad_accum)
        phase_cfg = with_micro(cfg, micro, per_proc)
        peak, est = step_peak_bytes(mcfg, phase_cfg, ph.seq_len, res.nproc)
        tok_s = flops_tok_s = res.nproc * flops * mfu / mcfg.flops_per_token(ph.seq_len)
        measured = probes[i].picked if probes else None
        if measured is not None and measured.tok_s:
            tok_s, rate_how = res.nproc * measured.tok_s, "measured by --probe (real steps on this device)"
        elif cfg.device == "cpu":
            rate = measured_rate(mcfg, phase_cfg, ph.seq_len, flops)
            if rate is not None:
                tok_s, rate_how = rate, "measured: timed real steps of each phase on this CPU after a warm-up"
            else:
                rate_how = f"{flops_how} x MFU (a real step would take too long to time)"
        tokens = ph.steps * ph.seq_len * seqs
        out.append(PhasePlan(ph.start_step, ph.end_step, ph.seq_len, micro, accum, ph.seq_len * seqs, tokens,
                             est.tensor_peak_bytes, peak, verdict(peak, capacity), tok_s, tokens / tok_s,
                             est.breakdown, flops_tok_s))
    worst = max(out, key=lambda p: p.peak_memory_bytes)
    suggestion = None
    if worst.verdict != "fits":
        worst_cfg = with_micro(cfg, worst.micro_batch, per_proc)
        suggestion = suggest_fix(mcfg, worst_cfg, worst.seq_len, capacity, res.nproc) or (
            "nothing fits: not micro-batch 1, --grad-checkpoint, --param-dtype bf16 nor --optimizer lion; "
            "use a smaller --size or a GPU with more memory")
    if worst.verdict == "won't fit":
        warnings.append(f"estimated peak {worst.peak_memory_bytes / GiB:.1f} GiB exceeds {capacity / GiB:.1f} GiB: "
                        f"the trainer will likely run out of memory; {suggestion}")
    assert est is not None
    checkpoint_bytes = est.state_bytes
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
                checkpoint_bytes, disk_bytes, command_for(cfg, res.nproc), run, data, warnings, rate_how, probes)
