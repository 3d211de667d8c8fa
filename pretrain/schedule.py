"""Step-indexed schedules shared by trainer and launcher: sequence length, learning rate, token plan."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pretrain.errors import UserError


@dataclass(frozen=True)
class Phase:
    """A stretch of training at one sequence length, from `start_step` (inclusive) to `end_step` (exclusive)."""

    start_step: int
    end_step: int
    seq_len: int

    @property
    def steps(self) -> int:
        return max(0, self.end_step - self.start_step)


def parse_seq_schedule(spec: str, default_seq_len: int, block_size: int) -> list[tuple[int, int]]:
    """Parse "512@0,1024@2000" into [(0, 512), (2000, 1024)], validated against the model's block size.

    An empty spec means one phase at `default_seq_len`. A schedule whose first entry starts after step 0
    runs at `default_seq_len` until then.
    """
    if not spec.strip():
        points = [(0, default_seq_len)]
    else:
        points = []
        for part in spec.split(","):
            part = part.strip()
            try:
                length, start = part.split("@")
                points.append((int(start), int(length)))
            except ValueError:
                raise UserError(
                    f"--seq-schedule entry {part!r} is not LEN@STEP; write e.g. \"512@0,1024@2000\""
                ) from None
        if points[0][0] != 0:
            points.insert(0, (0, default_seq_len))
    for (s0, _), (s1, _) in zip(points, points[1:]):
        if s1 <= s0:
            raise UserError(f"--seq-schedule steps must increase strictly, got {s0} then {s1}")
    for start, length in points:
        if start < 0 or length <= 0:
            raise UserError(f"--seq-schedule entry {length}@{start} must have a positive length and step >= 0")
        if length > block_size:
            raise UserError(
                f"--seq-schedule length {length} exceeds the model's block size {block_size}; "
                f"raise --block-size to at least {length} or shorten the schedule"
            )
    return points


def phases(points: list[tuple[int, int]], total_steps: int) -> list[Phase]:
    """Phases that actually run within `total_steps` (entries starting at or past the end are dropped)."""
    out = []
    for i, (start, length) in enumerate(points):
        if start >= total_steps:
            break
        end = points[i + 1][0] if i + 1 < len(points) else total_steps
        out.append(Phase(start, min(end, total_steps), length))
    return out


def seq_len_at(points: list[tuple[int, int]], step: int) -> int:
    """Sequence length used by optimizer step `step` (0-based)."""
    length = points[0][1]
    for start, seq in points:
        if step >= start:
            length = seq
    return length


def parse_micro_batch_schedule(spec: str, sequences_per_step: int) -> list[tuple[int, int]]:
    """Parse --micro-batch-schedule "16@0,8@500" into [(0, 16), (500, 8)] ([] when empty).

    Each entry is the micro-batch from that step on. The sequences of one optimizer step stay
    `sequences_per_step` (--batch-size x --grad-accum): accumulation becomes sequences_per_step / micro-batch,
    so every micro-batch must divide it. The sampler hands out consecutive windows whatever the split, so a
    step trains on the same sequences with any schedule and a resume continues it exactly.
    """
    if not spec.strip():
        return []
    points: list[tuple[int, int]] = []
    for part in spec.split(","):
        try:
            size, start = part.strip().split("@")
            points.append((int(start), int(size)))
        except ValueError:
            raise UserError(f"--micro-batch-schedule entry {part.strip()!r} is not MICRO@STEP; write e.g. "
                            "\"16@0,8@500\"") from None
    if points[0][0] != 0:
        raise UserError(f"--micro-batch-schedule must start at step 0, got {points[0][1]}@{points[0][0]}; "
                        f"add an entry @0")
    for (s0, _), (s1, _) in zip(points, points[1:]):
        if s1 <= s0:
            raise UserError(f"--micro-batch-schedule steps must increase strictly, got {s0} then {s1}")
    for _, size in points:
        if size <= 0 or sequences_per_step % size:
            raise UserError(f"--micro-batch-schedule micro-batch {size} must divide the {sequences_per_step} "
                            f"sequences per step (--batch-size x --grad-accum); use a divisor of it")
    return points


def micro_batch_at(points: list[tuple[int, int]], step: int, batch_size: int, grad_accum: int) -> tuple[int, int]:
    """(micro-batch, accumulation) of optimizer step `step`: the schedule's entry, else --batch-size/--grad-accum."""
    if not points:
        return batch_size, grad_accum
    micro = points[0][1]
    for start, size in points:
        if step >= start:
            micro = size
    return micro, batch_size * grad_accum // micro


def format_step_schedule(points: list[tuple[int, int]]) -> str:
    """[(0, 16), (500, 8)] -> "16@0,8@500" (the flag's own syntax)."""
    return ",".join(f"{value}@{start}" for start, value in points)


def eval_seq_len_at(points: list[tuple[int, int]], step: int, explicit: int | None = None) -> int:
    """Sequence length of an evaluation after `step` optimizer steps.

    An explicit --eval-seq-len wins. Otherwise the longest length trained so far (steps 0 .. step-1; at step 0
    the first phase's length): validation never measures a length the model has not trained at, and the
    figure never shrinks if a schedule goes back to shorter sequences.
    """
    if explicit:
        return explicit
    return max(length for start, length in points if start < max(step, 1))


def planned_tokens(points: list[tuple[int, int]], steps: int, sequences_per_step: int) -> int:
    """Tokens consumed by `steps` optimizer steps of `sequences_per_step` sequences each."""
    return sum(p.steps * p.seq_len * sequences_per_step for p in phases(points, steps))


def steps_for_tokens(points: list[tuple[int, int]], target_tokens: int, sequences_per_step: int) -> int:
    """The fewest steps whose planned tokens reach `target_tokens` under the schedule."""
    if target_tokens <= 0:
        raise UserError(f"the token budget must be positive, got {target_tokens}")
    done, step = 0, 0
    for i, (start, length) in enumerate(points):
        per_step = length * sequences_per_step
        end = points[i + 1][0] if i + 1 < len(points) else None
        need = math.ceil((target_tokens - done) / per_step)
        if end is None or start + need <= end:
            return start + need
        done += (end - start) * per_step
        step = end
    return step


def _constant(step: int, lr: float, min_lr: float, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    return lr


def _cosine(step: int, lr: float, min_lr: float, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _wsd_decay_start(total_steps: int, decay_frac: float) -> int:
    return total_steps - max(1, round(total_steps * decay_frac))


def _wsd(step: int, lr: float, min_lr: float, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    decay_start = _wsd_decay_start(total_steps, decay_frac)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / (total_steps - decay_start))
    return lr + (min_lr - lr) * progress


@dataclass(frozen=True)
class LRSchedule:
    """One --lr-schedule: its LR after warmup (step, lr, min_lr, total_steps, warmup_steps, decay_frac), and for a
    schedule that holds the LR before it decays, the step its decay starts at (total_steps, decay_frac)."""

    name: str
    summary: str  # one line for --help
    after_warmup: Callable[[int, float, float, int, int, float], float]
    decay_start: Callable[[int, float], int] | None = None


LR_SCHEDULES: dict[str, LRSchedule] = {s.name: s for s in (
    LRSchedule("cosine", "half-cosine from lr to min_lr at the last step", _cosine),
    LRSchedule("wsd", "warmup-stable-decay: constant, then linear to min_lr over the last --decay-frac", _wsd,
               decay_start=_wsd_decay_start),
    LRSchedule("constant", "lr throughout", _constant),
)}


TRAINER_WARMUP_STEPS = 100  # train_v29.py used directly: a fixed warmup, as before
LAUNCHER_WARMUP = "2% of steps, at most 2000"


def default_warmup_steps(steps: int) -> int:
    """The launcher's warmup: 2 % of the run, at most 2000 steps, so a short run reaches its peak LR and a long
    one does not spend thousands of steps warming up. The trainer alone keeps TRAINER_WARMUP_STEPS (its
    --warmup-steps default); the launcher always passes this value explicitly."""
    return min(2000, math.ceil(0.02 * steps))


def default_min_lr(lr: float) -> float:
    """The final LR when --min-lr is not given: a tenth of the peak."""
    return lr / 10


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    decay_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr, then:
    cosine: half-cosine from lr to min_lr at the last step;
    wsd: warmup-stable-decay (constant, then linear to min_lr over the last `decay_frac` of steps);
    constant: lr.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return LR_SCHEDULES[schedule].after_warmup(step, lr, min_lr, total_steps, warmup_steps, decay_frac)


def lr_horizon_on_resume(schedule: str, horizon: int, steps: int, step: int, decay_frac: float = 0.2) -> int:
    """The step count the LR schedule decays over after a run of `horizon` steps resumes at `step` with `steps`.

    The learning rate must not jump at a resume, so a changed --steps keeps the original horizon (a cosine run
    extended past it continues at min_lr) with one exception: a wsd run still in its stable phase under both
    horizons takes the new one, so it simply decays later (or earlier), as if it had been planned that way.
    """
    entry = LR_SCHEDULES.get(schedule)
    if steps == horizon or entry is None or entry.decay_start is None:
        return horizon
    start = entry.decay_start
    return steps if step <= min(start(horizon, decay_frac), start(steps, decay_frac)) else horizon


def describe_lr_extension(schedule: str, horizon: int, steps: int, step: int, decay_frac: float = 0.2) -> str:
    """One sentence on what resuming at `step` with `steps` (planned over `horizon`) does to the LR."""
    if steps == horizon:
        return "LR schedule unchanged"
    new = lr_horizon_on_resume(schedule, horizon, steps, step, decay_frac)
    if schedule == "constant":
        return "LR stays constant"
    if new == steps:
        return f"wsd still in its stable phase: the decay moves to the last {decay_frac:.0%} of {steps:,} steps"
    beyond = f"; from step {horizon:,} on it stays at min_lr" if steps > horizon else ""
    return f"LR keeps its {schedule} schedule over the original {horizon:,} steps{beyond}"


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str, what: str = "--tokens") -> int:
    """Parse 500K / 100M / 1B / 2.5B / 2000000 into an integer count; anything else is a UserError."""
    s = str(text).strip().upper().replace("_", "").replace(",", "")
    mult = 1
    if s and s[-1] in _SUFFIXES:
        mult, s = _SUFFIXES[s[-1]], s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a number; write e.g. 500K, 100M, 10B or 2000000") from None
    if not math.isfinite(value) or value * mult < 1:
        raise UserError(f"{what} must be a positive number, got {text!r}")
    return int(round(value * mult))
