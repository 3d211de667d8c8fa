"""Build a run's `RunState` from a TrainConfig (fresh, or continued from its checkpoint) and save it back.

`open_session` is a list of named steps: read and check the data and settings, find where to start, claim the
run dir, build the model and optimizer (restoring them on a resume), open the trackers. Every check that can
refuse the command runs before the first write (the run-dir lock), so a refused command leaves the disk as it
was. `save` writes the same state to a checkpoint, the one place that knows its keys besides its readers
(`ckpt_check.py`, `resume.py`, the restore steps below).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from pretrain.data.dataset import TokenDataset, open_dataset
from pretrain.data.loader import Prefetcher, TrainSampler, ValWindows
from pretrain.errors import UserError
from pretrain.evals.diagnostics import diagnostic_rows
from pretrain.evals.downstream import load_items
from pretrain.evals.lengths import length_windows, parse_eval_lengths
from pretrain.evals.samples import load_prompts, text_codec
from pretrain.llama import check_init_from, load_init_from
from pretrain.runstatus import COMPLETED, RunStatus
from pretrain.schedule import (
    describe_lr_extension,
    lr_horizon_on_resume,
    parse_micro_batch_schedule,
    parse_seq_schedule,
    phases,
)
from pretrain.track.attn_maps import attention_map_choice
from pretrain.track.console import Console
from pretrain.track.runlog import JSONL_NAME, RunLog, read_jsonl
from pretrain.track.summary import describe_batch_change, describe_branch
from pretrain.track.tensorboard import TBWriter
from pretrain.track.wandb_run import WandbRun, wandb_location
from pretrain.train import device as dev
from pretrain.train import distributed as dist_lib
from pretrain.train import mirror as mirror_lib
from pretrain.train.checkpoint import CheckpointManager
from pretrain.train.ckpt_check import check_same_run, missing_part, model_shapes, problem
from pretrain.train.config import TrainConfig, model_config_from
from pretrain.train.float8 import check_float8
from pretrain.train.optim import build_optimizer, load_rounding_rng_state, rounding_rng_state
from pretrain.train.resume import (
    StartPoint,
    batch_split_change,
    find_start,
    rng_for_rank,
    rng_state,
    seed_everything,
    set_rng_state,
)
from pretrain.train.run_config import write_run_config
from pretrain.train.run_dir import RunDirLock, check_out_dir, clear_run, set_branch_aside
from pretrain.train.speed import build_model, training_shapes
from pretrain.train.state import EvalInputs, Progress, RunState, Schedules, Trackers

Trained = tuple[GPT, torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler, TrainSampler]


class RunComplete(Exception):
    """The run dir holds this run, finished: nothing to train, evaluate or write."""


def open_session(cfg: TrainConfig, command: str = "") -> RunState:
    """Check the settings against the data and run dir, then build (or restore) everything a run needs."""
    device = dev.resolve_device(cfg.device)
    dist = dist_lib.init_distributed(device)
    host = dev.setup_device(device)
    run_dir = Path(cfg.out_dir)
    if dist.is_main:
        check_out_dir(run_dir)
    ds, mcfg, sched = _read_data(cfg, dist)
    evals = _read_eval_inputs(cfg, mcfg, ds, dist, sched.seq_points)
    _check_bf16(cfg, device)
    check_float8(cfg, device)
    ckpt = CheckpointManager(run_dir, keep_last=cfg.keep_last, enabled=dist.is_main)
    if cfg.init_from:
        check_init_from(cfg.init_from, mcfg)
    fingerprint = ds.fingerprint()
    start, mirror = _find_start(cfg, mcfg, ds, dist, ckpt, fingerprint)
    lock, branch = _claim_run_dir(run_dir, start, dist, ckpt, mirror)  # the first write
    model, wrapped, optimizer, scaler, sampler = _build_training(cfg, mcfg, device, dist, ds, sched, start)
    prog, resume_fields = _resumed_progress(cfg, start, sched, dist, branch)
    info = {"command": command, "train_config": cfg.to_dict(), "model_config": mcfg.to_dict(),
            "params": mcfg.num_params(), "non_embedding_params": mcfg.num_params(non_embedding=True),
            "device": str(device), "world_size": dist.world_size, "host": host}
    track = _open_trackers(cfg, ds, dist, start, prog, info, resume_fields, fingerprint)
    return RunState(cfg=cfg, mcfg=mcfg, dist=dist, device=device, run_dir=run_dir, model=model, wrapped=wrapped,
                    optimizer=optimizer, scaler=scaler, loader=Prefetcher(sampler, device), sched=sched,
                    evals=evals, ckpt=ckpt, track=track, info=info, resumed=start.resumed, prog=prog,
                    fingerprint=fingerprint, lock=lock, mirror=mirror)


def _read_data(cfg: TrainConfig, dist: dist_lib.Dist) -> tuple[TokenDataset, ModelConfig, Schedules]:
    """The dataset, the model config it implies, and the step schedules checked against both."""
    ds = open_dataset(cfg.data, cfg.val_frac, vocab_size=cfg.vocab_size)
    mcfg = model_config_from(cfg, ds.vocab_size)
    ds.check_vocab(mcfg.vocab_size)
    points = parse_seq_schedule(cfg.seq_schedule, cfg.train_seq_len or mcfg.block_size, mcfg.block_size)
    if cfg.eval_seq_len and cfg.eval_seq_len > mcfg.block_size:
        raise UserError(f"--eval-seq-len {cfg.eval_seq_len} exceeds the model's block size {mcfg.block_size}; "
                        f"lower it or raise --block-size")
    micro_points = parse_micro_batch_schedule(cfg.micro_batch_schedule, cfg.batch_size * cfg.grad_accum)
    ds.check_enough(max([cfg.batch_size] + [m for _, m in micro_points]), max(p[1] for p in points), dist.world_size)
    return ds, mcfg, Schedules(points, micro_points, lr_horizon=cfg.steps)


def _read_eval_inputs(cfg: TrainConfig, mcfg: ModelConfig, ds: TokenDataset, dist: dist_lib.Dist,
                      points: list[tuple[int, int]]) -> EvalInputs:
    """Read what the evals need now: a too-small val split, a bad length, a missing prompt file or tokenizer
    stops the run (UserError) before it writes."""
    # Every length an eval can use (instruments.evaluate), so a too-small val split fails before training.
    eval_lens = {cfg.eval_seq_len} if cfg.eval_seq_len else {p.seq_len for p in phases(points, cfg.steps)}
    val_by_len = {n: ValWindows(ds, n, cfg.batch_size * dist.world_size, cfg.eval_iters)  # split across ranks
                  for n in sorted(eval_lens)}
    # Instruments use one fixed length: the explicit --eval-seq-len, else the longest the schedule trains at.
    eval_seq_len, trained_len = max(eval_lens), max(p[1] for p in points)
    eval_lengths = parse_eval_lengths(cfg.eval_seq_lens) if cfg.eval_seq_lens else []
    lengths = length_windows(ds, eval_lengths, cfg.batch_size * eval_seq_len, cfg.eval_iters) if eval_lengths else {}
    diagnostic_batch = None
    if cfg.analysis_every:
        rows = diagnostic_rows(mcfg.n_head, eval_seq_len, cfg.batch_size)
        diagnostic_batch = next(iter(ValWindows(ds, eval_seq_len, rows, 1)))
    return EvalInputs(val_by_len, lengths, diagnostic_batch, trained_len,
                      codec=text_codec(ds.tokenizer, ds.vocab_size) if cfg.sample_every or cfg.hellaswag else None,
                      prompts=load_prompts(cfg.sample_prompts) if cfg.sample_every else [],
                      mc_items=load_items(cfg.hellaswag, cfg.downstream_items) if cfg.hellaswag else [],
                      eval_lengths=eval_lengths,
                      maps=attention_map_choice(cfg.attn_map_layers, cfg.attn_map_heads, cfg.analysis_every,
                                                mcfg.n_layer, mcfg.n_head))


def _check_bf16(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.amp and cfg.amp_dtype == "bf16" and not dev.supports_bf16(device):
        cap = ".".join(map(str, dev.compute_capability(device) or ()))
        weights = " --param-dtype fp32" if cfg.param_dtype == "bf16" else ""
        raise UserError(f"this GPU (compute capability {cap}) has no native bf16 (needs 8.0, Ampere or newer): use "
                        f"--amp-dtype fp16{weights} or --no-amp; run_1b_launch.py plans what fits this card")


def _find_start(cfg: TrainConfig, mcfg: ModelConfig, ds: TokenDataset, dist: dist_lib.Dist,
                ckpt: CheckpointManager, fingerprint: str) -> tuple[StartPoint, mirror_lib.Mirror | None]:
    """Fresh or which checkpoint (resume.find_start), refusing another experiment's; RunComplete when done.
    With --mirror and an empty run dir, the mirror's newest good checkpoint is pulled first."""
    shapes = model_shapes(mcfg)

    def usable(state: dict, path: Path) -> str | None:
        # Another experiment's checkpoint is refused (UserError) before its shapes could call it malformed.
        if why := missing_part(state):
            return why
        check_same_run(state, path, cfg, dist_lib.saved_config_for(state, cfg, dist, path), mcfg,
                       ds.tokenizer, fingerprint)
        return problem(state, shapes, TrainSampler(ds, cfg.seed, world_size=dist.world_size).load_state_dict)

    run_dir = Path(cfg.out_dir)
    mirror = mirror_lib.open_and_pull(cfg, run_dir, dist, usable)  # an empty run dir resumes from the mirror
    start = find_start(cfg, ckpt, usable)
    dist_lib.check_same_start(start.state["step"] if start.resumed else None, dist)
    if start.resumed and start.state["step"] >= cfg.steps and _completed_at(run_dir) == start.state["step"]:
        raise RunComplete(f"{run_dir} is complete ({start.state['step']} of {cfg.steps} steps); nothing to do. "
                          "Raise --steps to extend it, or use another --out-dir for a new run"
                          + (" (--overwrite replaces a run only with --resume never)" if cfg.overwrite else ""))
    if mirror:
        mirror.check_start(start, cfg.overwrite)
    return start, mirror


def _completed_at(run_dir: Path) -> int | None:
    """The step of the run's `end` event when it completed (not when it was stopped), else None."""
    ends = [r for r in read_jsonl(run_dir / JSONL_NAME) if r.get("type") == "end"]
    return ends[-1].get("step") if ends and RunStatus.parse(ends[-1].get("status")) == COMPLETED else None


def _claim_run_dir(run_dir: Path, start: StartPoint, dist: dist_lib.Dist, ckpt: CheckpointManager,
                   mirror: mirror_lib.Mirror | None) -> tuple[RunDirLock, dict | None]:
    """Lock the run dir (the first write), then clear it or set a rolled-back branch aside as `start` says."""
    lock = RunDirLock(run_dir)
    branch: dict[str, Any] | None = None
    if dist.is_main:
        lock.acquire()  # a second trainer on this run dir stops here, before touching it
        if start.clear:
            clear_run(run_dir)
        if start.abandon:
            branch = set_branch_aside(run_dir, start.abandon, start.state["step"])
        if mirror:
            mirror.begin(ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)
    return lock, branch


def _build_training(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device, dist: dist_lib.Dist,
                    ds: TokenDataset, sched: Schedules, start: StartPoint) -> Trained:
    """Model (compiled per block), its distributed wrapper, optimizer, grad scaler and data sampler: seeded
    fresh, or restored from the checkpoint with every generator as it was."""
    seed_everything(cfg.seed)
    model = build_model(mcfg, cfg, device, training_shapes(sched.seq_points, sched.micro_points, cfg))
    if cfg.init_from and not start.resumed:
        load_init_from(model, cfg.init_from)
    wrapped = dist_lib.wrap_model(model, cfg.fsdp, cfg.cpu_offload, dist, device,
                                  dev.amp_dtype(cfg.amp_dtype) if cfg.amp else None)
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == "fp16")
    sampler = TrainSampler(ds, cfg.seed, rank=dist.rank, world_size=dist.world_size)
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
    return model, wrapped, optimizer, scaler, sampler


def _resumed_progress(cfg: TrainConfig, start: StartPoint, sched: Schedules, dist: dist_lib.Dist,
                      branch: dict | None) -> tuple[Progress, dict[str, Any]]:
    """The checkpoint's counters (sets sched.lr_horizon) and what the `resume` event says changed."""
    if not start.resumed:
        return Progress(), {}
    st = start.state
    prog = Progress(st["step"], st["tokens"], st["elapsed"], st.get("best_val"), st.get("skipped_steps", 0),
                    st.get("train_window"))
    saved_steps, saved_horizon = int(st["train_config"].get("steps", cfg.steps)), st["lr_horizon"]
    sched.lr_horizon = lr_horizon_on_resume(cfg.lr_schedule, saved_horizon, cfg.steps, prog.step, cfg.decay_frac)
    fields = {"from": str(start.path), "steps_before": saved_steps, "steps": cfg.steps,
              "lr_horizon": sched.lr_horizon}
    if saved_steps != cfg.steps:
        fields["lr_note"] = describe_lr_extension(cfg.lr_schedule, saved_horizon, cfg.steps, prog.step,
                                                  cfg.decay_frac)
    if batch_change := batch_split_change(st, cfg, dist.world_size):
        fields["batch_change"] = batch_change
    if branch:
        fields["branch"] = branch
    return prog, fields


def _open_trackers(cfg: TrainConfig, ds: TokenDataset, dist: dist_lib.Dist, start: StartPoint, prog: Progress,
                   info: dict[str, Any], resume_fields: dict[str, Any], fingerprint: str) -> Trackers:
    """Console, train.jsonl (its `meta` or `resume` event), wandb (the same run on a resume) and TensorBoard."""
    main, run_dir = dist.is_main, Path(cfg.out_dir)
    console = Console(cfg.live if main else "off", total_steps=cfg.steps, start_step=prog.step)
    if main and start.note:
        console.print(start.note)
    if main and (emulated := dev.emulated_autocast_warning(torch.device(info["device"]), cfg.amp, cfg.amp_dtype)):
        console.print(emulated)
    log = RunLog(run_dir, resume_step=prog.step if start.resumed else None, resume_fields=resume_fields) \
        if main else None
    if log and not start.resumed:
        log.event("meta", **info, dataset={"path": cfg.data, "train_tokens": ds.train_tokens,
                                           "val_tokens": ds.val_tokens, "fingerprint": fingerprint})
    if main:
        write_run_config(run_dir, cfg, ds.vocab_size)  # config.toml: this start's settings, for --config
    if main and start.resumed:
        _print_resume(console, start, prog, cfg, resume_fields)
    wandb_id = cfg.wandb_id or start.state.get("wandb_run_id") if start.resumed else cfg.wandb_id
    wb = WandbRun(run_dir, info, enabled=cfg.wandb and main, project=cfg.wandb_project, entity=cfg.wandb_entity,
                  name=cfg.wandb_name or run_dir.name, group=cfg.wandb_group,
                  tags=cfg.wandb_tags.split(",") if cfg.wandb_tags else None, mode=cfg.wandb_mode,
                  run_id=wandb_id, fresh=not start.resumed, warn=console.print)
    info.update(wandb_url=wb.url, wandb_sync=wb.sync_command)
    if wb.enabled and (where := wandb_location(wb.url, wb.sync_command)):
        console.print(where)  # at the start too: the dashboard can be opened while the run trains
    tb = TBWriter(run_dir, enabled=cfg.tb and main, purge_step=prog.step + 1 if start.resumed else None)
    return Trackers(log, wb, tb, console)


def _print_resume(console: Console, start: StartPoint, prog: Progress, cfg: TrainConfig,
                  resume_fields: dict[str, Any]) -> None:
    console.print(f"resuming from {start.path} at step {prog.step}")
    if "lr_note" in resume_fields:
        console.print(f"run length changed from {resume_fields['steps_before']:,} to {cfg.steps:,} steps: "
                      f"{resume_fields['lr_note']}")
    if "branch" in resume_fields:
        console.print(f"rolled back to step {prog.step}: {describe_branch(resume_fields['branch'])}")
    if "batch_change" in resume_fields:
        console.print(f"batch split changed: {describe_batch_change(resume_fields['batch_change'])}")


def save(s: RunState, best: bool = False, data_state: dict | None = None) -> None:
    """Checkpoint the state after `prog.step` full steps (collective under FSDP: every rank calls it)."""
    p = s.prog
    rng = dist_lib.gather_from_ranks(rng_state(), s.dist)
    replicas_match = dist_lib.replicas_match(s.wrapped, s.dist)
    if not replicas_match and s.dist.is_main:
        s.track.console.print(f"warning: step {p.step}: the DDP replicas' weights differ; the checkpoint holds "
                              f"rank 0's. Please report this with the command line")
    state = {
        "version": 1,
        "model": dist_lib.model_state(s.model, s.dist),
        "optimizer": dist_lib.optimizer_state(s.model, s.optimizer, s.dist),
        "scaler": s.scaler.state_dict() if s.fp16 else {},
        "step": p.step, "tokens": p.tokens, "elapsed": p.elapsed, "best_val": p.best_val,
        "skipped_steps": p.skipped_steps, "lr_horizon": s.sched.lr_horizon,
        "sampler": data_state or s.loader.state_dict(),
        "rng": rng[0], "rng_ranks": rng,  # each rank's own generators (its own CUDA device)
        "rounding_rng": rounding_rng_state(s.optimizer),
        "train_config": s.cfg.to_dict(), "model_config": s.mcfg.to_dict(),
        "world_size": s.dist.world_size,
        "wandb_run_id": s.track.wb.run_id,
        "data_fingerprint": s.fingerprint,
    }
    if s.meter is not None:
        state.update(s.meter.checkpoint_fields(s))
    s.ckpt.save(state, p.step, best=best)
    extra = {"replicas_match": replicas_match} if s.dist.enabled else {}
    s.emit("checkpoint", best=best, **extra)
    s.track.wb.flush()  # the checkpoint ends its step: a kill -9 from here on loses no row wandb should hold
