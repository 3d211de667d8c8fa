"""Run-dir policy and checkpoint state: fresh or resumed start, what a checkpoint holds, restoring it."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import UserError
from pretrain.track.runlog import JSONL_NAME, read_jsonl
from pretrain.train.checkpoint import CheckpointManager, checkpoint_paths, load_checkpoint
from pretrain.train.config import TrainConfig, config_differences
from pretrain.train.run_dir import has_run

# --overwrite with --resume auto: rerunning a command after a preemption must continue its run, never wipe it.
OVERWRITE_IGNORED = ("--overwrite is ignored: {} holds a run that --resume auto continues (a rerun after a "
                     "preemption must never wipe it); to replace it, pass --resume never --overwrite")


@dataclass
class StartPoint:
    """Where training starts: a fresh run (state None) or a checkpoint's state.

    `clear`: a fresh start that must first remove a previous trainer's files (done by the caller, once it
    holds the run-dir lock and every check has passed, so a refused command changes nothing).
    `abandon`: an explicit --resume of a checkpoint older than the run dir's newest is a rollback; these are
    the newer checkpoints, which the caller sets aside (run_dir.set_branch_aside) at the same moment.
    """

    state: dict[str, Any] | None
    path: Path | None = None
    clear: bool = False
    note: str = ""
    abandon: list[Path] = field(default_factory=list)  # a rollback: checkpoints of the branch it leaves

    @property
    def resumed(self) -> bool:
        return self.state is not None


def _restartable(run_dir: Path, cfg: TrainConfig) -> bool:
    """A log but no checkpoint file of this same command: a run stopped before its first save. Nothing of it
    can be resumed, so starting it again is what rerunning the command means."""
    paths = checkpoint_paths(run_dir)
    if paths["last"] or paths["best"] or paths["numbered"]:
        return False
    meta = next((r for r in read_jsonl(run_dir / JSONL_NAME) if r.get("type") == "meta"), None)
    saved = meta.get("train_config") if meta else None
    return not isinstance(saved, dict) or not config_differences(saved, cfg)


def find_start(cfg: TrainConfig, ckpt: CheckpointManager,
               check: Callable[[dict, Path], str | None] | None = None) -> StartPoint:
    """Apply --resume and --overwrite: pick the checkpoint to continue from, or allow a fresh start.

    Writes nothing. A fresh start into a run dir that already holds a run is refused unless --overwrite (or
    the run stopped before its first checkpoint), so a typo in a command never destroys a run. `check` is
    CheckpointManager.find_resume's.
    """
    run_dir = Path(cfg.out_dir)
    if cfg.resume not in ("auto", "never"):
        path = Path(cfg.resume)
        if not path.is_file():
            raise UserError(f"--resume {cfg.resume}: no such checkpoint file; use --resume auto or a valid .pt path")
        state = load_checkpoint(path)
        why = check(state, path) if check else None
        if why:
            raise UserError(f"cannot resume from {path}: {why}; pass another checkpoint or --resume auto")
        return StartPoint(state, path, abandon=saved_after(run_dir, state["step"]))
    if cfg.resume == "auto":
        found = ckpt.find_resume(check)
        if found is not None:
            return StartPoint(found[1], found[0], note=OVERWRITE_IGNORED.format(run_dir) if cfg.overwrite else "")
    if has_run(run_dir):
        if cfg.overwrite:
            return StartPoint(None, clear=True)
        if cfg.resume == "auto" and _restartable(run_dir, cfg):
            return StartPoint(None, clear=True, note=f"{run_dir} holds a log but no checkpoint (it stopped before "
                              "its first save): starting it afresh, the log is restarted")
        why = "--resume never was given" if cfg.resume == "never" else "it holds no loadable checkpoint"
        raise UserError(
            f"{run_dir} already holds a run and {why}; pass --overwrite to replace it, "
            f"or choose another --out-dir"
        )
    return StartPoint(None)


def saved_step(path: Path, numbered: list[Path]) -> int | None:
    """The step a checkpoint file holds, without reading its tensors: the step_<N>.pt it is a hard link of
    (how last.pt and best.pt are written), else its `step` through mmap. None when it is unreadable."""
    try:  # before the run-dir lock: another trainer may be pruning these files right now
        for p in numbered:
            if p.samefile(path):
                return int(p.stem.split("_", 1)[1])
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:  # noqa: BLE001 - damaged or not a checkpoint: not a step anyone can resume from
        return None
    return step if isinstance(step, int) else None


def saved_after(run_dir: Path, step: int) -> list[Path]:
    """Checkpoint files of `run_dir` holding a step past `step`: the branch a resume from `step` abandons."""
    paths = checkpoint_paths(run_dir)
    newer = [p for p in paths["numbered"] if int(p.stem.split("_", 1)[1]) > step]
    for p in (paths["last"], paths["best"]):
        if p is not None and (s := saved_step(p, paths["numbered"])) is not None and s > step:
            newer.append(p)
    return newer


def check_compatible(saved_cfg: dict[str, Any], cfg: TrainConfig, path: Path | None,
                     vocab_size: int | None = None) -> None:
    diffs = config_differences(saved_cfg, cfg, vocab_size)
    if diffs:
        raise UserError(
            f"cannot resume from {path}: settings differ from the checkpoint ({'; '.join(diffs)}); "
            f"use the original settings, or a new --out-dir (or --resume never --overwrite) to start afresh"
        )


def batch_split_change(state: dict[str, Any], cfg: TrainConfig, world_size: int) -> dict[str, list[int]] | None:
    """How a resume re-splits the global batch, {"batch_size": [before, now], "grad_accum": [...],
    "world_size": [...]}, or None when it does not. The resume check already holds the product equal."""
    saved = state["train_config"]
    before = (saved.get("batch_size", cfg.batch_size), saved.get("grad_accum", cfg.grad_accum),
              state["world_size"])
    now = (cfg.batch_size, cfg.grad_accum, world_size)
    if before == now:
        return None
    return {k: [int(a), int(b)] for k, a, b in zip(("batch_size", "grad_accum", "world_size"), before, now)}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: get_rng_state_all() would create a context on every visible GPU.
        state["cuda_device"] = torch.cuda.current_device()
        state["cuda"] = [torch.cuda.get_rng_state()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": 0,
            "gauss": 0.0,
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # this rank's device, saved by this rank
        torch.cuda.set_rng_state(state["cuda"][0])


def rng_for_rank(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The RNG state this rank saved. Each rank (its own CUDA device) advances its own generators, so rank 0's
    state restored everywhere would set rank 1's device to whatever rank 0 knew of it. A checkpoint from
    another world size gives each rank rank 0's state."""
    ranks = state.get("rng_ranks")
    if ranks and len(ranks) == world_size:
        return ranks[rank]
    return state["rng"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

