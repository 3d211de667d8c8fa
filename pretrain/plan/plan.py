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
from dataclasses import dataclass, field, fields, replace
from typing import Any

from model import PAPER_PRESETS, ModelConfig
from pretrain.cli import UserError
from pretrain.plan.memory import GiB, comm_bytes, estimate_step_memory
from pretrain.plan.tiers import GpuInfo, Tier, memory_capacity, peak_flops
from pretrain.schedule import parse_count, parse_seq_schedule, phases, planned_tokens, steps_for_tokens
from pretrain.train.config import TrainConfig, flag_name, model_config_from, paper_preset_fields, validate
from pretrain.train.optim import DEFAULT_BETA2, DEFAULT_LR

VARIANTS: dict[str, tuple[str, int | None]] = {  # --variant -> (attn mode, kv heads; None = the model's default)
    "baseline": ("baseline", None), "gqa": ("gqa", None), "gqa_kv2": ("gqa", 2),
    "bottleneck": ("bottleneck", None), "decoupled": ("decoupled", None),
}
DEFAULT_VOCAB = ModelConfig.__dataclass_fields__["vocab_size"].default  # GPT-2's, used when there is no data
DEFAULT_TOKENS_PER_PARAM = 20.0  # compute-optimal ratio of Hoffmann et al. 2022 (Chinchilla)
FITS, TIGHT = 0.90, 1.00  # peak / device memory: <= 0.90 fits, <= 1.00 tight, above: won't fit
CHECKPOINT_RECOMPUTE = 0.75  # activation checkpointing re-runs the forward: 6N model FLOPs cost 8N on hardware
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
    assume_mfu: float = 0.4
    peak_tflops: float | None = None


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
    opt = pick("optimizer", "adamw", "default")
    lr = pick("lr", DEFAULT_LR[opt], f"default for {opt}")
    pick("beta2", DEFAULT_BETA2[opt], f"default for {opt}")
    peak = lr if lr is not None else DEFAULT_LR[opt]  # None (a resumed trainer-only run): the trainer's default
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
                         "effective_mfu": self.mfu, "grad_checkpoint_factor": CHECKPOINT_RECOMPUTE
                         if self.cfg.grad_checkpoint else 1.0, "seconds": sum(p.seconds for p in self.phases)},
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


def verdict(peak: int, capacity: int) -> str:
    return "fits" if peak <= FITS * capacity else "tight" if peak <= TIGHT * capacity else "won't fit"


def device_kind(cfg: TrainConfig) -> str:
    return "cpu" if cfg.device == "cpu" else "cuda"


def step_peak_bytes(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, nproc: int) -> tuple[int, Any]:
    """Device bytes of one step at seq_len, with allowance; torchrun adds NCCL's buffers (DDP's gradient buckets
    are the gradients themselves: gradient_as_bucket_view)."""
    est = estimate_step_memory(mcfg, cfg, seq_len)
    return est.device_bytes(device_kind(cfg)) + comm_bytes(nproc, device_kind(cfg)), est


def suggest_fix(mcfg: ModelConfig, cfg: TrainConfig, seq_len: int, capacity: int, nproc: int) -> str | None:
    """The cheapest flag change (in speed) whose estimate fits; else the closest "tight" one; else None.

    Changes are tried in order: a smaller micro-batch (accumulation keeps the sequences per step), then
    activation checkpointing, then bf16 weights, then Lion (half of AdamW's state); within each, the largest
    micro-batch that fits (memory only grows with it, so a bisection over the halvings finds it).
    """
    total = cfg.batch_size * cfg.grad_accum
    micro = [cfg.batch_size]
    while micro[-1] > 1:
        micro.append(micro[-1] // 2 if micro[-1] % 2 == 0 else 1)
    modes: list[dict[str, Any]] = [{}, {"grad_checkpoint": True}]
    if not (cfg.amp and cfg.amp_dtype == "fp16"):  # fp16 needs fp32 weights for its GradScaler
        modes += [{"grad_checkpoint": True, "param_dtype": "bf16"}]
    modes += [modes[-1] | {"optimizer": "lion"}]

    def describe(change: dict[str, Any], b: int, peak: int, note: str = "") -> str:
        flags = [f for k, v in change.items() if getattr(cfg, k) != v for f in _flag(k, v)]
        if b != cfg.batch_size:
            flags += ["--batch-size", str(b), "--grad-accum", str(max(1, total // b))]
        return f"{' '.join(flags)} (est. {peak / GiB:.1f} GiB{note})"

    closest: tuple[int, int, str] | None = None  # lowest "tight" candidate (then largest micro-batch)

    def fits(change: dict[str, Any], b: int) -> tuple[bool, int]:
        nonlocal closest
        candidate = replace(cfg, **change, batch_size=b, grad_accum=max(1, total // b))
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


def _flag(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag_name(name) if value else "--no-" + name.replace("_", "-")]
    return [flag_name(name), str(value)]


def build_plan(res: Resolved, req: Request, tier: Tier, tier_how: str, gpu: GpuInfo | None,
               data: dict[str, Any] | None, run: dict[str, Any]) -> Plan:
    """Phases with memory and time, checkpoint disk, and the trainer command for a resolved config."""
    cfg, mcfg = res.cfg, res.mcfg
    warnings = list(res.warnings)
    capacity, capacity_how = memory_capacity(tier, tier_how, gpu)
    flops, flops_how = peak_flops(req.peak_tflops, tier, gpu)
    mfu = req.assume_mfu * (CHECKPOINT_RECOMPUTE if cfg.grad_checkpoint else 1.0)
    seqs = res.sequences_per_step
    out: list[PhasePlan] = []
    est = None
    for ph in phases(res.points, cfg.steps):
        peak, est = step_peak_bytes(mcfg, cfg, ph.seq_len, res.nproc)
        tok_s = res.nproc * flops * mfu / mcfg.flops_per_token(ph.seq_len)
        tokens = ph.steps * ph.seq_len * seqs
        out.append(PhasePlan(ph.start_step, ph.end_step, ph.seq_len, cfg.batch_size, cfg.grad_accum,
                             ph.seq_len * seqs, tokens, est.tensor_peak_bytes, peak, verdict(peak, capacity),
                             tok_s, tokens / tok_s, est.breakdown))
    worst = max(out, key=lambda p: p.peak_memory_bytes)
    suggestion = None
    if worst.verdict != "fits":
        suggestion = suggest_fix(mcfg, cfg, worst.seq_len, capacity, res.nproc) or (
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
                checkpoint_bytes, disk_bytes, command_for(cfg, res.nproc), run, data, warnings)
