"""Everything one training run holds, built from a TrainConfig: data, model, optimizer, resume state, trackers.

`open_session` does all the checking and building; the loop in `train.py` then only steps, logs and saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from pretrain.cli import UserError
from pretrain.data.loader import Prefetcher, TrainSampler, ValWindows, open_dataset
from pretrain.llama import check_init_from, load_init_from
from pretrain.schedule import parse_micro_batch_schedule, parse_seq_schedule
from pretrain.track.console import Console
from pretrain.track.runlog import RunLog, to_metrics
from pretrain.track.tensorboard import TBWriter
from pretrain.track.wandb_run import WandbRun
from pretrain.train import device as dev
from pretrain.train import distributed as dist_lib
from pretrain.train.checkpoint import CheckpointManager
from pretrain.train.config import TrainConfig, model_config_from
from pretrain.train.optim import build_optimizer, load_rounding_rng_state, rounding_rng_state
from pretrain.train.resume import check_compatible, find_start, rng_for_rank, rng_state, seed_everything, set_rng_state


@dataclass
class Progress:
    """Counters that checkpoints carry and the loop advances."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float | None = None
    skipped_steps: int = 0


@dataclass
class Session:
    cfg: TrainConfig
    mcfg: ModelConfig
    dist: dist_lib.Dist
    device: torch.device
    run_dir: Path
    model: GPT
    wrapped: torch.nn.Module  # what forward/backward go through (DDP / FSDP2 under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Prefetcher
    val: ValWindows
    ckpt: CheckpointManager
    log: RunLog | None
    wb: WandbRun
    tb: TBWriter
    console: Console
    seq_points: list[tuple[int, int]]
    eval_seq_len: int
    resumed: bool
    info: dict[str, Any]
    prog: Progress = field(default_factory=Progress)
    micro_points: list[tuple[int, int]] = field(default_factory=list)  # --micro-batch-schedule, parsed

    @property
    def autocast(self) -> Any:
        return dev.autocast(self.device, self.cfg.amp, dev.amp_dtype(self.cfg.amp_dtype))

    @property
    def fp16(self) -> bool:
        return self.cfg.amp and self.cfg.amp_dtype == "fp16"

    def emit(self, kind: str, **fields: Any) -> None:
        """One event to train.jsonl, wandb and TensorBoard (rank 0 only)."""
        if self.log:
            self.log.event(kind, step=self.prog.step, **fields)
        metrics = to_metrics("train" if kind == "train" else "val", fields)
        self.wb.log(metrics, step=self.prog.step)
        self.tb.log(metrics, step=self.prog.step)

    def evaluate(self) -> tuple[float, bool]:
        """Mean loss over the fixed validation windows; returns (loss, is_new_best)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        with torch.no_grad(), self.autocast:
            for batch in self.val:  # each rank scores its share of the global eval batch
                x, y = (t.chunk(self.dist.world_size)[self.dist.rank].to(self.device) for t in batch)
                total += self.wrapped(x, y).float()
        self.model.train()
        loss = dist_lib.mean_across_ranks(total, self.dist).item() / max(len(self.val), 1)
        best = self.prog.best_val is None or loss < self.prog.best_val
        if best:
            self.prog.best_val = loss
        self.emit("eval", loss=loss, ppl=math.exp(min(loss, 30)), tokens=self.prog.tokens, seq_len=self.eval_seq_len)
        if self.dist.is_main:
            self.console.print(f"eval step {self.prog.step}: val loss {loss:.4f} (best {self.prog.best_val:.4f})")
        return loss, best

    def save(self, best: bool = False, data_state: dict | None = None) -> None:
        """Checkpoint the state after `prog.step` full steps (collective under FSDP: every rank calls it)."""
        p = self.prog
        rng = dist_lib.gather_from_ranks(rng_state(), self.dist)
        replicas_match = dist_lib.replicas_match(self.wrapped, self.dist)
        if not replicas_match and self.dist.is_main:
            self.console.print(f"warning: step {p.step}: the DDP replicas' weights differ; the checkpoint holds "
                               f"rank 0's. Please report this with the command line")
        state = {
            "version": 1,
            "model": dist_lib.model_state(self.model, self.dist),
            "optimizer": dist_lib.optimizer_state(self.model, self.optimizer, self.dist),
            "scaler": self.scaler.state_dict() if self.fp16 else {},
            "step": p.step, "tokens": p.tokens, "elapsed": p.elapsed, "best_val": p.best_val,
            "skipped_steps": p.skipped_steps,
            "sampler": data_state or self.loader.state_dict(),
            "rng": rng[0], "rng_ranks": rng,  # each rank's own generators (its own CUDA device)
            "rounding_rng": rounding_rng_state(self.optimizer),
            "train_config": self.cfg.to_dict(), "model_config": self.mcfg.to_dict(),
            "world_size": self.dist.world_size,
            "wandb_run_id": self.wb.run_id,
        }
        self.ckpt.save(state, p.step, best=best)
        if self.log:
            extra = {"replicas_match": replicas_match} if self.dist.enabled else {}
            self.log.event("checkpoint", step=p.step, best=best, **extra)

    def close(self) -> None:
        self.ckpt.wait()
        if self.log:
            self.log.close()
        self.wb.finish()
        self.tb.close()
        self.console.close()
        self.loader.close()
        # Release the wrapped model and optimizer before distributed.cleanup() destroys their process group.
        self.wrapped = self.model = self.optimizer = None  # type: ignore[assignment]


def open_session(cfg: TrainConfig, command: str = "") -> Session:
    """Check the settings against the data and run dir, then build (or restore) everything a run needs."""
    device = dev.resolve_device(cfg.device)
    dist = dist_lib.init_distributed(device)
    dev.setup_device(device)
    run_dir = Path(cfg.out_dir)
    ds = open_dataset(cfg.data, cfg.val_frac, vocab_size=cfg.vocab_size)
    mcfg = model_config_from(cfg, ds.vocab_size)
    ds.check_vocab(mcfg.vocab_size)
    points = parse_seq_schedule(cfg.seq_schedule, cfg.train_seq_len or mcfg.block_size, mcfg.block_size)
    eval_seq_len = min(cfg.eval_seq_len or points[-1][1], mcfg.block_size)
    micro_points = parse_micro_batch_schedule(cfg.micro_batch_schedule, cfg.batch_size * cfg.grad_accum)
    ds.check_enough(max([cfg.batch_size] + [m for _, m in micro_points]), max(p[1] for p in points), dist.world_size)
    if cfg.amp and cfg.amp_dtype == "bf16" and not dev.supports_bf16(device):
        raise UserError("this GPU has no bf16: use --amp-dtype fp16 (T4, V100) or --no-amp")

    ckpt = CheckpointManager(run_dir, keep_last=cfg.keep_last, enabled=dist.is_main)
    if cfg.init_from:
        check_init_from(cfg.init_from, mcfg)  # before find_start may clear an --overwrite run dir
    start = find_start(cfg, ckpt, dist.is_main)
    dist_lib.check_same_start(start.state["step"] if start.resumed else None, dist)
    if start.resumed:
        check_compatible(dist_lib.saved_config_for(start.state, cfg, dist, start.path), cfg, start.path)
    run_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    model = GPT(mcfg)
    model.to(device=device, dtype=torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32)
    if cfg.init_from and not start.resumed:
        load_init_from(model, cfg.init_from)
    model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.compile:
        # A card or driver that inductor cannot compile for should cost speed, not the run: dynamo then
        # logs the failure once and runs that code eagerly.
        torch._dynamo.config.suppress_errors = True
        # In place per block: parameter names keep no `_orig_mod.` and one block shape compiles once.
        for block in model.blocks:
            block.compile(mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    wrapped = dist_lib.wrap_model(model, cfg.fsdp, cfg.cpu_offload, dist, device,
                                  dev.amp_dtype(cfg.amp_dtype) if cfg.amp else None)
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == "fp16")
    sampler = TrainSampler(ds, cfg.seed, rank=dist.rank, world_size=dist.world_size)
    prog, wandb_id = Progress(), cfg.wandb_id
    if start.resumed:
        st = start.state
        dist_lib.load_model_state(model, st["model"], dist)
        dist_lib.load_optimizer_state(model, optimizer, st["optimizer"], dist)
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        sampler.load_state_dict(st["sampler"])
        set_rng_state(rng_for_rank(st, dist.rank, dist.world_size))
        # After the optimizer state: loading it runs one zero-LR step that draws rounding noise.
        load_rounding_rng_state(optimizer, st.get("rounding_rng"))
        prog = Progress(st["step"], st["tokens"], st["elapsed"], st.get("best_val"), st.get("skipped_steps", 0))
        wandb_id = wandb_id or st.get("wandb_run_id")

    info = {"command": command, "train_config": cfg.to_dict(), "model_config": mcfg.to_dict(),
            "params": mcfg.num_params(), "non_embedding_params": mcfg.num_params(non_embedding=True),
            "device": str(device), "world_size": dist.world_size}
    main = dist.is_main
    console = Console(cfg.live if main else "off", total_steps=cfg.steps, start_step=prog.step)
    log = RunLog(run_dir, resume_step=prog.step if start.resumed else None) if main else None
    if log and not start.resumed:
        log.event("meta", **info, dataset={"path": cfg.data, "train_tokens": ds.train_tokens,
                                           "val_tokens": ds.val_tokens})
    if main and start.resumed:
        console.print(f"resuming from {start.path} at step {prog.step}")
    wb = WandbRun(run_dir, info, enabled=cfg.wandb and main, project=cfg.wandb_project, entity=cfg.wandb_entity,
                  name=cfg.wandb_name or run_dir.name, group=cfg.wandb_group,
                  tags=cfg.wandb_tags.split(",") if cfg.wandb_tags else None, mode=cfg.wandb_mode,
                  run_id=wandb_id, fresh=not start.resumed, warn=console.print)
    tb = TBWriter(run_dir, enabled=cfg.tb and main, purge_step=prog.step + 1 if start.resumed else None)
    val = ValWindows(ds, eval_seq_len, cfg.batch_size * dist.world_size, cfg.eval_iters)  # split across ranks
    return Session(cfg=cfg, mcfg=mcfg, dist=dist, device=device, run_dir=run_dir, model=model, wrapped=wrapped,
                   optimizer=optimizer, scaler=scaler, loader=Prefetcher(sampler, device),
                   val=val, ckpt=ckpt, log=log, wb=wb,
                   tb=tb, console=console, seq_points=points, eval_seq_len=eval_seq_len, resumed=start.resumed,
                   info=info, prog=prog, micro_points=micro_points)
