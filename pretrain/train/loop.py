"""The training loop. It only wires things: `session.py` builds the run, other modules do the work."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from pretrain import stopping
from pretrain.cli import EXIT_STOPPED, UserError
from pretrain.data.shards import ShardChanged
from pretrain.runstatus import COMPLETE, COMPLETED, Ending, RunStatus, stopped, stopped_by_signal
from pretrain.schedule import default_min_lr, lr_at, micro_batch_at, seq_len_at
from pretrain.track.plots import write_plots
from pretrain.track.summary import write_summary
from pretrain.train import device as dev
from pretrain.train import distributed as dist_lib
from pretrain.train import speed
from pretrain.train.checkpoint import latest_step
from pretrain.train.config import TrainConfig, format_command, parse_config
from pretrain.train.instruments import run_diagnostics
from pretrain.train.optim import peak_lr, set_lr, step_unless_nonfinite
from pretrain.train.session import RunComplete, Session, open_session


class StopRequested:
    """Turns SIGTERM / SIGINT / SIGUSR1 / SIGHUP into a flag the loop checks after every micro-batch, and that
    stops evals, diagnostics, samples, downstream and compiles mid-way (pretrain/stopping.py)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        stopping.reset()
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        # A second Ctrl-C while we save should still kill the process.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum == signal.SIGHUP:
            _detach_from_terminal()
        stopping.request(signum)  # raises StopNow when a pass or compile is under way (stopping.interruptible)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        stopping.reset()

    def __bool__(self) -> bool:
        return self.signum is not None

    def status(self) -> RunStatus:
        return stopped_by_signal(self.signum)


def _detach_from_terminal() -> None:
    """A hung-up terminal (closed SSH session) fails every write with EIO: send the rest of the output to
    /dev/null, so the save, the end event and exit code EXIT_STOPPED still happen."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if os.isatty(fd):
            os.dup2(devnull, fd)
    os.close(devnull)


def lr_for(cfg: TrainConfig, step: int, horizon: int) -> float:
    """The LR of `step` on a schedule decaying over `horizon` steps (cfg.steps unless a resume kept another)."""
    peak = peak_lr(cfg)
    return lr_at(step, lr=peak, min_lr=cfg.min_lr if cfg.min_lr is not None else default_min_lr(peak),
                 total_steps=horizon,
                 warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule, decay_frac=cfg.decay_frac)


class Meter:
    """On-device running sums, read (one host sync) only on logging steps.

    Checkpoints carry the open train-loss window (`checkpoint_fields`), so a run resumed mid-window logs the
    same mean loss and skipped count as one never interrupted; only timings (tok/s, ms) restart with the process.
    """

    WINDOW = ("loss", "good", "bad_streak")  # sums a checkpoint carries (`skipped` goes in as skipped_steps)

    def __init__(self, device: torch.device, start_step: int, skipped_before: int = 0,
                 window: dict[str, Any] | None = None) -> None:
        z = lambda: torch.zeros((), device=device)  # noqa: E731
        self.loss, self.good, self.skipped, self.bad_streak = z(), z(), z(), z()
        self.t0, self.step0, self.data_s = time.perf_counter(), start_step, 0.0
        self.window0, self.skipped_before = start_step, skipped_before  # window0: the loss window's first step
        ok = isinstance(window, dict) and isinstance(window.get("step0"), int) and 0 <= window["step0"] <= start_step
        if ok and all(isinstance(window.get(k), torch.Tensor) and window[k].numel() == 1 for k in self.WINDOW):
            for k in self.WINDOW:
                getattr(self, k).copy_(window[k].reshape(()))
            self.window0 = window["step0"]

    def checkpoint_fields(self, s: Session) -> dict[str, Any]:
        """The exact skipped count and the open loss window, for a checkpoint (a collective under torchrun)."""
        window = {k: getattr(self, k) for k in self.WINDOW} | {"step0": self.window0}
        # Every rank resumes with the ranks' mean as its sum, so the mean the next train line takes is unchanged.
        window["loss"] = dist_lib.mean_across_ranks(self.loss, s.dist)
        return {"skipped_steps": self.skipped_before + int(self.skipped.item()), "train_window": window}

    def add(self, step_loss: torch.Tensor, found_inf: torch.Tensor) -> None:
        self.loss += torch.where(found_inf.bool(), 0.0, step_loss)
        self.good += 1 - found_inf
        self.skipped += found_inf
        self.bad_streak = (self.bad_streak + found_inf) * found_inf

    def pause(self, seconds: float) -> None:
        """Evals and checkpoint snapshots are not training time."""
        self.t0 += seconds

    def read(self, s: Session, step: int, seq_len: int, lr: float, last_loss: torch.Tensor,
             grad_norm: torch.Tensor) -> dict[str, Any]:
        dev.synchronize(s.device)
        now, n = time.perf_counter(), step - self.step0
        tokens_per_step = s.cfg.batch_size * s.cfg.grad_accum * s.dist.world_size * seq_len
        tok_s = n * tokens_per_step / (now - self.t0)
        peak = dev.peak_flops(s.device)
        good = self.good.item()
        # A window of only skipped steps has no loss: NaN (null in train.jsonl), not a made-up 0.0.
        mean_loss = dist_lib.mean_across_ranks(self.loss, s.dist).item() / good if good else float("nan")
        last = dist_lib.mean_across_ranks(last_loss, s.dist).item()  # the global batch's loss, not rank 0's
        fields = {"tokens": s.prog.tokens, "loss": mean_loss, "last_loss": last, "lr": lr,
                  "grad_norm": grad_norm.item(), "tok_s": tok_s,
                  "mfu": tok_s * s.mcfg.flops_per_token(seq_len) / (peak * s.dist.world_size) if peak else None,
                  # The causal figure counts only unmasked attention (what the kernels run): both are reported.
                  "mfu_causal": tok_s * s.mcfg.flops_per_token(seq_len, causal=True) / (peak * s.dist.world_size)
                  if peak else None,
                  "seq_len": seq_len, "tokens_per_step": tokens_per_step, "step_ms": 1000 * (now - self.t0) / n,
                  "data_ms": 1000 * self.data_s / n, "skipped_steps": int(self.skipped.item()),
                  **dev.memory_stats(s.device)}
        self.loss.zero_()
        self.good.zero_()
        self.t0, self.step0, self.window0, self.data_s = now, step, step, 0.0
        return fields


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Train per `cfg`; returns the run's final figures. Resumes from the run dir when it can."""
    if cfg.device != "cpu":
        speed.configure_cuda_allocator()  # before open_session makes the first CUDA allocation
    stop = StopRequested()
    # Before anything is written: a SIGTERM while the session opens (wandb.init can stall for minutes)
    # only sets the flag, and the loop saves a resumable checkpoint at its first chance.
    stop.install()
    try:
        try:
            s = open_session(cfg, command)
        except RunComplete as done:
            print(done, file=sys.stderr, flush=True)
            return {"status": str(COMPLETE), "saved": True, "step": cfg.steps}
        try:
            status = _loop(s, stop)
            _finish(s, status)
        except ShardChanged as e:  # a shard changed under the run: keep the last full step, then one line
            raise _saved_before_stopping(s, e) from None
        finally:
            s.close()
            dist_lib.cleanup(s.dist)
    except OSError as e:
        raise disk_error(e, cfg.out_dir) from None
    finally:
        stop.restore()
    wandb_line = _wandb_line(s.info)
    if wandb_line:
        s.console.print(wandb_line)  # last, after wandb's own shutdown output
    return s.info["result"]


def _wandb_line(info: dict[str, Any]) -> str | None:
    if info.get("wandb_url"):
        return f"wandb: {info['wandb_url']}"
    if info.get("wandb_sync"):
        return f"wandb (offline): upload every session of this run with: {info['wandb_sync']}"
    return None


def disk_error(e: OSError, out_dir: str) -> Exception:
    """A full or read-only disk mid-run as one line naming the fix; any other OSError stays a bug report."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the disk of {out_dir}{where}; free disk space, then rerun the same "
                         "command to resume from the last checkpoint")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write to {out_dir}{where}: {os.strerror(e.errno)}; make it writable, then "
                         "rerun the same command to resume")
    return e


def _loop(s: Session, stop: StopRequested) -> RunStatus:
    cfg, prog = s.cfg, s.prog
    if dist_lib.any_rank(bool(stop), s.dist):  # a signal while the session opened: nothing to save yet
        return replace(stop.status(), before_first_step=True)
    stopping.arm(not s.dist.enabled)  # under torchrun ranks must agree: they check at step boundaries only
    try:
        if not s.resumed:
            s.evaluate()
            if cfg.analysis_every:
                run_diagnostics(s)
    except stopping.StopNow:  # nothing trained yet: the rerun starts here again
        return replace(stop.status(), before_first_step=True)
    meter = s.meter = Meter(s.device, prog.step, prog.skipped_steps, prog.train_window)
    skipped_before = prog.skipped_steps
    last_save = time.monotonic()
    t_start = time.monotonic() - prog.elapsed
    s.model.train()
    while prog.step < cfg.steps:
        data_state = s.loader.state_dict()  # where this step's data starts, should it be interrupted
        seq_len = seq_len_at(s.seq_points, prog.step)
        micro_batch, accum = micro_batch_at(s.micro_points, prog.step, cfg.batch_size, cfg.grad_accum)
        lr = lr_for(cfg, prog.step, s.lr_horizon)
        set_lr(s.optimizer, lr)
        step_loss = torch.zeros((), device=s.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            try:
                x, y = s.loader.next(micro_batch, seq_len)
            except ShardChanged as e:
                e.data_state = data_state  # type: ignore[attr-defined]  # where the unfinished step began
                raise
            meter.data_s += time.perf_counter() - t0
            try:
                # A stop may cut the micro-batch short (a first call compiles for minutes): its gradients
                # are dropped below, as for a stop between micro-batches.
                with stopping.interruptible(), dist_lib.maybe_no_sync(s.wrapped, sync=micro == accum - 1):
                    with s.autocast:
                        loss = s.wrapped(x, y) / accum
                    # Outside autocast, as the memory estimate assumes: its bf16 weight-cast cache is freed
                    # on leaving the context instead of living through backward.
                    s.scaler.scale(loss).backward()
                step_loss += loss.detach().float()
            except stopping.StopNow:
                pass
            if dist_lib.any_rank(bool(stop), s.dist):
                # Drop the partial step: the checkpoint holds the state after the last full step.
                s.optimizer.zero_grad(set_to_none=True)
                prog.elapsed = time.monotonic() - t_start
                s.save(data_state=data_state)
                return stop.status()

        s.scaler.unscale_(s.optimizer)
        grad_norm = dist_lib.clip_grad_norm(s.model, cfg.grad_clip or float("inf"), s.dist)
        found_inf = (~torch.isfinite(grad_norm) | ~torch.isfinite(step_loss)).float()
        if s.fp16:
            s.scaler.step(s.optimizer)  # GradScaler skips inf/nan steps itself
            s.scaler.update()
        else:
            step_unless_nonfinite(s.optimizer, found_inf)
        s.optimizer.zero_grad(set_to_none=True)
        meter.add(step_loss, found_inf)
        prog.step += 1
        prog.tokens += cfg.batch_size * cfg.grad_accum * s.dist.world_size * seq_len
        prog.elapsed = time.monotonic() - t_start

        if prog.step % cfg.log_every == 0 or prog.step == cfg.steps:
            fields = meter.read(s, prog.step, seq_len, lr, step_loss, grad_norm)
            prog.skipped_steps = skipped_before + fields["skipped_steps"]
            fields["skipped_steps"] = prog.skipped_steps
            s.emit("train", **fields)
            s.info.update(tok_s=fields["tok_s"], mfu=fields["mfu"], mfu_causal=fields["mfu_causal"])
            s.console.update(prog.step, fields)
            if cfg.max_bad_steps and meter.bad_streak.item() >= cfg.max_bad_steps:
                why = f"{int(meter.bad_streak.item())} non-finite steps in a row at step {prog.step}"
                s.console.print(f"error: {why}; the last good checkpoint is kept in {s.run_dir}: lower --lr "
                                f"(with --resume never --overwrite) or check the data")
                return stopped(why)
        if prog.step >= cfg.steps:
            break
        pause = time.perf_counter()
        best = False
        try:
            if cfg.eval_every and prog.step % cfg.eval_every == 0:
                best = s.evaluate()[1]
                if s.log:
                    write_plots(s.run_dir)
            if cfg.analysis_every and prog.step % cfg.analysis_every == 0:
                run_diagnostics(s)
            if cfg.sample_every and prog.step % cfg.sample_every == 0:
                s.sample()
            if cfg.downstream_every and prog.step % cfg.downstream_every == 0:
                s.downstream()
        except stopping.StopNow:  # step prog.step is whole: save it (an interrupted pass is not run again)
            s.save(best=best)
            return stop.status()
        late = bool(cfg.save_minutes) and time.monotonic() - last_save > 60 * cfg.save_minutes
        # Saving is a collective (RNG states, replica check, FSDP gathers): ranks must agree on the clock.
        due = (cfg.save_every and prog.step % cfg.save_every == 0) or dist_lib.any_rank(late, s.dist)
        if best or due:
            s.save(best=best)
            last_save = time.monotonic()
        meter.pause(time.perf_counter() - pause)
        if dist_lib.any_rank(bool(stop), s.dist):
            s.save()
            return stop.status()
    return COMPLETED


def _saved_before_stopping(s: Session, e: ShardChanged) -> UserError:
    """Save the state after the last full step (as a stop request does), log the end, return the one line."""
    s.optimizer.zero_grad(set_to_none=True)
    s.save(data_state=getattr(e, "data_state", None))  # None: between steps, the loader's state is exact
    _finish(s, stopped(str(e)))
    step = s.prog.step
    kept = (f"step {step} is saved in {s.run_dir / 'last.pt'}" if s.ckpt.last_saved_step == step
            else f"could not save step {step} ({s.ckpt.last_error})")
    return UserError(f"{e}; {kept}: then rerun the same command to resume")


def _finish(s: Session, status: RunStatus) -> None:
    prog = s.prog
    final_val = None
    if status.kind is Ending.COMPLETED:
        best = False
        try:
            final_val, best = s.evaluate()
            if s.cfg.analysis_every:
                run_diagnostics(s)
            if s.cfg.sample_every:
                s.sample()
            if s.cfg.hellaswag:
                s.downstream()
        except stopping.StopNow:  # the last step is whole; the rerun resumes at it and runs the final passes again
            status, final_val = stopping.status(), None
        s.save(best=best)
    s.ckpt.wait()
    # Only rank 0 writes; a stop for non-finite steps deliberately saves nothing.
    untouched = status.before_first_step  # the run dir's checkpoint (if any) is still current
    saved = (not s.dist.is_main or status.kind is Ending.STOPPED_ERROR or untouched
             or s.ckpt.last_saved_step == prog.step)
    if not saved:
        step = latest_step(s.run_dir)
        kept = "no checkpoint was saved" if step is None else f"the newest checkpoint is step {step}"
        if s.ckpt.last_error_kind == "nonfinite":
            s.console.print(f"error: could not save step {prog.step}: the weights became NaN/inf (training "
                            f"diverged); {kept}: restart with a lower --lr (--resume never --overwrite) or "
                            "check the data")
        else:
            s.console.print(f"error: could not save step {prog.step} ({s.ckpt.last_error}); {kept}: "
                            f"{s.ckpt.last_error_fix}, then rerun the same command to resume")
        status = status.with_failed_save()
    elif untouched:
        s.console.print(f"{status}: nothing new was trained; rerun the same command to continue")
    elif status.by_signal:
        s.console.print(f"{status}: saved step {prog.step} to {s.run_dir / 'last.pt'}; "
                        f"rerun the same command to resume")
    result = {"status": str(status), "saved": saved, "step": prog.step, "tokens": prog.tokens,
              "final_val_loss": final_val, "best_val_loss": prog.best_val, "skipped_steps": prog.skipped_steps,
              "elapsed_s": prog.elapsed,
              "compile": speed.compile_counts() if s.cfg.compile else None}  # what dynamo did (speed.py)
    s.info["result"] = result
    if s.log:
        s.log.event("end", **result)
        if not status.by_signal:  # seconds of matplotlib a preemption may not have; the
            write_plots(s.run_dir)  # plots of the last eval stay, and the rerun draws them again
        write_summary(s.run_dir, s.info | result | {"steps": prog.step, "total_steps": s.cfg.steps})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    if not cfg.data:  # the trainer's one required flag (the launcher may plan without data)
        raise UserError("--data is required: a dataset dir made by prepare_fineweb.py --output, a legacy .npy "
                        "or a quoted glob of .npy shards")
    args = sys.argv[1:] if argv is None else argv
    result = train(cfg, command=format_command(["python", "train_v29.py", *args]))
    if not result["saved"]:
        return 1
    status = RunStatus.parse(result["status"])
    if status is not None and status.finished:
        return 0
    if status is None or not status.by_signal:
        return 1
    # torchrun turns any non-zero worker code into its own failure (exit 1 and a ChildFailedError report), so
    # its ranks end a stopped run with 0, as they always did; train.jsonl's `end` event still says "stopped".
    return EXIT_STOPPED if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else 0
