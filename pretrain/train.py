"""The training loop: wires data, model, optimizer, checkpoints and tracking; each piece lives elsewhere."""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import GPT
from pretrain import device as dev
from pretrain.checkpoint import CheckpointManager
from pretrain.cli import UserError
from pretrain.config import TrainConfig, model_config_from
from pretrain.console import Console
from pretrain.data import Prefetcher, TrainSampler, ValWindows, open_dataset
from pretrain.distributed import init_distributed
from pretrain.optim import build_optimizer, peak_lr, set_lr, step_unless_nonfinite
from pretrain.resume import check_compatible, find_start, rng_state, seed_everything, set_rng_state
from pretrain.schedule import lr_at, parse_seq_schedule, seq_len_at
from pretrain.track import RunLog, TBWriter, WandbRun, to_metrics, write_plots, write_summary


class StopRequested:
    """Turns SIGTERM / SIGINT / SIGUSR1 into a flag the loop checks between micro-batches."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        # A second Ctrl-C while we save should still kill the process.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __bool__(self) -> bool:
        return self.signum is not None


@dataclass
class Progress:
    """Counters that checkpoints carry and the loop advances."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float | None = None
    skipped_steps: int = 0
    history: dict[str, Any] = field(default_factory=dict)


def evaluate(model: GPT, val: ValWindows, ctx: Any) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), ctx:
        for x, y in val:
            total += model(x, y).float().item()
            n += 1
    model.train()
    return total / max(n, 1)


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Train per `cfg`; returns the run's final figures. Resumes from the run dir when it can."""
    dist = init_distributed()
    device = dev.resolve_device(cfg.device)
    dev.setup_device(device)
    run_dir = Path(cfg.out_dir)
    ds = open_dataset(cfg.data, cfg.val_frac)
    mcfg = model_config_from(cfg, ds.vocab_size)
    ds.check_vocab(mcfg.vocab_size)
    train_seq_len = cfg.train_seq_len or mcfg.block_size
    points = parse_seq_schedule(cfg.seq_schedule, train_seq_len, mcfg.block_size)
    eval_seq_len = min(cfg.eval_seq_len or points[-1][1], mcfg.block_size)
    ds.check_enough(cfg.batch_size * dist.world_size, max(p[1] for p in points))
    if cfg.amp and cfg.amp_dtype == "bf16" and not dev.supports_bf16(device):
        raise UserError("this GPU has no bf16: use --amp-dtype fp16 (T4, V100) or --no-amp")

    ckpt = CheckpointManager(run_dir, keep_last=cfg.keep_last, enabled=dist.is_main)
    start = find_start(cfg, ckpt, dist.is_main)
    if start.resumed:
        check_compatible(start.state["train_config"], cfg, start.path)
    run_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    model = GPT(mcfg)
    param_dtype = torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32
    model.to(device=device, dtype=param_dtype)
    model.grad_checkpoint = cfg.grad_checkpoint
    optimizer = build_optimizer(model, cfg, device)
    fp16 = cfg.amp and cfg.amp_dtype == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    sampler = TrainSampler(ds, cfg.seed, rank=dist.rank, world_size=dist.world_size)
    prog = Progress()
    wandb_id = cfg.wandb_id
    if start.resumed:
        st = start.state
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        sampler.load_state_dict(st["sampler"])
        set_rng_state(st["rng"])
        prog = Progress(st["step"], st["tokens"], st["elapsed"], st.get("best_val"), st.get("skipped_steps", 0))
        wandb_id = wandb_id or st.get("wandb_run_id")
    if cfg.compile:
        compile_blocks(model, cfg.compile_mode)
    loader = Prefetcher(sampler, device)
    val = ValWindows(ds, eval_seq_len, cfg.batch_size, cfg.eval_iters)
    ctx = dev.autocast(device, cfg.amp, dev.amp_dtype(cfg.amp_dtype))

    log = RunLog(run_dir, resume_step=prog.step if start.resumed else None) if dist.is_main else None
    n_params = mcfg.num_params()
    info = {"command": command, "train_config": cfg.to_dict(), "model_config": mcfg.to_dict(), "params": n_params,
            "non_embedding_params": mcfg.num_params(non_embedding=True), "device": str(device)}
    if log and not start.resumed:
        log.event("meta", **info, dataset={"train_tokens": ds.train_tokens, "val_tokens": ds.val_tokens})
    if log and start.resumed:
        print(f"resuming from {start.path} at step {prog.step}", flush=True)
    wb = WandbRun(run_dir, info | {"dataset": cfg.data}, enabled=cfg.wandb and dist.is_main,
                  project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name or run_dir.name,
                  group=cfg.wandb_group, tags=cfg.wandb_tags.split(",") if cfg.wandb_tags else None,
                  mode=cfg.wandb_mode, run_id=wandb_id)
    tb = TBWriter(run_dir, enabled=cfg.tb and dist.is_main)
    console = Console(cfg.live if dist.is_main else "off", total_steps=cfg.steps, start_step=prog.step)
    peak = dev.peak_flops(device)
    stop = StopRequested()
    stop.install()

    def emit(kind: str, step: int, **fields: Any) -> None:
        if log:
            log.event(kind, step=step, **fields)
        metrics = to_metrics("train" if kind == "train" else "val", fields)
        wb.log(metrics, step=step)
        tb.log(metrics, step=step)

    def save(best: bool = False, data_state: dict | None = None) -> None:
        state = {
            "version": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if fp16 else {}, "step": prog.step, "tokens": prog.tokens,
            "sampler": data_state or loader.state_dict(), "rng": rng_state(), "train_config": cfg.to_dict(),
            "model_config": mcfg.to_dict(), "wandb_run_id": wb.run_id, "elapsed": prog.elapsed,
            "best_val": prog.best_val, "skipped_steps": prog.skipped_steps,
        }
        ckpt.save(state, prog.step, best=best)
        if log:
            log.event("checkpoint", step=prog.step, best=best)

    def run_eval() -> float:
        loss = evaluate(model, val, ctx)
        best = prog.best_val is None or loss < prog.best_val
        if best:
            prog.best_val = loss
        emit("eval", prog.step, loss=loss, ppl=math.exp(min(loss, 30)), tokens=prog.tokens, seq_len=eval_seq_len)
        console.print(f"eval step {prog.step}: val loss {loss:.4f} (best {prog.best_val:.4f})")
        return best

    if not start.resumed:
        run_eval()
    interval_loss = torch.zeros((), device=device)
    bad_streak = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)
    interval_good = torch.zeros((), device=device)
    last_log_time, last_log_step, data_time = time.perf_counter(), prog.step, 0.0
    last_save_time, t_start = time.monotonic(), time.monotonic() - prog.elapsed
    status = "completed"
    partial_step_data: dict | None = None
    model.train()
    while prog.step < cfg.steps and not stop:
        data_state = loader.state_dict()
        seq_len = seq_len_at(points, prog.step)
        lr = lr_at(prog.step, lr=peak_lr(cfg), min_lr=cfg.min_lr if cfg.min_lr is not None else peak_lr(cfg) / 10,
                   total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                   decay_frac=cfg.decay_frac)
        set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=device)
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            x, y = loader.next(cfg.batch_size, seq_len)
            data_time += time.perf_counter() - t0
            with ctx:
                loss = model(x, y) / cfg.grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.detach().float()
            if stop:
                break
        if stop:
            # The partial step is dropped: the checkpoint holds the state after the last full step.
            optimizer.zero_grad(set_to_none=True)
            partial_step_data = data_state
            break
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
        found_inf = (~torch.isfinite(grad_norm) | ~torch.isfinite(step_loss)).float()
        if fp16:
            scaler.step(optimizer)
            scaler.update()
        else:
            step_unless_nonfinite(optimizer, found_inf)
        optimizer.zero_grad(set_to_none=True)
        bad_streak = (bad_streak + found_inf) * found_inf
        skipped += found_inf
        interval_loss += torch.where(found_inf.bool(), 0.0, step_loss)
        interval_good += 1 - found_inf
        prog.step += 1
        prog.tokens += cfg.batch_size * cfg.grad_accum * dist.world_size * seq_len

        if prog.step % cfg.log_every == 0 or prog.step == cfg.steps:
            dev.synchronize(device)
            now = time.perf_counter()
            n = prog.step - last_log_step
            prog.skipped_steps = int(skipped.item())
            good = max(interval_good.item(), 1)
            tok_s = n * cfg.batch_size * cfg.grad_accum * dist.world_size * seq_len / (now - last_log_time)
            mfu = tok_s * mcfg.flops_per_token(seq_len) / peak if peak else None
            fields = {"tokens": prog.tokens, "loss": interval_loss.item() / good, "last_loss": step_loss.item(),
                      "lr": lr, "grad_norm": grad_norm.item(), "tok_s": tok_s, "mfu": mfu, "seq_len": seq_len,
                      "tokens_per_step": cfg.batch_size * cfg.grad_accum * dist.world_size * seq_len,
                      "step_ms": 1000 * (now - last_log_time) / n, "data_ms": 1000 * data_time / n,
                      "skipped_steps": prog.skipped_steps, **dev.memory_stats(device)}
            emit("train", prog.step, **fields)
            console.update(prog.step, fields)
            interval_loss.zero_()
            interval_good.zero_()
            last_log_time, last_log_step, data_time = now, prog.step, 0.0
            if bad_streak.item() >= cfg.max_bad_steps > 0:
                status = f"stopped: {int(bad_streak.item())} non-finite steps in a row"
                console.print(f"error: {status}; resume from the last checkpoint with a lower --lr")
                break
        prog.elapsed = time.monotonic() - t_start
        if prog.step >= cfg.steps:
            break
        best, pause_start = False, time.perf_counter()
        if cfg.eval_every and prog.step % cfg.eval_every == 0:
            best = run_eval()
            if log:
                write_plots(run_dir)
        if best or (cfg.save_every and prog.step % cfg.save_every == 0) or (
            cfg.save_minutes and time.monotonic() - last_save_time > 60 * cfg.save_minutes
        ):
            save(best=best)
            last_save_time = time.monotonic()
        # Throughput counts training only: evals and checkpoint snapshots are not steps.
        last_log_time += time.perf_counter() - pause_start

    prog.elapsed = time.monotonic() - t_start
    final_val = None
    if stop:
        status = f"stopped by signal {stop.signum}"
    if status == "completed":
        final_val = evaluate(model, val, ctx)
        is_best = prog.best_val is None or final_val < prog.best_val
        prog.best_val = min(final_val, prog.best_val or final_val)
        emit("eval", prog.step, loss=final_val, ppl=math.exp(min(final_val, 30)), tokens=prog.tokens,
             seq_len=eval_seq_len)
        save(best=is_best)
    elif not status.startswith("stopped:"):
        save(data_state=partial_step_data)
        console.print(f"{status}: saved step {prog.step} to {run_dir / 'last.pt'}; rerun the same command to resume")
    ckpt.wait()
    stop.restore()
    result = {"status": status, "step": prog.step, "tokens": prog.tokens, "final_val_loss": final_val,
              "best_val_loss": prog.best_val, "skipped_steps": prog.skipped_steps, "elapsed_s": prog.elapsed}
    if log:
        log.event("end", **result)
        log.close()
        write_plots(run_dir)
        write_summary(run_dir, info | result)
    wb.finish()
    tb.close()
    console.close()
    return result


def compile_blocks(model: GPT, mode: str) -> None:
    """Compile each block in place: keeps parameter names (no `_orig_mod.`) and compiles one block shape once."""
    for block in model.blocks:
        block.compile(mode=None if mode == "default" else mode)


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import format_command, parse_config

    cfg = parse_config(argv)
    args = sys.argv[1:] if argv is None else argv
    result = train(cfg, command=format_command(["python", "train_v29.py", *args]))
    return 1 if result["status"].startswith("stopped:") else 0
