"""A trained run as something to evaluate: its checkpoint's model (any variant) and its tokenizer's codec.

Checkpoints hold the ModelConfig, so every variant rebuilds without knowing the flags it was trained with.
The tokenizer comes from the run's dataset (the manifest names it) or, when the data has moved, from the
vocabulary size (256 = bytes, 50257 = GPT-2); `tokenizer` overrides both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from pretrain.cli import UserError
from pretrain.evals.samples import TextCodec, text_codec
from pretrain.train.checkpoint import checkpoint_paths, load_checkpoint

_BY_VOCAB = {256: "bytes", 50257: "gpt2"}


def find_checkpoint(run_dir: Path, which: str = "auto") -> Path:
    """auto: best.pt, else last.pt, else the newest step_<N>.pt; best / last; or a .pt path."""
    if which not in ("auto", "best", "last"):
        path = Path(which)
        if not path.is_file():
            raise UserError(f"--checkpoint {which}: no such file; use auto, best, last or a .pt path")
        return path
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory; pass runs/<name> as written by train_v29.py")
    found = checkpoint_paths(run_dir)
    order = {"auto": [found["best"], found["last"], *reversed(found["numbered"])],
             "best": [found["best"]], "last": [found["last"]]}[which]
    for p in order:
        if p is not None:
            return p
    what = "no checkpoint (best.pt, last.pt, step_<N>.pt)" if which == "auto" else f"no {which}.pt"
    raise UserError(f"{run_dir} holds {what}; train the run first (its first save writes one), "
                    "or pass --checkpoint with another choice")


def _tokenizer_name(train_config: dict[str, Any], vocab_size: int) -> str | None:
    try:
        from pretrain.data.dataset import open_dataset

        return open_dataset(train_config.get("data", ""), train_config.get("val_frac", 0.0)).tokenizer
    except Exception:  # noqa: BLE001 - the data may have moved; fall back to the vocabulary
        return _BY_VOCAB.get(vocab_size)


def load_run_model(run_dir: Path, which: str = "auto", device: torch.device | str = "cpu",
                   tokenizer: str | None = None) -> tuple[GPT, TextCodec, dict[str, Any]]:
    """(model in eval mode on `device`, codec, {"path", "step", "model_config"}) of a run's checkpoint."""
    path = find_checkpoint(run_dir, which)
    state = load_checkpoint(path)
    if "model" not in state or "model_config" not in state:
        raise UserError(f"{path} is not a train_v29.py checkpoint (no model / model_config)")
    mcfg = ModelConfig.from_dict(state["model_config"])
    model = GPT(mcfg)
    weights = {k.replace("_orig_mod.", ""): v for k, v in state["model"].items()}
    model.load_state_dict(weights)
    model.to(device).eval()
    name = tokenizer or _tokenizer_name(state.get("train_config", {}), mcfg.vocab_size)
    if name is None:
        raise UserError(f"cannot tell which tokenizer {path} was trained with (its dataset is gone and vocab "
                        f"{mcfg.vocab_size} is not a known one); pass --tokenizer NAME")
    return model, text_codec(name, mcfg.vocab_size), {"path": str(path), "step": state.get("step"),
                                                      "model_config": mcfg.to_dict()}
