"""The one TrainConfig: every trainer setting, the flag that spells it, its help and its declared range.

What the settings mean lives here; pretrain/train/config.py generates the argparse flags from these fields and holds
the rules across fields (validate), the resume comparison and the network a config asks for. Import from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from model import PAPER_PRESETS
from model.variants import ATTENTION_VARIANTS
from pretrain.errors import UserError
from pretrain.schedule import LAUNCHER_WARMUP, LR_SCHEDULES, TRAINER_WARMUP_STEPS
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


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_args(name: str, value: Any) -> list[str]:
    """How a field's value is written on the command line: [--tie-qk], [--no-tie-qk], [--attn, decoupled]."""
    if isinstance(value, bool):
        return [flag_name(name) if value else "--no-" + name.replace("_", "-")]
    return [flag_name(name), str(value)]


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
