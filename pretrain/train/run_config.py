"""The trainer's settings as a file: `--print-config`, and the run dir's config.toml that `--config` feeds back.

Both are TrainConfig's values as the trainer resolves them (config.resolved_values: --lr, --min-lr, the model's
widths filled in), grouped as the flags are, so the file names the whole run and feeding it back gives the
same run. Torch-free, so `--print-config` answers at once.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from pretrain.config_file import CONFIG_NAME, toml_text
from pretrain.fsio import atomic_write_text
from pretrain.train.config import TrainConfig, resolved_values

# Replacing a run must be asked for on the command line each time, never by a file fed back.
NOT_WRITTEN = frozenset({"overwrite"})
HEADER = ("Settings of this run, resolved (defaults filled in); keys are the trainer's flag names.\n"
          "Feed it back with --config FILE (flags given with it override it).")


def resolved_sections(cfg: TrainConfig, vocab_size: int | None) -> dict[str, dict[str, Any]]:
    """The resolved settings by flag group. Without `vocab_size` (no dataset read) vocab_size stays as given."""
    values = resolved_values(cfg.to_dict(), vocab_size)
    if vocab_size is None:
        values["vocab_size"] = cfg.vocab_size
    sections: dict[str, dict[str, Any]] = {}
    for f in fields(TrainConfig):
        if f.name not in NOT_WRITTEN:
            sections.setdefault(f.metadata["group"], {})[f.name] = values[f.name]
    return sections


def config_text(cfg: TrainConfig, vocab_size: int | None) -> str:
    return toml_text(resolved_sections(cfg, vocab_size), HEADER)


def write_run_config(run_dir: Path, cfg: TrainConfig, vocab_size: int) -> Path:
    """Write (replace) the run dir's config.toml: the settings this start of the run uses."""
    path = Path(run_dir) / CONFIG_NAME
    atomic_write_text(path, config_text(cfg, vocab_size))
    return path


def dataset_vocab(cfg: TrainConfig) -> int | None:
    """The vocabulary of --data when it can be read (None otherwise: --print-config then leaves it unresolved)."""
    if not cfg.data:
        return None
    from pretrain.data.dataset import open_dataset  # lazy: numpy, only for --print-config with --data
    from pretrain.errors import UserError

    try:
        return open_dataset(cfg.data, cfg.val_frac, require_val=False, vocab_size=cfg.vocab_size).vocab_size
    except (UserError, OSError):
        return None
