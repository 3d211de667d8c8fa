"""What is done with TrainConfig (pretrain/train/config_fields.py, its fields): argparse flags generated from them,
the rules across fields (validate), the resume comparison, and the network a config asks for.

Every name of the trainer's settings is imported from here, the fields' module included (TrainConfig, flag_name,
flag_args, check_number, in_interval).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from model import PAPER_PRESETS, ModelConfig
from pretrain.config_file import FILE_FLAGS, add_file_flags, parse_with_file
from pretrain.errors import ArgumentParser, UserError
from pretrain.schedule import default_min_lr, parse_micro_batch_schedule
from pretrain.train.config_fields import (  # noqa: F401 (in_interval, check_number: imported from here too)
    TrainConfig,
    check_number,
    check_numbers,
    flag_args,
    flag_name,
    in_interval,
)
from pretrain.train.optim_registry import OPTIMIZERS

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

def check_checkpoint_policy(policy: str, grad_checkpoint: bool) -> None:
    """A policy other than the default means nothing without checkpointing: refused rather than ignored."""
    if policy != TrainConfig.checkpoint_policy and not grad_checkpoint:
        raise UserError(f"--checkpoint-policy {policy} needs --grad-checkpoint (it says what checkpointing "
                        "recomputes): add --grad-checkpoint, or drop --checkpoint-policy")


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, before anything is built or written."""
    check_numbers(cfg)
    if cfg.amp_dtype == "fp16" and cfg.param_dtype == "bf16":
        raise UserError("--amp-dtype fp16 needs fp32 weights for its GradScaler: use --param-dtype fp32")
    OPTIMIZERS[cfg.optimizer].check_available()
    if cfg.fsdp and cfg.optimizer == "adamw8bit":  # its 8-bit state slices plain tensors; FSDP2's are DTensors
        raise UserError("--optimizer adamw8bit does not support --fsdp: use DDP (drop --fsdp) or --optimizer adamw")
    check_checkpoint_policy(cfg.checkpoint_policy, cfg.grad_checkpoint)
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
