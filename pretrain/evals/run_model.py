"""A trained run as something to evaluate or ship: the one checkpoint finder and loader of generate, downstream,
export and infer_bench, giving the checkpoint's model (any variant) and its tokenizer's codec.

Checkpoints hold the ModelConfig, so every variant rebuilds without knowing the flags it was trained with.
Checkpoints hold plain parameter names (CheckpointManager.save strips torch.compile's `_orig_mod`), so nothing
here renames weights.
The tokenizer comes from the run's dataset (the manifest names it) or, when the data has moved, from the
vocabulary size (256 = bytes, 50257 = GPT-2); `tokenizer` overrides both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model import ModelConfig
from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from model import GPT
    from pretrain.evals.samples import TextCodec

# torch and what needs it are imported where used: the commands reading a run build their --help from the
# constants here and must answer it without loading torch.

_BY_VOCAB = {256: "bytes", 50257: "gpt2"}
MAX_BLOCK = 1 << 20  # longest context a checkpoint may declare (no weight is sized by it, so no other check holds)


# The one default of every command that reads a finished run (generate, downstream, export, infer_bench):
# best.pt holds the weights with the lowest validation loss, the ones worth sampling, scoring or publishing;
# a run without evals has no best.pt, so last.pt, and when even that is gone the newest step_<N>.pt.
DEFAULT_CHECKPOINT = "auto"
CHECKPOINT_HELP = ("which checkpoint: auto (default: best.pt, else last.pt, else the newest step_<N>.pt), "
                   "best, last, or a .pt path")


def find_checkpoint(run_dir: Path, which: str = DEFAULT_CHECKPOINT) -> Path:
    """auto: best.pt, else last.pt, else the newest step_<N>.pt; best / last; or a .pt path."""
    if which not in ("auto", "best", "last"):
        path = Path(which)
        if not path.is_file():
            raise UserError(f"--checkpoint {which}: no such file; use auto, best, last or a .pt path")
        return path
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory; pass runs/<name> as written by train_v29.py")
    from pretrain.train.checkpoint import checkpoint_paths

    found = checkpoint_paths(run_dir)
    order = {"auto": [found["best"], found["last"], *reversed(found["numbered"])],
             "best": [found["best"]], "last": [found["last"]]}[which]
    for p in order:
        if p is not None:
            return p
    what = "no checkpoint (best.pt, last.pt, step_<N>.pt)" if which == "auto" else f"no {which}.pt"
    raise UserError(f"{run_dir} holds {what}; train the run first (its first save writes one), "
                    "or pass --checkpoint with another choice")


def _stored_bytes(weights: dict[str, Any]) -> int:
    """Bytes the checkpoint's weight tensors really hold: each storage once (tied weights share one, and a
    crafted file could make many large-looking views, even stride-0 ones, of one tiny storage)."""
    import torch

    seen: dict[int, int] = {}
    for t in weights.values():
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def checked_model_config(state: dict[str, Any], path: Path) -> ModelConfig:
    """The checkpoint's ModelConfig, proven to describe the weights the file holds before anything is built.

    model_config is a few numbers anyone can edit: a 3 KB checkpoint describing a 100B-parameter model made
    generate allocate until the process died. Its parameter count (arithmetic only) must fit in the bytes the
    weights hold (2 bytes a parameter at least: bf16), which also bounds the layer count, so the shape check
    below (a model built on the meta device) is cheap; block_size, which sizes no weight, gets a fixed bound.
    """
    import torch

    from pretrain.train.ckpt_check import model_shapes

    weights, raw = state.get("model"), state.get("model_config")
    if not isinstance(weights, dict) or not isinstance(raw, dict):
        raise UserError(f"{path} is not a train_v29.py checkpoint (no model / model_config)")
    try:
        mcfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has a malformed model_config ({e}); use another checkpoint") from None
    need, have = mcfg.num_params(), _stored_bytes(weights)
    if 2 * need > have or mcfg.block_size > MAX_BLOCK:
        what = (f"a {need:,}-parameter model but holds {have:,} bytes of weights" if 2 * need > have
                else f"block_size {mcfg.block_size:,} (at most {MAX_BLOCK:,})")
        raise UserError(f"{path}: its model_config describes {what}; the checkpoint is damaged or was edited: "
                        "use another checkpoint (--checkpoint last / best / a step_<N>.pt)")
    shapes = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if shapes != model_shapes(mcfg):
        raise UserError(f"{path}: its weights do not have the shapes its model_config describes; the checkpoint "
                        "is damaged or was edited: use another checkpoint")
    return mcfg


def _tokenizer_name(train_config: dict[str, Any], vocab_size: int) -> str | None:
    try:
        from pretrain.data.dataset import open_dataset

        return open_dataset(train_config.get("data", ""), train_config.get("val_frac", 0.0)).tokenizer
    except Exception:  # noqa: BLE001 - the data may have moved; fall back to the vocabulary
        return _BY_VOCAB.get(vocab_size)


@dataclass
class RunCheckpoint:
    """A loaded checkpoint whose model_config the weights back (checked_model_config)."""

    path: Path
    state: dict[str, Any]
    model_config: ModelConfig

    @property
    def weights(self) -> dict[str, Any]:
        return self.state["model"]

    def model(self, device: torch.device | str = "cpu") -> GPT:
        """The checkpoint's model in eval mode on `device` (fp32 parameters; the weights are copied in)."""
        from model import GPT

        model = GPT(self.model_config)
        model.load_state_dict(self.weights)
        return model.to(device).eval()


def open_checkpoint(path: Path) -> RunCheckpoint:
    """Load `path` (weights_only) and check its model_config before anything is built from it."""
    from pretrain.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return RunCheckpoint(path, state, checked_model_config(state, path))


def load_run_checkpoint(run_dir: Path, which: str = DEFAULT_CHECKPOINT) -> RunCheckpoint:
    """The run's checkpoint chosen by `which` (see find_checkpoint), loaded and checked."""
    return open_checkpoint(find_checkpoint(run_dir, which))


def load_run_model(run_dir: Path, which: str = DEFAULT_CHECKPOINT, device: torch.device | str = "cpu",
                   tokenizer: str | None = None) -> tuple[GPT, TextCodec, dict[str, Any]]:
    """(model in eval mode on `device`, codec, {"path", "step", "model_config"}) of a run's checkpoint."""
    from pretrain.evals.samples import text_codec

    ckpt = load_run_checkpoint(run_dir, which)
    path, state, mcfg = ckpt.path, ckpt.state, ckpt.model_config
    model = ckpt.model(device)
    name = tokenizer or _tokenizer_name(state.get("train_config", {}), mcfg.vocab_size)
    if name is None:
        raise UserError(f"cannot tell which tokenizer {path} was trained with (its dataset is gone and vocab "
                        f"{mcfg.vocab_size} is not a known one); pass --tokenizer NAME")
    return model, text_codec(name, mcfg.vocab_size), {"path": str(path), "step": state.get("step"),
                                                      "model_config": mcfg.to_dict()}
