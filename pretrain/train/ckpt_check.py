"""Can this run continue from a loaded checkpoint? There are two kinds of no.

- The file loads but is malformed (keys missing, wrong shapes, negative counters, NaN weights, an absurd
  step): like a corrupt file it is skipped, and the next older checkpoint is tried. `problem` says why.
- It is a sound checkpoint of another experiment or other data: falling back to an older file of the same
  run would be just as wrong, so `check_same_run` raises a UserError naming the difference and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from pretrain.errors import UserError
from pretrain.train.checkpoint import is_finite_state
from pretrain.train.config import TrainConfig
from pretrain.train.resume import check_compatible

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "sampler": dict, "rng": dict, "train_config": dict, "step": int,
    "tokens": int, "elapsed": (int, float), "world_size": int, "lr_horizon": int,
}


def model_shapes(mcfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight this run's model holds (built on the meta device: no memory used)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(mcfg).state_dict().items()}


def missing_part(state: dict[str, Any]) -> str | None:
    """Which part every checkpoint has is missing or of the wrong kind, or None."""
    for key, tp in _REQUIRED.items():
        if not isinstance(state.get(key), tp) or isinstance(state.get(key), bool):
            return f"'{key}' is missing or malformed"
    return None


def problem(state: dict[str, Any], shapes: dict[str, tuple[int, ...]],
            load_sampler: Callable[[dict[str, Any]], None]) -> str | None:
    """Why `state` cannot be resumed from (so the next older checkpoint should be tried), or None."""
    if why := missing_part(state):
        return why
    step, tokens = state["step"], state["tokens"]
    if step < 0 or tokens < 0:
        return f"its step ({step}) or token count ({tokens}) is negative"
    if step > tokens:  # every step trains at least one token
        return f"its step {step} is impossible after {tokens} tokens"
    weights = state["model"]
    missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or extra:
        return f"its model weights do not match this model (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, shape in shapes.items():
        t = weights[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"its weight {name} is {got}, the model needs {shape}"
    if not is_finite_state(state):
        return "its weights hold NaN/inf"
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        return "its optimizer state is malformed"
    if not all(isinstance(k, str) for k in opt["state"]):  # optimizer_state() keys it by parameter name
        return "its optimizer state is not keyed by parameter name"
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        return "its RNG state is malformed"
    sampler = state["sampler"]
    for key in ("epoch", "index", "seq_len"):
        if not isinstance(sampler.get(key), int) or sampler[key] < 0:
            return f"its sampler {key} is {sampler.get(key)!r}, not a count"
    try:
        load_sampler(sampler)
    except (UserError, KeyError, TypeError, ValueError) as e:
        return f"its sampler state is unusable ({e})"
    return None


def check_same_run(state: dict[str, Any], path: Path | None, cfg: TrainConfig, saved_cfg: dict[str, Any],
                   mcfg: ModelConfig, tokenizer: str, fingerprint: str) -> None:
    """UserError unless `state` is this experiment (settings, model, data); see the module docstring."""
    check_compatible(saved_cfg, cfg, path, mcfg.vocab_size)
    saved_model = state.get("model_config") if isinstance(state.get("model_config"), dict) else {}
    now = mcfg.to_dict()
    diffs = [f"{k} {saved_model[k]!r} -> {now[k]!r}" for k in saved_model if k in now and saved_model[k] != now[k]]
    if diffs:
        raise UserError(f"cannot resume from {path}: its model differs from the one this data gives "
                        f"({'; '.join(diffs)}; the data's tokenizer is {tokenizer}); resume on the data it was "
                        "trained on, or start a new run with another --out-dir")
    saved_fp = state.get("data_fingerprint")
    if isinstance(saved_fp, str) and saved_fp != fingerprint and not cfg.allow_data_change:
        raise UserError(f"cannot resume from {path}: --data {cfg.data} is not the data this run was trained on "
                        "(its content fingerprint differs); point --data at the original dataset, or pass "
                        "--allow-data-change to continue on this one")
