"""The one TrainConfig: every trainer setting, its flag, its help. argparse flags are generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from model import PAPER_PRESETS, ModelConfig
from model.variants import ATTENTION_VARIANTS
from pretrain.config_file import FILE_FLAGS, add_file_flags, parse_with_file
from pretrain.errors import ArgumentParser, UserError
from pretrain.schedule import (
    LAUNCHER_WARMUP,
    LR_SCHEDULES,
    TRAINER_WARMUP_STEPS,
    default_min_lr,
    parse_micro_batch_schedule,
)
from pretrain.train.optim_registry import OPTIMIZERS


def _opt(default: Any, help: str, choices: Sequence[str] | None = None, group: str = "misc",
         check: str | None = None) -> Any:
    """A TrainConfig field. `check` is the allowed interval of a numeric flag, e.g. "[0,1)" or "(0,inf)"."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "check": check})


@dataclass
class TrainConfig:
    """Trainer settings. Field `foo_bar` is the flag `--foo-bar`; booleans get `--foo/--no-foo`."""

    # model: a preset plus overrides (None keeps the preset's value)
    size: str = _opt("tiny", "model preset", ["tiny", "small", "1b"], "model")
    d_model: int | None = _opt(None, "model width (overrides the preset)", group="model", check="(0,inf)")
    n_layer: int | None = _opt(None, "number of transformer blocks", group="model", check="(0,inf)")
    n_head: int | None = _opt(None, "attention heads", group="model", check="(0,inf)")
    n_kv_head: int | None = _opt(None, "key/value heads for gqa (must divide --n-head)", group="model", check="(0,inf)")
    d_ff: int | None = _opt(None, "SwiGLU hidden size", group="model", check="(0,inf)")
    block_size: int | None = _opt(None, "maximum sequence length (RoPE/context size)", group="model", check="(0,inf)")
    vocab_size: int | None = _opt(None, "vocabulary size (default: the dataset's)", group="model", check="(0,inf)")
    attn: str = _opt(
        "baseline", "attention variant: " + "; ".join(f"{v.name} = {v.summary}" for v in ATTENTION_VARIANTS.values()),
        list(ATTENTION_VARIANTS), "model"
    )
    exp: str | None = _opt(None, "the paper's configuration: sets --attn and its options (docs/paper_presets.md)",
                           list(PAPER_PRESETS), "model")
    attn_dim: int | None = _opt(None, "attention width for bottleneck/decoupled", group="model", check="(0,inf)")
    sem_dim: int | None = _opt(None, "semantic (no-RoPE) q/k width for decoupled", group="model", check="[0,inf)")
    geo_dim: int | None = _opt(None, "geometric (RoPE) q/k width for decoupled", group="model", check="[0,inf)")
    null_attn: bool = _opt(False, "learned null key/value every query may attend to", group="model")
    tie_qk: bool = _opt(False, "keys reuse the query projection", group="model")
    learned_temp: bool = _opt(False, "learned per-head attention temperature", group="model")
    init_from: str | None = _opt(None, "initialise weights from a Hugging Face Llama dir", group="model")

    # data
    data: str = _opt("", "dataset dir (manifest.json), legacy .npy, or glob of .npy shards (required)",
                     group="data")
    val_frac: float = _opt(0.0, "carve this fraction of tokens for validation when none is stored",
                           group="data", check="[0,0.5)")
    allow_data_change: bool = _opt(False, "resume although --data's content differs from the checkpoint's data",
                                   group="data")

    # batching
    batch_size: int = _opt(8, "micro-batch size (sequences per forward pass, per process)",
                           group="batch", check="(0,inf)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step", group="batch", check="(0,inf)")
    train_seq_len: int | None = _opt(None, "training sequence length (default: --block-size)",
                                     group="batch", check="(0,inf)")
    seq_schedule: str = _opt("", 'sequence-length schedule, e.g. "512@0,1024@2000"', group="batch")
    micro_batch_schedule: str = _opt("", 'micro-batch per step range, e.g. "16@0,8@500": the sequences per step '
                                     'stay --batch-size x --grad-accum, accumulation adjusts', group="batch")
    steps: int = _opt(1000, "optimizer steps in total", group="batch", check="(0,inf)")

    # optimizer
    optimizer: str = _opt("adamw", "optimizer: " + "; ".join(f"{o.name} = {o.summary}" for o in OPTIMIZERS.values()),
                          list(OPTIMIZERS), "optim")
    lr: float | None = _opt(None, "peak learning rate (default per --size and --optimizer: adamw 6e-4 tiny/small, "
                                  "3e-4 1b; lion ~6x lower; sources in docs/tiers.md)", group="optim", check="(0,inf)")
    beta1: float = _opt(0.9, "first-moment decay", group="optim", check="[0,1)")
    beta2: float | None = _opt(None, "second beta (default: 0.95 adamw, 0.99 lion)", group="optim", check="[0,1)")
    eps: float = _opt(1e-8, "adamw epsilon", group="optim", check="[0,inf)")
    weight_decay: float = _opt(0.1, "decoupled weight decay on >=2-D weights", group="optim", check="[0,inf)")
    grad_clip: float = _opt(1.0, "clip the global grad norm to this (0 disables)", group="optim", check="[0,inf)")
    opt_fused: bool = _opt(True, "fused AdamW kernel on CUDA", group="optim")

    # learning-rate schedule
    lr_schedule: str = _opt("cosine", "learning-rate schedule: " + "; ".join(
        f"{s.name} = {s.summary}" for s in LR_SCHEDULES.values()), list(LR_SCHEDULES), "schedule")
    warmup_steps: int = _opt(TRAINER_WARMUP_STEPS, f"linear warmup steps (run_1b_launch.py: {LAUNCHER_WARMUP})",
                             group="schedule", check="[0,inf)")
    min_lr: float | None = _opt(None, "final learning rate (default: lr/10)", group="schedule", check="[0,inf)")
    decay_frac: float = _opt(0.2, "wsd: fraction of steps spent decaying", group="schedule", check="(0,1]")

    # precision and speed
    param_dtype: str = _opt("fp32", "parameter dtype (bf16 uses stochastic rounding)", ["fp32", "bf16"], "prec")
    amp: bool = _opt(True, "autocast mixed precision", group="prec")
    amp_dtype: str = _opt("bf16", "autocast dtype (fp16 adds a GradScaler)", ["bf16", "fp16"], "prec")
    grad_checkpoint: bool = _opt(False, "activation checkpointing per block", group="prec")
    checkpoint_policy: str = _opt("full", "with --grad-checkpoint: full recomputes each block in backward; selective "
                                  "keeps the matmul outputs and recomputes only the elementwise ops (more memory, "
                                  "~no recomputed FLOPs)", ["full", "selective"], "prec")
    compile: bool = _opt(False, "torch.compile each block", group="prec")
    float8: bool = _opt(False, "float8 training of the block linears (torchao, as torchtitan): needs a GPU of "
                        "compute capability 8.9+ (L4, L40S, RTX 4090, H100); CPU emulates it", group="prec")
    compile_mode: str = _opt(
        "default", "torch.compile mode", ["default", "reduce-overhead", "max-autotune"], "prec"
    )
    bf16_weight_cache: bool = _opt(False, "with --grad-accum > 1: cast the fp32 block weights to the autocast dtype "
                                   "once per optimizer step instead of every micro-batch (same numbers; +2 bytes per "
                                   "parameter through the step's forwards and backwards)", group="prec")

    # eval and logging
    eval_every: int = _opt(200, "evaluate every N steps (0: only at start and end)", group="eval", check="[0,inf)")
    eval_iters: int = _opt(20, "validation batches per evaluation", group="eval", check="(0,inf)")
    eval_seq_len: int | None = _opt(None, "validation length (default: longest trained so far)",
                                    group="eval", check="(0,inf)")
    eval_seq_lens: str = _opt("", "also report val loss at these lengths with every eval, e.g. 512,1024,2048,4096 "
                              "(may exceed --block-size: RoPE extrapolation)", group="eval")
    analysis_every: int = _opt(0, "attention diagnostics on a fixed val batch every N steps (0: off)", group="eval",
                               check="[0,inf)")
    analysis_topk: int = _opt(8, "diagnostics: top-k attention mass uses the k largest probabilities of a row",
                              group="eval", check="(0,inf)")
    analysis_local_window: int = _opt(32, "diagnostics: local mass is the attention on the last N+1 keys (q-N..q)",
                                      group="eval", check="[0,inf)")
    attn_map_layers: str = _opt("", "diagnostics: save attention maps of these layers (e.g. 0,-1) to "
                                "attn_maps/step_N.npz + .png at each analysis", group="eval")
    attn_map_heads: str = _opt("0", "heads of --attn-map-layers whose maps are saved, e.g. 0,3", group="eval")
    log_every: int = _opt(10, "log a train line every N steps", group="eval", check="(0,inf)")
    sample_every: int = _opt(0, "write text samples (greedy + sampled) every N steps and at the end (0: off)",
                             group="eval", check="[0,inf)")
    sample_prompts: str | None = _opt(None, "file with one sample prompt per line (default: built-in)", group="eval")
    sample_tokens: int = _opt(48, "tokens generated per sample", group="eval", check="(0,inf)")
    sample_temperature: float = _opt(0.8, "temperature of the sampled continuation", group="eval",
                                     check="[0,inf)")
    hellaswag: str | None = _opt(None, "multiple-choice set scored at the end (and every --downstream-every): "
                                 "a jsonl of {ctx, endings, label}, or 'hf' for Rowan/hellaswag", group="eval")
    downstream_every: int = _opt(0, "score --hellaswag every N steps (0: at the end only)", group="eval",
                                 check="[0,inf)")
    downstream_items: int = _opt(500, "multiple-choice items per downstream eval (0: all)", group="eval",
                                 check="[0,inf)")

    # checkpoints and run dir
    save_every: int = _opt(500, "save last.pt every N steps (0 disables step-based saves)",
                           group="ckpt", check="[0,inf)")
    save_minutes: float = _opt(30.0, "also save every N minutes (0 disables)", group="ckpt", check="[0,inf)")
    keep_last: int = _opt(3, "numbered step_<N>.pt files to keep", group="ckpt", check="[0,inf)")
    out_dir: str = _opt("runs/default", "run directory", group="ckpt")
    resume: str = _opt("auto", "auto: continue from out-dir/last.pt if present; never; or a .pt path", group="ckpt")
    overwrite: bool = _opt(False, "allow a fresh run to replace a non-empty run dir (a run that --resume auto can "
                           "continue is resumed instead: use --resume never --overwrite)", group="ckpt")
    max_bad_steps: int = _opt(5, "stop the run after this many non-finite (skipped) steps in a row; the last "
                              "good checkpoint is kept (0: never stop)", group="ckpt", check="[0,inf)")
    mirror: str | None = _opt(None, "copy every checkpoint (+ train.jsonl, summary.md) in the background to "
                              "URL/<run name>/ (s3://, gs://, hf://, a mounted dir); an empty run dir resumes from "
                              "it", group="ckpt")
    seed: int = _opt(1337, "seed for weights and data order", group="ckpt", check="[0,4294967296)")
    device: str = _opt("auto", "device", ["auto", "cuda", "cpu", "mps"], "ckpt")

    # distributed (torchrun)
    fsdp: bool = _opt(False, "shard with FSDP2 under torchrun (default DDP)", group="dist")
    cpu_offload: bool = _opt(False, "FSDP2 CPU offload of parameters", group="dist")

    # tracking
    wandb: bool = _opt(False, "log to Weights & Biases", group="track")
    wandb_project: str | None = _opt(None, "wandb project (default: $WANDB_PROJECT, else pretrain-1b)",
                                     group="track")
    wandb_entity: str | None = _opt(None, "wandb entity (default: $WANDB_ENTITY, else your wandb default)",
                                    group="track")
    wandb_name: str | None = _opt(None, "wandb run name (default: run dir name)", group="track")
    wandb_group: str | None = _opt(None, "wandb group", group="track")
    wandb_tags: str | None = _opt(None, "comma-separated wandb tags", group="track")
    wandb_mode: str | None = _opt(None, "wandb mode", ["online", "offline", "disabled"], "track")
    wandb_id: str | None = _opt(None, "wandb run id to continue", group="track")
    live: str = _opt("auto", "console view", ["auto", "rich", "basic", "off"], "track")
    tb: bool = _opt(False, "also write TensorBoard event files", group="track")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Settings that may change when a run resumes; anything else changing means a different experiment.
RESUMABLE_CHANGES = frozenset(
    {
        "steps", "eval_every", "eval_iters", "eval_seq_lens", "analysis_every", "log_every",
        "analysis_topk", "analysis_local_window", "attn_map_layers", "attn_map_heads", "save_every",
        "save_minutes", "keep_last",
        "resume", "overwrite", "max_bad_steps", "device", "live", "tb", "compile", "compile_mode", "float8",
        "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_group", "wandb_tags", "wandb_mode",
        "wandb_id", "opt_fused", "out_dir", "data", "allow_data_change", "cpu_offload", "grad_checkpoint",
        "checkpoint_policy",
        "init_from", "sample_every", "sample_prompts", "sample_tokens", "sample_temperature", "hellaswag",
        "downstream_every", "downstream_items", "mirror",
        "bf16_weight_cache",
    }
)


def resolved_values(values: dict[str, Any], vocab_size: int | None = None) -> dict[str, Any]:
    """A TrainConfig dict with each None default replaced by the value the trainer uses for it.

    `--lr 6e-4` on a size whose default is 6e-4 is the same run as no --lr; likewise --beta2, --min-lr (lr/10),
    --train-seq-len (--block-size) and the model overrides (--n-kv-head, --d-model, ...: the preset's or derived
    value). `vocab_size` stands in for the dataset's vocabulary when the dict leaves it None.
    """
    from pretrain.train.optim import DEFAULT_BETA2, default_lr  # lazy: optim imports this module

    out = dict(values)
    cfg = TrainConfig.from_dict(values)
    try:
        lr = cfg.lr if cfg.lr is not None else default_lr(cfg.size, cfg.optimizer)
        out.update(lr=lr, beta2=cfg.beta2 if cfg.beta2 is not None else DEFAULT_BETA2[cfg.optimizer],
                   min_lr=cfg.min_lr if cfg.min_lr is not None else default_min_lr(lr))
        m = model_config_from(cfg, vocab_size or cfg.vocab_size or ModelConfig().vocab_size)
    except (KeyError, UserError):  # a config of an older or damaged run: compare it as written
        return out
    out.update(d_model=m.d_model, n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head, d_ff=m.d_ff,
               block_size=m.block_size, attn_dim=m.attn_dim, sem_dim=m.sem_dim, geo_dim=m.geo_dim,
               vocab_size=m.vocab_size, train_seq_len=cfg.train_seq_len or m.block_size)
    out["exp"] = None  # --exp only names the attention fields it sets, and those are compared themselves
    return out


def _same_value(a: Any, b: Any) -> bool:
    # Floats written differently (6e-5 typed, 6e-4 / 10 computed) are the same setting.
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def config_differences(saved: dict[str, Any], current: TrainConfig, vocab_size: int | None = None) -> list[str]:
    """Changes between a checkpoint's config and the current one that resuming cannot allow, compared as
    resolved values (see resolved_values): writing a default out explicitly is no change. A value written the
    same on both sides is not listed: it only resolves differently through another change that is."""
    raw = current.to_dict()
    old, now = resolved_values(saved, vocab_size), resolved_values(raw, vocab_size)
    return [
        f"{k}: {old.get(k)!r} -> {now[k]!r}"
        for k in now
        if k not in RESUMABLE_CHANGES and k in saved and saved[k] != raw[k] and not _same_value(old[k], now[k])
    ]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_args(name: str, value: Any) -> list[str]:
    """How a field's value is written on the command line: [--tie-qk], [--no-tie-qk], [--attn, decoupled]."""
    if isinstance(value, bool):
        return [flag_name(name) if value else "--no-" + name.replace("_", "-")]
    return [flag_name(name), str(value)]


def _flag_text(name: str, value: Any) -> str:
    return " ".join(flag_args(name, value))


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


_PRESET_FIELDS = ("d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "block_size")
# Earlier spellings of flags renamed to ModelConfig's words, still accepted (commands written before 0.1).
FORMER_FLAGS = {"n_layer": "--layers", "block_size": "--block", "n_kv_head": "--kv-head", "attn": "--attn-mode"}


def _help_with_default(name: str, help: str, default: Any) -> str:
    # A help that names its default (or says "required") already keeps its own words.
    if "default" in help or "required" in help:
        return help
    if default is None:
        return f"{help} (default: from --size)" if name in _PRESET_FIELDS else help
    shown = ("on" if default else "off") if isinstance(default, bool) else (default if default != "" else "none")
    return f"{help} (default: {shown})".replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, show_defaults: bool = True) -> None:
    """Add one flag per TrainConfig field, grouped as in the dataclass (help shows each default)."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        g = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        tp = _base_type(hints[f.name])
        help = _help_with_default(f.name, meta["help"], f.default) if show_defaults else meta["help"].replace("%", "%%")
        if tp is bool:
            g.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=help)
        else:
            g.add_argument(flag_name(f.name), *FORMER_FLAGS.get(f.name, '').split(), dest=f.name, type=tp,
                           default=f.default,
                           choices=meta["choices"], help=help, metavar=None if meta["choices"] else
                           f.name.upper())


def build_parser(prog: str = "train_v29.py") -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Pretrain a decoder LM on a token dataset.",
                            epilog="Exit codes: 0 finished (or nothing to do), 2 a user error, 75 stopped by a signal "
                            "before the end with its last step saved: rerun the same command to resume.")
    add_config_flags(parser)
    add_file_flags(parser, "the resolved settings (those the run dir's config.toml holds)")
    return parser


def paper_preset_fields(exp: str) -> dict[str, Any]:
    """TrainConfig fields an --exp name sets: the ModelConfig fields of PAPER_PRESETS (the same names)."""
    return dict(PAPER_PRESETS[exp])


def parse_config(argv: Sequence[str] | None = None, prog: str = "train_v29.py") -> TrainConfig:
    parser = build_parser(prog)
    ns = parse_with_file(parser, argv)
    if ns.exp:
        # The preset becomes the defaults, so a flag given explicitly still shows (and validate refuses it).
        parser.set_defaults(**paper_preset_fields(ns.exp))
        ns = parse_with_file(parser, argv)  # a --config file's values stay over the preset's, like flags
    cfg = TrainConfig(**{k: v for k, v in vars(ns).items() if k not in FILE_FLAGS})
    validate(cfg)
    return cfg


def in_interval(value: float, interval: str) -> bool:
    """`value` lies in `interval`, written "[lo,hi)" / "(lo,inf)" etc.; NaN lies in none."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return math.isfinite(value) and above and below


def check_number(name: str, value: Any) -> None:
    """One TrainConfig field's value against the interval declared next to the field (UserError if outside)."""
    interval = TrainConfig.__dataclass_fields__[name].metadata["check"]
    if interval is None or value is None or isinstance(value, bool):
        return
    if not in_interval(value, interval):
        lo, hi = interval[1:-1].split(",")
        want = (f"> {lo}" if interval[0] == "(" else f">= {lo}") if hi == "inf" else f"in {interval}"
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise UserError(f"{flag_name(name)} must be {kind} {want}, got {value}")


def check_numbers(cfg: TrainConfig) -> None:
    """Every numeric flag against the interval declared next to its field: NaN, inf, negatives refused."""
    for f in fields(TrainConfig):
        check_number(f.name, getattr(cfg, f.name))


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, before anything is built or written."""
    check_numbers(cfg)
    if cfg.amp_dtype == "fp16" and cfg.param_dtype == "bf16":
        raise UserError("--amp-dtype fp16 needs fp32 weights for its GradScaler: use --param-dtype fp32")
    OPTIMIZERS[cfg.optimizer].check_available()
    if cfg.fsdp and cfg.optimizer == "adamw8bit":  # its 8-bit state slices plain tensors; FSDP2's are DTensors
        raise UserError("--optimizer adamw8bit does not support --fsdp: use DDP (drop --fsdp) or --optimizer adamw")
    if cfg.cpu_offload and not cfg.fsdp:
        raise UserError("--cpu-offload needs --fsdp (it offloads FSDP2's sharded parameters); add --fsdp")
    if cfg.fsdp and cfg.param_dtype == "bf16":
        # optim.py's stochastic rounding reinterprets plain tensors' bits; FSDP2's parameters are DTensors.
        raise UserError("--fsdp needs fp32 parameters: drop --param-dtype bf16 (with --amp, FSDP2 already "
                        "all-gathers and computes in bf16)")
    if cfg.fsdp and cfg.amp and cfg.amp_dtype == "fp16":
        # GradScaler would judge inf/nan on each rank's gradient shard alone and skip steps on some ranks only.
        raise UserError("--fsdp does not support --amp-dtype fp16: use --amp-dtype bf16, or DDP (drop --fsdp)")
    if cfg.bf16_weight_cache and (not cfg.amp or cfg.param_dtype != "fp32" or cfg.fsdp or cfg.float8):
        why = ("there is no autocast to cast for (--no-amp)" if not cfg.amp else
               "the weights are bf16 already" if cfg.param_dtype != "fp32" else
               "FSDP2 all-gathers the weights in the autocast dtype itself" if cfg.fsdp else
               "float8 casts the block weights itself")
        raise UserError(f"--bf16-weight-cache has nothing to cache: {why}; drop --bf16-weight-cache")
    if cfg.eval_seq_lens:
        from pretrain.evals.lengths import parse_eval_lengths  # lazy: config stays cheap to import

        parse_eval_lengths(cfg.eval_seq_lens)
    if cfg.fsdp and (cfg.analysis_every or cfg.eval_seq_lens):
        raise UserError("--analysis-every and --eval-seq-lens run on rank 0 alone, which FSDP's sharded weights "
                        "do not allow: drop them, or train with DDP (without --fsdp)")
    if cfg.exp:
        preset = paper_preset_fields(cfg.exp)
        clash = [_flag_text(k, getattr(cfg, k)) for k, v in preset.items() if getattr(cfg, k) != v]
        if clash:
            wanted = " ".join(_flag_text(k, v) for k, v in preset.items())
            raise UserError(f"{cfg.exp} means {wanted}, but {', '.join(clash)} was given; drop "
                            f"{', '.join(clash)}, or set the attention flags yourself instead of {cfg.exp}")
    parse_micro_batch_schedule(cfg.micro_batch_schedule, cfg.batch_size * cfg.grad_accum)
    if cfg.sample_prompts and not os.path.isfile(cfg.sample_prompts):
        raise UserError(f"--sample-prompts {cfg.sample_prompts}: no such file; pass a text file with one prompt "
                        "per line, or drop the flag for the built-in prompts")
    if cfg.downstream_every and not cfg.hellaswag:
        raise UserError("--downstream-every needs --hellaswag PATH (a jsonl of {ctx, endings, label}) or 'hf'")
    if cfg.hellaswag and cfg.hellaswag != "hf" and not os.path.isfile(cfg.hellaswag):
        raise UserError(f"--hellaswag {cfg.hellaswag}: no such file; pass a jsonl of {{ctx, endings, label}} "
                        "items, or 'hf' to download HellaSwag")
    if cfg.resume not in ("auto", "never") and not cfg.resume.endswith(".pt"):
        raise UserError(f"--resume takes auto, never or a .pt path, got {cfg.resume!r}")


def format_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def model_config_from(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The network `cfg` asks for: the preset, then every override given on the command line."""
    overrides = {
        "d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
        "d_ff": cfg.d_ff, "block_size": cfg.block_size, "attn_dim": cfg.attn_dim, "sem_dim": cfg.sem_dim,
        "geo_dim": cfg.geo_dim,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    given |= {"vocab_size": cfg.vocab_size or vocab_size, "attn": cfg.attn, "null_attn": cfg.null_attn,
              "tie_qk": cfg.tie_qk, "learned_temp": cfg.learned_temp}
    try:
        return ModelConfig.from_preset(cfg.size, **given)
    except ValueError as e:
        raise UserError(f"invalid model settings: {e}") from None
