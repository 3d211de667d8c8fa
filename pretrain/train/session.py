"""Everything one training run holds, built from a TrainConfig: data, model, optimizer, resume state, trackers.

`open_session` does all the checking and building; the loop in `loop.py` then only steps, logs and saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import GPT, ModelConfig
from pretrain import stopping
from pretrain.cli import UserError
from pretrain.data.dataset import open_dataset
from pretrain.data.loader import Prefetcher, TrainSampler, ValWindows
from pretrain.evals.downstream import load_items
from pretrain.evals.downstream import score as downstream_score
from pretrain.evals.samples import SAMPLE_COLUMNS, load_prompts, samples_table_rows, text_codec, write_samples
from pretrain.llama import check_init_from, load_init_from
from pretrain.runstatus import COMPLETED, RunStatus
from pretrain.schedule import (
    describe_lr_extension,
    eval_seq_len_at,
    lr_horizon_on_resume,
    parse_micro_batch_schedule,
    parse_seq_schedule,
    phases,
)
from pretrain.track.console import Console, format_eval_line
from pretrain.track.runlog import JSONL_NAME, RunLog, read_jsonl, to_metrics
from pretrain.track.summary import describe_batch_change, describe_branch
from pretrain.track.tensorboard import TBWriter
from pretrain.track.wandb_run import WandbRun, wandb_location
from pretrain.train import device as dev
from pretrain.train import distributed as dist_lib
from pretrain.train import mirror as mirror_lib
from pretrain.train.checkpoint import CheckpointManager
from pretrain.train.ckpt_check import check_same_run, missing_part, model_shapes, problem
from pretrain.train.config import TrainConfig, model_config_from
from pretrain.train.instruments import Instruments, build_instruments, run_length_eval
from pretrain.train.optim import build_optimizer, load_rounding_rng_state, rounding_rng_state
from pretrain.train.resume import (
    batch_split_change,
    find_start,
    rng_for_rank,
    rng_state,
    seed_everything,
    set_rng_state,
)
from pretrain.train.rundir import RunDirLock, check_out_dir, clear_run, set_branch_aside
from pretrain.train.speed import build_model, eagerly, training_shapes

# wandb / TensorBoard namespace of each event type (train.jsonl keeps the type itself).
METRIC_PREFIX = {"train": "train", "eval": "val", "eval_lengths": "val_len", "diagnostics": "diag"}


@dataclass
class Progress:
    """Counters that checkpoints carry and the loop advances."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float | None = None
    skipped_steps: int = 0
    train_window: dict[str, Any] | None = None  # the open train-loss window at the save (loop.Meter)


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
    ckpt: CheckpointManager
    log: RunLog | None
    wb: WandbRun
    tb: TBWriter
    console: Console
    seq_points: list[tuple[int, int]]
    val_by_len: dict[int, ValWindows]  # fixed windows per eval length, checked at open
    lr_horizon: int  # steps the LR schedule decays over (kept across extensions, see schedule.lr_horizon_on_resume)
    resumed: bool
    info: dict[str, Any]
    instruments: Instruments
    prog: Progress = field(default_factory=Progress)
    lock: RunDirLock | None = None
    fingerprint: str = ""
    codec: Any = None  # token ids <-> text, when samples or downstream evals are on
    prompts: list[str] = field(default_factory=list)
    mc_items: list[Any] = field(default_factory=list)
    micro_points: list[tuple[int, int]] = field(default_factory=list)  # --micro-batch-schedule, parsed
    meter: Any = None  # the loop's loop.Meter while it runs: checkpoints carry its open window
    mirror: mirror_lib.Mirror | None = None  # --mirror: checkpoints copied off the machine (mirror.py)

    @property
    def autocast(self) -> Any:
        return dev.autocast(self.device, self.cfg.amp, dev.amp_dtype(self.cfg.amp_dtype))

    @property
    def fp16(self) -> bool:
        return self.cfg.amp and self.cfg.amp_dtype == "fp16"

    def emit(self, kind: str, **fields: Any) -> None:
        """One event (train, eval, checkpoint) to train.jsonl, wandb and TensorBoard (rank 0 only)."""
        if self.log:
            self.log.event(kind, step=self.prog.step, **fields)
        numeric = {k: int(v) if isinstance(v, bool) else v for k, v in fields.items()}
        metrics = to_metrics(METRIC_PREFIX.get(kind, kind), numeric)
        self.wb.log(metrics | {"tokens": self.prog.tokens}, step=self.prog.step)  # tokens: wandb's x-axis
        self.tb.log(metrics, step=self.prog.step)

    def eval_seq_len(self) -> int:
        """The validation length now: --eval-seq-len, else the longest trained so far (schedule.eval_seq_len_at)."""
        return eval_seq_len_at(self.seq_points, self.prog.step, self.cfg.eval_seq_len)

    @eagerly  # an eval batch under no_grad would be one more compiled graph per length (speed.py)
    def evaluate(self) -> tuple[float, bool]:
        """Mean loss over the fixed validation windows; returns (loss, is_new_best)."""
        seq_len = self.eval_seq_len()
        windows = self.val_by_len[seq_len]
        self.model.eval()
        total = torch.zeros((), device=self.device)
        with torch.no_grad(), self.autocast, stopping.interruptible():  # a stop ends the eval (and its compile)
            for batch in windows:  # each rank scores its share of the global eval batch
                x, y = (t.chunk(self.dist.world_size)[self.dist.rank].to(self.device) for t in batch)
                total += self.wrapped(x, y).float()
        self.model.train()
        loss = dist_lib.mean_across_ranks(total, self.dist).item() / max(len(windows), 1)
        best = self.prog.best_val is None or loss < self.prog.best_val
        if best:
            self.prog.best_val = loss
        self.emit("eval", loss=loss, ppl=math.exp(min(loss, 30)), tokens=self.prog.tokens, seq_len=seq_len)
        if self.dist.is_main:
            self.console.print(format_eval_line(self.prog.step, {"seq_len": seq_len, "loss": loss,
                                                                 "best": self.prog.best_val}))
        run_length_eval(self)
        return loss, best

    @eagerly  # the KV cache's position is a guard: one recompile per token
    def sample(self) -> None:
        """Greedy and sampled continuations of the fixed prompts -> train.jsonl and a wandb Table."""
        cfg, step = self.cfg, self.prog.step
        rows = write_samples(self.model, self.codec, self.prompts, cfg.sample_tokens, cfg.sample_temperature,
                             cfg.seed, self.device)
        if not self.dist.is_main:
            return
        if self.log:
            self.log.event("sample", step=step, temperature=cfg.sample_temperature, samples=rows)
        if self.wb.enabled:  # one table that grows round by round, on the tokens axis like every metric
            self.wb.add_table_rows("samples", SAMPLE_COLUMNS, samples_table_rows(step, rows), step=step,
                                   tokens=self.prog.tokens)
        line = f"sample step {step}: {rows[0]['prompt']!r} -> {rows[0]['greedy']!r}"
        self.console.print(line)
        self._note("sample step", f"{line} (all prompts: `sample` events in train.jsonl)")

    @eagerly
    def downstream(self) -> None:
        """Multiple-choice accuracy on --hellaswag -> train.jsonl, wandb, TensorBoard (downstream/*)."""
        with stopping.interruptible():
            result = downstream_score(self.model, self.codec, self.mc_items, self.device, self.autocast)
        task = "hellaswag" if self.cfg.hellaswag == "hf" else Path(str(self.cfg.hellaswag)).stem
        self.emit("downstream", task=task, **result)
        if self.dist.is_main:
            line = (f"downstream step {self.prog.step}: {task} acc {result['acc']:.3f} "
                    f"acc_norm {result['acc_norm']:.3f} (n={result['n']}, chance {result['chance']:.3f})")
            self.console.print(line)
            self._note("downstream step", line)

    def _note(self, prefix: str, text: str) -> None:
        """Keep the latest line of one instrument among summary.md's notes."""
        notes = [n for n in self.info.get("notes", []) if not n.startswith(prefix)]
        self.info["notes"] = [*notes, text]

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
            "skipped_steps": p.skipped_steps, "lr_horizon": self.lr_horizon,
            "sampler": data_state or self.loader.state_dict(),
            "rng": rng[0], "rng_ranks": rng,  # each rank's own generators (its own CUDA device)
            "rounding_rng": rounding_rng_state(self.optimizer),
            "train_config": self.cfg.to_dict(), "model_config": self.mcfg.to_dict(),
            "world_size": self.dist.world_size,
            "wandb_run_id": self.wb.run_id,
            "data_fingerprint": self.fingerprint,
        }
        if self.meter is not None:
            state.update(self.meter.checkpoint_fields(self))
        self.ckpt.save(state, p.step, best=best)
        extra = {"replicas_match": replicas_match} if self.dist.enabled else {}
        self.emit("checkpoint", best=best, **extra)
        self.wb.flush()  # the checkpoint ends its step: a kill -9 from here on loses no row wandb should hold

    def close(self) -> None:
        self.ckpt.wait()
        if self.log:
            self.log.close()
        if self.mirror:
            self.mirror.close()  # train.jsonl and summary.md as they end
        self.wb.finish()
        self.tb.close()
        self.console.close()
        self.loader.close()
        if self.lock:
            self.lock.release()
        # Release the wrapped model and optimizer before distributed.cleanup() destroys their process group.
        self.wrapped = self.model = self.optimizer = None  # type: ignore[assignment]


class RunComplete(Exception):
    """The run dir holds this run, finished: nothing to train, evaluate or write."""


def _completed_at(run_dir: Path) -> int | None:
    """The step of the run's `end` event when it completed (not when it was stopped), else None."""
    ends = [r for r in read_jsonl(run_dir / JSONL_NAME) if r.get("type") == "end"]
    return ends[-1].get("step") if ends and RunStatus.parse(ends[-1].get("status")) == COMPLETED else None


def open_session(cfg: TrainConfig, command: str = "") -> Session:
    """Check the settings against the data and run dir, then build (or restore) everything a run needs.

    Every check that can refuse the command runs before the first write (the run-dir lock), so a refused
    command leaves the disk as it was.
    """
    device = dev.resolve_device(cfg.device)
    dist = dist_lib.init_distributed(device)
    host = dev.setup_device(device)
    run_dir = Path(cfg.out_dir)
    if dist.is_main:
        check_out_dir(run_dir)
    ds = open_dataset(cfg.data, cfg.val_frac, vocab_size=cfg.vocab_size)
    mcfg = model_config_from(cfg, ds.vocab_size)
    ds.check_vocab(mcfg.vocab_size)
    points = parse_seq_schedule(cfg.seq_schedule, cfg.train_seq_len or mcfg.block_size, mcfg.block_size)
    if cfg.eval_seq_len and cfg.eval_seq_len > mcfg.block_size:
        raise UserError(f"--eval-seq-len {cfg.eval_seq_len} exceeds the model's block size {mcfg.block_size}; "
                        f"lower it or raise --block")
    micro_points = parse_micro_batch_schedule(cfg.micro_batch_schedule, cfg.batch_size * cfg.grad_accum)
    ds.check_enough(max([cfg.batch_size] + [m for _, m in micro_points]), max(p[1] for p in points), dist.world_size)
    # Every length an eval can use (see Session.eval_seq_len), so a too-small val split fails before training.
    eval_lens = {cfg.eval_seq_len} if cfg.eval_seq_len else {p.seq_len for p in phases(points, cfg.steps)}
    val_by_len = {n: ValWindows(ds, n, cfg.batch_size * dist.world_size, cfg.eval_iters)  # split across ranks
                  for n in sorted(eval_lens)}
    # Instruments use one fixed length: the explicit --eval-seq-len, else the longest the schedule trains at.
    instruments = build_instruments(cfg, mcfg, ds, max(eval_lens), max(p[1] for p in points))
    # Instruments read their inputs now: a missing prompt file or tokenizer stops the run before it writes.
    codec = text_codec(ds.tokenizer, ds.vocab_size) if cfg.sample_every or cfg.hellaswag else None
    prompts = load_prompts(cfg.sample_prompts) if cfg.sample_every else []
    mc_items = load_items(cfg.hellaswag, cfg.downstream_items) if cfg.hellaswag else []
    if cfg.amp and cfg.amp_dtype == "bf16" and not dev.supports_bf16(device):
        cap = ".".join(map(str, dev.compute_capability(device) or ()))
        weights = " --param-dtype fp32" if cfg.param_dtype == "bf16" else ""
        raise UserError(f"this GPU (compute capability {cap}) has no native bf16 (needs 8.0, Ampere or newer): use "
                        f"--amp-dtype fp16{weights} or --no-amp; run_1b_launch.py plans what fits this card")

    ckpt = CheckpointManager(run_dir, keep_last=cfg.keep_last, enabled=dist.is_main)
    if cfg.init_from:
        check_init_from(cfg.init_from, mcfg)
    fingerprint, shapes = ds.fingerprint(), model_shapes(mcfg)

    def usable(state: dict, path: Path) -> str | None:
        # Another experiment's checkpoint is refused (UserError) before its shapes could call it malformed.
        if why := missing_part(state):
            return why
        check_same_run(state, path, cfg, dist_lib.saved_config_for(state, cfg, dist, path), mcfg,
                       ds.tokenizer, fingerprint)
        return problem(state, shapes, TrainSampler(ds, cfg.seed, world_size=dist.world_size).load_state_dict)

    mirror = mirror_lib.open_and_pull(cfg, run_dir, dist, usable)  # an empty run dir resumes from the mirror
    start = find_start(cfg, ckpt, usable)
    dist_lib.check_same_start(start.state["step"] if start.resumed else None, dist)
    if start.resumed and start.state["step"] >= cfg.steps and _completed_at(run_dir) == start.state["step"]:
        raise RunComplete(f"{run_dir} is complete ({start.state['step']} of {cfg.steps} steps); nothing to do. "
                          "Raise --steps to extend it, or use another --out-dir for a new run"
                          + (" (--overwrite replaces a run only with --resume never)" if cfg.overwrite else ""))
    if mirror:
        mirror.check_start(start, cfg.overwrite)
    lock = RunDirLock(run_dir)
    branch: dict[str, Any] | None = None
    if dist.is_main:
        lock.acquire()  # the first write: a second trainer on this run dir stops here, before touching it
        if start.clear:
            clear_run(run_dir)
        if start.abandon:
            branch = set_branch_aside(run_dir, start.abandon, start.state["step"])
        if mirror:
            mirror.begin(ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    model = build_model(mcfg, cfg, device, training_shapes(points, micro_points, cfg))  # compiled per block
    if cfg.init_from and not start.resumed:
        load_init_from(model, cfg.init_from)
    wrapped = dist_lib.wrap_model(model, cfg.fsdp, cfg.cpu_offload, dist, device,
                                  dev.amp_dtype(cfg.amp_dtype) if cfg.amp else None)
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == "fp16")
    sampler = TrainSampler(ds, cfg.seed, rank=dist.rank, world_size=dist.world_size)
    prog, wandb_id, lr_horizon = Progress(), cfg.wandb_id, cfg.steps
    resume_fields: dict[str, Any] = {}
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
        prog = Progress(st["step"], st["tokens"], st["elapsed"], st.get("best_val"), st.get("skipped_steps", 0),
                        st.get("train_window"))
        wandb_id = wandb_id or st.get("wandb_run_id")
        saved_steps = int(st["train_config"].get("steps", cfg.steps))
        saved_horizon = st["lr_horizon"]
        lr_horizon = lr_horizon_on_resume(cfg.lr_schedule, saved_horizon, cfg.steps, prog.step, cfg.decay_frac)
        resume_fields = {"from": str(start.path), "steps_before": saved_steps, "steps": cfg.steps,
                         "lr_horizon": lr_horizon}
        if saved_steps != cfg.steps:
            resume_fields["lr_note"] = describe_lr_extension(cfg.lr_schedule, saved_horizon, cfg.steps, prog.step,
                                                             cfg.decay_frac)
        if batch_change := batch_split_change(st, cfg, dist.world_size):
            resume_fields["batch_change"] = batch_change
        if branch:
            resume_fields["branch"] = branch

    info = {"command": command, "train_config": cfg.to_dict(), "model_config": mcfg.to_dict(),
            "params": mcfg.num_params(), "non_embedding_params": mcfg.num_params(non_embedding=True),
            "device": str(device), "world_size": dist.world_size, "host": host}
    main = dist.is_main
    console = Console(cfg.live if main else "off", total_steps=cfg.steps, start_step=prog.step)
    if main and start.note:
        console.print(start.note)
    log = RunLog(run_dir, resume_step=prog.step if start.resumed else None, resume_fields=resume_fields) \
        if main else None
    if log and not start.resumed:
        log.event("meta", **info, dataset={"path": cfg.data, "train_tokens": ds.train_tokens,
                                           "val_tokens": ds.val_tokens})
    if main and start.resumed:
        console.print(f"resuming from {start.path} at step {prog.step}")
        if "lr_note" in resume_fields:
            console.print(f"run length changed from {resume_fields['steps_before']:,} to {cfg.steps:,} steps: "
                          f"{resume_fields['lr_note']}")
        if branch:
            console.print(f"rolled back to step {prog.step}: {describe_branch(branch)}")
        if "batch_change" in resume_fields:
            console.print(f"batch split changed: {describe_batch_change(resume_fields['batch_change'])}")
    wb = WandbRun(run_dir, info, enabled=cfg.wandb and main, project=cfg.wandb_project, entity=cfg.wandb_entity,
                  name=cfg.wandb_name or run_dir.name, group=cfg.wandb_group,
                  tags=cfg.wandb_tags.split(",") if cfg.wandb_tags else None, mode=cfg.wandb_mode,
                  run_id=wandb_id, fresh=not start.resumed, warn=console.print)
    info.update(wandb_url=wb.url, wandb_sync=wb.sync_command)
    if wb.enabled and (where := wandb_location(wb.url, wb.sync_command)):
        console.print(where)  # at the start too: the dashboard can be opened while the run trains
    tb = TBWriter(run_dir, enabled=cfg.tb and main, purge_step=prog.step + 1 if start.resumed else None)
    return Session(cfg=cfg, mcfg=mcfg, dist=dist, device=device, run_dir=run_dir, model=model, wrapped=wrapped,
                   optimizer=optimizer, scaler=scaler, loader=Prefetcher(sampler, device),
                   val_by_len=val_by_len, ckpt=ckpt, log=log, wb=wb,
                   tb=tb, console=console, seq_points=points, lr_horizon=lr_horizon, resumed=start.resumed,
                   info=info, instruments=instruments, prog=prog, lock=lock, fingerprint=fingerprint, codec=codec,
                   prompts=prompts, mc_items=mc_items, micro_points=micro_points, mirror=mirror)
