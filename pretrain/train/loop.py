"""The training loop: `train` opens a run (session.py), steps it (`train_step`, one screen), runs the evals due
(instruments.py), saves on schedule and on a stop, and ends it (`_finish`: final evals, end event, summary).

Stop requests (StopRequested) are served at every micro-batch; a partial step is never saved.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from pretrain import invocation, stopping
from pretrain.data.shards import ShardChanged
from pretrain.errors import EXIT_STOPPED, UserError
from pretrain.runstatus import COMPLETE, COMPLETED, Ending, RunStatus, stopped, stopped_by_signal
from pretrain.schedule import default_min_lr, lr_at, micro_batch_at, seq_len_at
from pretrain.track.plots import write_plots
from pretrain.track.summary import write_summary
from pretrain.track.wandb_run import wandb_location
from pretrain.train import distributed as dist_lib
from pretrain.train import mirror as mirror_lib
from pretrain.train import speed
from pretrain.train.checkpoint import latest_step
from pretrain.train.config import TrainConfig, format_command, parse_config
from pretrain.train.instruments import downstream, evaluate, run_diagnostics, sample
from pretrain.train.meter import Meter
from pretrain.train.optim import peak_lr, set_lr, step_unless_nonfinite
from pretrain.train.session import RunComplete, open_session, save
from pretrain.train.state import RunState
from pretrain.train.weight_cache import cache_dtype, kept_casts_dtype, weights_cast_once


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
        stopping.request(signum, frame)  # raises StopNow when a pass or compile is under way (stopping.interruptible)

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
        s.track.console.print(wandb_line)  # last, after wandb's own shutdown output
    return s.info["result"]


def _wandb_line(info: dict[str, Any]) -> str | None:
    return wandb_location(info.get("wandb_url"), info.get("wandb_sync"))


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


def _loop(s: RunState, stop: StopRequested) -> RunStatus:
    """Step until cfg.steps, logging, evaluating and saving on their schedules; returns how the run ended."""
    cfg, prog = s.cfg, s.prog
    if dist_lib.any_rank(bool(stop), s.dist):  # a signal while the session opened: nothing to save yet
        return replace(stop.status(), before_first_step=True)
    stopping.arm(not s.dist.enabled)  # under torchrun ranks must agree: they check at step boundaries only
    try:
        if not s.resumed:
            evaluate(s)
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
        step = train_step(s, stop, meter, data_state)
        prog.elapsed = time.monotonic() - t_start
        if step is None:  # stopped mid-step: the checkpoint holds the state after the last full step
            save(s, data_state=data_state)
            return stop.status()
        if prog.step % cfg.log_every == 0 or prog.step == cfg.steps:
            if diverged := _log_step(s, meter, step, skipped_before):
                return diverged
        if prog.step >= cfg.steps:
            break
        pause = time.perf_counter()
        best, interrupted = _run_due_instruments(s)
        if interrupted:  # step prog.step is whole: save it (an interrupted pass is not run again)
            save(s, best=best)
            return stop.status()
        late = bool(cfg.save_minutes) and time.monotonic() - last_save > 60 * cfg.save_minutes
        # Saving is a collective (RNG states, replica check, FSDP gathers): ranks must agree on the clock.
        due = (cfg.save_every and prog.step % cfg.save_every == 0) or dist_lib.any_rank(late, s.dist)
        if best or due:
            save(s, best=best)
            last_save = time.monotonic()
        meter.pause(time.perf_counter() - pause)
        if dist_lib.any_rank(bool(stop), s.dist):
            save(s)
            return stop.status()
    return COMPLETED


class Step(NamedTuple):
    """What one finished step reports to the train line."""

    seq_len: int
    lr: float
    loss: torch.Tensor  # the global batch's loss on this rank (on device)
    grad_norm: torch.Tensor


def train_step(s: RunState, stop: StopRequested, meter: Meter, data_state: dict[str, Any]) -> Step | None:
    """One optimizer step over the step's micro-batches; None when a stop came first (its gradients dropped)."""
    cfg, prog = s.cfg, s.prog
    seq_len = seq_len_at(s.sched.seq_points, prog.step)
    micro_batch, accum = micro_batch_at(s.sched.micro_points, prog.step, cfg.batch_size, cfg.grad_accum)
    lr = lr_for(cfg, prog.step, s.sched.lr_horizon)
    set_lr(s.optimizer, lr)
    step_loss = torch.zeros((), device=s.device)
    # --bf16-weight-cache: the weights cast once for all micro-batches, the Parameters back before the update. On CPU
    # the casts are kept between steps and written by the update (model/weight_casts.py).
    kept = kept_casts_dtype(cfg, s.device)
    with weights_cast_once(s.model, kept or cache_dtype(cfg), kept=kept is not None):
        for micro in range(accum):
            x, y = _next_batch(s, meter, micro_batch, seq_len, data_state)
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
                s.optimizer.zero_grad(set_to_none=True)
                return None

    s.scaler.unscale_(s.optimizer)
    # Without GradScaler the clip's factor can ride into the update (FusedAdamW.fold_grad_factor on CPU).
    fold = None if s.fp16 else getattr(s.optimizer, "fold_grad_factor", None)
    grad_norm = dist_lib.clip_grad_norm(s.model, cfg.grad_clip or float("inf"), s.dist, fold)
    found_inf = (~torch.isfinite(grad_norm) | ~torch.isfinite(step_loss)).float()
    if s.fp16:
        s.scaler.step(s.optimizer)  # GradScaler skips inf/nan steps itself
        s.scaler.update()
    else:
        step_unless_nonfinite(s.optimizer, found_inf)  # on device, no host sync
    s.optimizer.zero_grad(set_to_none=True)
    meter.add(step_loss, found_inf)
    prog.step += 1
    prog.tokens += cfg.batch_size * cfg.grad_accum * s.dist.world_size * seq_len
    return Step(seq_len, lr, step_loss, grad_norm)


def _next_batch(s: RunState, meter: Meter, micro_batch: int, seq_len: int,
                data_state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next micro-batch, its wait counted as data time; a shard changed under the run carries where the
    unfinished step began, so the save that follows resumes at it."""
    t0 = time.perf_counter()
    try:
        x, y = s.loader.next(micro_batch, seq_len)
    except ShardChanged as e:
        e.data_state = data_state  # type: ignore[attr-defined]
        raise
    meter.data_s += time.perf_counter() - t0
    return x, y


def _log_step(s: RunState, meter: Meter, step: Step, skipped_before: int) -> RunStatus | None:
    """The train line (one host sync); a stop status when --max-bad-steps non-finite steps came in a row."""
    prog = s.prog
    fields = meter.read(s, prog.step, step.seq_len, step.lr, step.loss, step.grad_norm)
    prog.skipped_steps = skipped_before + fields["skipped_steps"]
    fields["skipped_steps"] = prog.skipped_steps
    s.emit("train", **fields)
    s.info.update(tok_s=fields["tok_s"], mfu=fields["mfu"], mfu_causal=fields["mfu_causal"])
    s.track.console.update(prog.step, fields)
    if s.cfg.max_bad_steps and meter.bad_streak.item() >= s.cfg.max_bad_steps:
        why = f"{int(meter.bad_streak.item())} non-finite steps in a row at step {prog.step}"
        s.track.console.print(f"error: {why}; the last good checkpoint is kept in {s.run_dir}: lower --lr "
                              f"(with --resume never --overwrite) or check the data")
        return stopped(why)
    return None


def _run_due_instruments(s: RunState) -> tuple[bool, bool]:
    """The evals, diagnostics, samples and downstream due at this step; returns (new best, interrupted)."""
    cfg, step, best = s.cfg, s.prog.step, False
    try:
        if cfg.eval_every and step % cfg.eval_every == 0:
            best = evaluate(s)[1]
            if s.track.log:
                write_plots(s.run_dir)
        if cfg.analysis_every and step % cfg.analysis_every == 0:
            run_diagnostics(s)
        if cfg.sample_every and step % cfg.sample_every == 0:
            sample(s)
        if cfg.downstream_every and step % cfg.downstream_every == 0:
            downstream(s)
    except stopping.StopNow:
        return best, True
    return best, False


def _saved_before_stopping(s: RunState, e: ShardChanged) -> UserError:
    """Save the state after the last full step (as a stop request does), log the end, return the one line."""
    s.optimizer.zero_grad(set_to_none=True)
    save(s, data_state=getattr(e, "data_state", None))  # None: between steps, the loader's state is exact
    _finish(s, stopped(str(e)))
    step = s.prog.step
    kept = (f"step {step} is saved in {s.run_dir / 'last.pt'}" if s.ckpt.last_saved_step == step
            else f"could not save step {step} ({s.ckpt.last_error})")
    return UserError(f"{e}; {kept}: then rerun the same command to resume")


def _final_passes(s: RunState, status: RunStatus) -> tuple[RunStatus, float | None]:
    """A completed run's last eval, diagnostics, sample and downstream, then its final save; returns the status
    (a stop if one came meanwhile) and the final validation loss."""
    best, final_val = False, None
    try:
        final_val, best = evaluate(s)
        if s.cfg.analysis_every:
            run_diagnostics(s)
        if s.cfg.sample_every:
            sample(s)
        if s.cfg.hellaswag:
            downstream(s)
    except stopping.StopNow:  # the last step is whole; the rerun resumes at it and runs the final passes again
        status, final_val = stopping.status(), None
    save(s, best=best)
    return status, final_val


def _finish(s: RunState, status: RunStatus) -> None:
    """Wait for the last save, say what was kept, write the `end` event, plots and summary.md."""
    prog = s.prog
    final_val = None
    if status.kind is Ending.COMPLETED:
        status, final_val = _final_passes(s, status)
    s.ckpt.wait()
    if s.mirror:  # summary.md reports what reached the mirror
        s.info["mirror"] = s.mirror.drain(mirror_lib.FINAL_WAIT_S if status.finished else mirror_lib.STOP_WAIT_S)
    # Only rank 0 writes; a stop for non-finite steps deliberately saves nothing.
    untouched = status.before_first_step  # the run dir's checkpoint (if any) is still current
    saved = (not s.dist.is_main or status.kind is Ending.STOPPED_ERROR or untouched
             or s.ckpt.last_saved_step == prog.step)
    if not saved:
        step = latest_step(s.run_dir)
        kept = "no checkpoint was saved" if step is None else f"the newest checkpoint is step {step}"
        if s.ckpt.last_error_kind == "nonfinite":
            s.track.console.print(f"error: could not save step {prog.step}: the weights became NaN/inf (training "
                            f"diverged); {kept}: restart with a lower --lr (--resume never --overwrite) or "
                            "check the data")
        else:
            s.track.console.print(f"error: could not save step {prog.step} ({s.ckpt.last_error}); {kept}: "
                            f"{s.ckpt.last_error_fix}, then rerun the same command to resume")
        status = status.with_failed_save()
    elif untouched:
        s.track.console.print(f"{status}: nothing new was trained; rerun the same command to continue")
    elif status.by_signal:
        s.track.console.print(f"{status}: saved step {prog.step} to {s.run_dir / 'last.pt'}; "
                        f"rerun the same command to resume")
    result = {"status": str(status), "saved": saved, "step": prog.step, "tokens": prog.tokens,
              "final_val_loss": final_val, "best_val_loss": prog.best_val, "skipped_steps": prog.skipped_steps,
              "elapsed_s": prog.elapsed,
              "compile": speed.compile_counts() if s.cfg.compile else None}  # what dynamo did (speed.py)
    s.info["result"] = result
    if s.track.log:
        s.track.log.event("end", **result)
        if not status.by_signal:  # seconds of matplotlib a preemption may not have; the
            write_plots(s.run_dir)  # plots of the last eval stay, and the rerun draws them again
        write_summary(s.run_dir, s.info | result | {"steps": prog.step, "total_steps": s.cfg.steps})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    if not cfg.data:  # the trainer's one required flag (the launcher may plan without data)
        raise UserError("--data is required: a dataset dir made by prepare_fineweb.py --output, a legacy .npy "
                        "or a quoted glob of .npy shards")
    args = sys.argv[1:] if argv is None else argv
    result = train(cfg, command=format_command([*invocation.command("train"), *args]))  # as the user can rerun it
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
