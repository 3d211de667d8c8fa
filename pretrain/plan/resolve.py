"""Resolving a launch: command-line flags + a VRAM tier (+ values adopted from an existing run) -> one TrainConfig.

`resolve()` records for each field its `Source`: a kind (a flag, the tier, the run being resumed, derived from
other values, a default, a rule forced by the hardware, ...) and the text the plan prints for it ("flag",
"tier 24", "run", "derived: ...", "default"). Explicit flags always win. pretrain/plan/plan.py turns the result
into a costed plan.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any

from model import PAPER_PRESETS, ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.errors import UserError
from pretrain.plan.tiers import OPTIMIZER_WHY, GpuInfo, Tier
from pretrain.schedule import (
    LAUNCHER_WARMUP,
    default_min_lr,
    default_warmup_steps,
    parse_count,
    parse_seq_schedule,
    steps_for_tokens,
)
from pretrain.train.config import (
    TrainConfig,
    check_checkpoint_policy,
    check_number,
    model_config_from,
    paper_preset_fields,
    validate,
)
from pretrain.train.optim_registry import DEFAULT_BETA2, default_lr, default_lr_source
from pretrain.units import finite_number

VARIANTS: dict[str, tuple[str, int | None]] = {  # --variant -> (attn mode, kv heads; None = the model's default)
    **{name: (name, None) for name in ATTENTION_VARIANTS}, "gqa_kv2": ("gqa", 2),
}


def cpu_has_fast_bf16() -> bool:
    """pretrain.train.device's check, imported on use: it loads torch, which the launcher's --help must not."""
    from pretrain.train.device import cpu_has_fast_bf16 as check

    return check()


DEFAULT_VOCAB = ModelConfig.__dataclass_fields__["vocab_size"].default  # GPT-2's, used when there is no data
DEFAULT_TOKENS_PER_PARAM = 20.0  # compute-optimal ratio of Hoffmann et al. 2022 (Chinchilla)
# The planner's default model FLOPs utilisation for GPU time estimates. Published MFU of large bf16 training
# runs (Chowdhery et al. 2022, "PaLM", Table 3): GPT-3 21 %, Gopher 33 %, Megatron-Turing NLG 30 %, PaLM 46 %;
# a ~1B model on one GPU has no cross-node communication, so 40 % is a middle figure, not a promise. The
# trainer logs the real MFU; --probe measures tok/s on the card.
DEFAULT_MFU = 0.4
MFU_SOURCE = "--assume-mfu, default 0.4: between published 30-46 % (PaLM paper, Table 3); docs/tiers.md"


class Origin(enum.Enum):
    """Who chose a setting's value. The planner may revise what it chose itself (TIER, DERIVED, DEFAULT)."""

    FLAG = "flag"  # the user's command line, including --variant
    RUN = "run"  # kept from the run being resumed
    TIER = "tier"
    DERIVED = "derived"  # computed from other values (global batch, token budget, the memory fit)
    DEFAULT = "default"
    DATA = "data"  # read from the dataset (vocab size)
    HARDWARE = "hardware"  # forced by what the CPU/GPU can do (no bf16)
    PROBE = "probe"  # measured by --probe
    OPTION = "option"  # a launcher option (--if-exists overwrite)


class Source(str):
    """A setting's source: `kind` is what code tests, the string itself is what the plan prints (and JSON holds)."""

    kind: Origin

    def __new__(cls, kind: Origin, text: str | None = None) -> Source:
        self = super().__new__(cls, kind.value if text is None else text)
        self.kind = kind
        return self

    def __getnewargs__(self) -> tuple[Origin, str]:  # copy and pickle rebuild it with its kind
        return self.kind, str(self)

    @property
    def planner_chose(self) -> bool:
        """True when no flag, resumed run, hardware rule or measurement fixed the value: the planner may revise it."""
        return self.kind in (Origin.TIER, Origin.DERIVED, Origin.DEFAULT)


FLAG, RUN, DEFAULT = Source(Origin.FLAG), Source(Origin.RUN), Source(Origin.DEFAULT)


def tier_source(tier: Tier, why: str = "") -> Source:
    return Source(Origin.TIER, f"tier {tier.name}" + (f": {why}" if why else ""))


def derived(how: str) -> Source:
    return Source(Origin.DERIVED, f"derived: {how}")


def source_of(sources: dict[str, Source], name: str) -> Source:
    """The source of `name`; a field no one recorded is a default."""
    return sources.get(name, DEFAULT)


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
    sources: dict[str, Source]
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
    sources: dict[str, Source] = {}
    warnings: list[str] = []
    adopted = adopted or {}
    t = tier_source(tier)

    def pick(name: str, fallback: Any, source: Source) -> Any:
        if name in req.flags:
            values[name], sources[name] = req.flags[name], FLAG
        elif name in adopted:
            values[name], sources[name] = adopted[name], RUN
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
        by_variant = Source(Origin.FLAG, f"flag (--variant {variant})")
        values["exp"], sources["exp"] = variant, by_variant
        for name, value in paper_preset_fields(variant).items():
            pick(name, value, by_variant)
        pick("n_kv_head", None, DEFAULT)
    else:
        attn, kv = VARIANTS[variant]
        by_variant = Source(Origin.FLAG, f"flag (--variant {variant})")
        values["attn"], sources["attn"] = attn, by_variant if req.variant else DEFAULT
        pick("n_kv_head", kv, by_variant if kv is not None else DEFAULT)
    pick("device", "cuda" if tier.is_gpu else "cpu", t)
    micro = pick("batch_size", tier.micro_batch, t)
    check_number("batch_size", micro)  # before it divides the global batch; validate() checks the rest
    global_batch = req.global_batch or tier.global_batch
    if global_batch <= 0:
        raise UserError(f"--global-batch must be a positive integer, got {global_batch}")
    accum = pick("grad_accum", max(1, math.ceil(global_batch / (micro * req.nproc))),
                 derived(f"{global_batch} sequences per step / ({micro} x {req.nproc} proc)"))
    if sources["grad_accum"].kind is Origin.DERIVED and micro * accum * req.nproc != global_batch:
        warnings.append(f"{global_batch} sequences per step is not a multiple of micro-batch {micro} x "
                        f"{req.nproc} processes; using {micro * accum * req.nproc}")
    pick("grad_checkpoint", tier.grad_checkpoint, t)
    pick("compile", tier.compile, t)
    if gpu is not None and tier.is_gpu and gpu.has_float8:
        pick("float8", True, Source(Origin.HARDWARE, f"gpu: {gpu.name} has float8 tensor cores (sm_89+)"))
    else:
        pick("float8", False, DEFAULT)
    if not tier.is_gpu and not cpu_has_fast_bf16():
        amp = pick("amp", False, Source(Origin.HARDWARE, "cpu: no native bf16 (AVX2, or AVX-512 without BF16): "
                                                          "bf16 autocast is emulated, ~4-20x slower than fp32"))
    else:
        amp = pick("amp", True, DEFAULT)
    if gpu is not None and tier.is_gpu and not gpu.has_bf16:
        amp_dtype = pick("amp_dtype", "fp16", Source(Origin.HARDWARE, f"gpu: {gpu.name} has no bf16"))
    else:
        amp_dtype = pick("amp_dtype", "bf16", DEFAULT)
    if pick("param_dtype", tier.param_dtype, t) == "bf16" and amp and amp_dtype == "fp16" \
            and sources["param_dtype"].kind is not Origin.FLAG:
        values["param_dtype"] = "fp32"
        sources["param_dtype"] = Source(Origin.HARDWARE, "fp16 autocast needs fp32 weights (GradScaler)")
    for f in fields(TrainConfig):  # model overrides: only what was given (None keeps the preset's value)
        if f.metadata["group"] == "model" and f.name not in values:
            pick(f.name, f.default, DEFAULT)
    partial = TrainConfig(**values)
    mcfg = model_config_from(partial, data_vocab or DEFAULT_VOCAB)
    if "vocab_size" not in req.flags:
        sources["vocab_size"] = (Source(Origin.DATA) if data_vocab
                                 else Source(Origin.DEFAULT, f"default: {DEFAULT_VOCAB} (GPT-2), no data to read"))

    block = mcfg.block_size
    seq_len = pick("train_seq_len", None, DEFAULT)
    if seq_len is not None and not 0 < seq_len <= block:
        raise UserError(f"--train-seq-len {seq_len} must be in 1..{block} (the model's block size); "
                        f"raise --block-size or lower --train-seq-len")
    tier_schedule = "" if "train_seq_len" in req.flags else tier.seq_schedule(block)
    schedule = pick("seq_schedule", tier_schedule, t if tier_schedule else DEFAULT)
    points = parse_seq_schedule(schedule, seq_len or block, block)

    _resolve_steps(req, tier, mcfg, points, micro * accum * req.nproc, values, sources)
    opt = pick("optimizer", tier.optimizer, tier_source(tier, OPTIMIZER_WHY[tier.optimizer])
               if tier.optimizer in OPTIMIZER_WHY else DEFAULT)
    size = values["size"]
    lr = pick("lr", default_lr(size, opt),
              Source(Origin.DEFAULT, f"default for {size} {opt}: {default_lr_source(size, opt)}"))
    pick("beta2", DEFAULT_BETA2[opt], Source(Origin.DEFAULT, f"default for {opt}"))
    peak = lr if lr is not None else default_lr(size, opt)  # None (a resumed trainer-only run): its default
    pick("min_lr", float(f"{default_min_lr(peak):.6g}"), Source(Origin.DEFAULT, "default: lr / 10"))
    pick("warmup_steps", default_warmup_steps(values["steps"]), Source(Origin.DEFAULT, f"default: {LAUNCHER_WARMUP}"))
    every = pick("eval_every", TrainConfig.eval_every, DEFAULT)
    # Diagnostics with every eval: on the bench they cost well under 2 % of training time at this cadence
    # (bench/diagnostics.py). FSDP cannot run them (rank 0 alone), so they stay off there.
    fsdp = req.flags.get("fsdp", adopted.get("fsdp", False))
    pick("analysis_every", 0 if fsdp else every,
         Source(Origin.DEFAULT, "default: off under --fsdp" if fsdp else "default: with every eval"))
    for f in fields(TrainConfig):
        if f.name not in values:
            pick(f.name, f.default, DEFAULT)
    # A policy the user gave needs checkpointing they gave: the planner may turn a tier's checkpointing off.
    check_checkpoint_policy(values["checkpoint_policy"],
                            values["grad_checkpoint"] and not sources["grad_checkpoint"].planner_chose)
    validate(TrainConfig(**values))
    return Resolved(values, sources, mcfg, points, warnings, req.nproc)


def reference_model(mcfg: ModelConfig) -> ModelConfig:
    """The comparison group's reference: the plain baseline (no attention options) with `mcfg`'s shape."""
    return dataclasses.replace(mcfg, attn="baseline", n_kv_head=None, tie_qk=False, null_attn=False,
                               learned_temp=False)


def _resolve_steps(req: Request, tier: Tier, mcfg: ModelConfig, points: list[tuple[int, int]], seqs: int,
                   values: dict[str, Any], sources: dict[str, Source]) -> None:
    """--steps, or the fewest steps reaching --target-tokens / --tokens-per-param under the seq schedule."""
    given = [name for name, v in (("--steps", "steps" in req.flags), ("--target-tokens", req.target_tokens),
                                  ("--tokens-per-param", req.tokens_per_param)) if v not in (None, False)]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} both set the run length; give only one of them")
    if "steps" in req.flags:
        values["steps"], sources["steps"] = req.flags["steps"], FLAG
        check_number("steps", values["steps"])
        return
    if req.target_tokens is not None:
        target = parse_count(req.target_tokens, "--target-tokens")
        how = derived(f"fewest steps reaching --target-tokens {req.target_tokens}")
    elif req.tokens_per_param is not None:
        tpp = req.tokens_per_param
        if (finite_number(tpp) or 0) <= 0:
            raise UserError(f"--tokens-per-param must be a positive number, got {tpp}")
        target = max(1, round(tpp * mcfg.num_params()))
        how = derived(f"{tpp:g} tokens/param (flag)")
    elif tier.steps is None:
        # Every variant of one shape gets one budget, from the plain baseline of that shape: a variant with fewer
        # parameters trained on fewer tokens would lose for its budget, not its attention (compare flags that).
        reference = reference_model(mcfg)
        target = max(1, round(DEFAULT_TOKENS_PER_PARAM * reference.num_params()))
        how = derived(f"{DEFAULT_TOKENS_PER_PARAM:g} tokens/param of the plain baseline of this shape "
                      f"({reference.num_params() / 1e6:,.1f}M params), the same for every variant (default)")
    else:
        values["steps"], sources["steps"] = tier.steps, tier_source(tier)
        return
    values["steps"], sources["steps"] = steps_for_tokens(points, target, seqs), how
