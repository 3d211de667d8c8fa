"""What the trainer shows in the terminal: a rich live view on a TTY, plain llm.c-style lines otherwise.

Metric keys understood (all optional, None or missing is skipped): loss, lr, grad_norm (or gnorm),
tok_s, mfu (a fraction, 0.381 -> "38.1%"), step_ms, mem_peak_gb / mem_reserved_gb / mem_alloc_gb /
mem_rss_gb / mem_gb (first present wins), skipped_steps or skipped (count of non-finite steps), eta_s.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from pretrain.units import finite_number
from pretrain.units import fmt_duration as format_duration  # the one duration format (eta)

MODES = ("auto", "rich", "basic", "off")
_MEM_KEYS = ("mem_peak_gb", "mem_reserved_gb", "mem_alloc_gb", "mem_rss_gb", "mem_gb")


def _get(metrics: Mapping[str, Any], *keys: str) -> float | None:
    """First number among keys, NaN/inf included (a NaN loss is shown as nan); rates use `_finite`."""
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _finite(metrics: Mapping[str, Any], key: str) -> float | None:
    return finite_number(metrics.get(key))


def format_rate(tok_s: float) -> str:
    """41234 -> '41.2k', 1.5e6 -> '1.50M'."""
    if tok_s >= 1e6:
        return f"{tok_s / 1e6:.2f}M"
    if tok_s >= 1e3:
        return f"{tok_s / 1e3:.1f}k"
    return f"{tok_s:.0f}"


def metric_parts(metrics: Mapping[str, Any]) -> list[str]:
    """The ' | '-separated pieces after the step counter, in a fixed order."""
    parts = []
    if (loss := _get(metrics, "loss")) is not None:
        parts.append(f"loss {loss:.4f}")
    if (lr := _get(metrics, "lr")) is not None:
        parts.append(f"lr {lr:.2e}")
    if (gnorm := _get(metrics, "grad_norm", "gnorm")) is not None:
        parts.append(f"gnorm {gnorm:.2f}")
    if (tok_s := _finite(metrics, "tok_s")) is not None:
        parts.append(f"{format_rate(tok_s)} tok/s")
    if (mfu := _finite(metrics, "mfu")) is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    if (ms := _finite(metrics, "step_ms")) is not None:
        parts.append(f"{ms:.0f}ms")
    if (mem := _get(metrics, *_MEM_KEYS)) is not None:
        parts.append(f"mem {mem:.1f}GB")
    if (skipped := _get(metrics, "skipped_steps", "skipped")) is not None and skipped > 0:
        parts.append(f"skipped {int(skipped)}")
    if (eta := _finite(metrics, "eta_s")) is not None:
        parts.append(f"eta {format_duration(eta)}")
    return parts


def format_train_line(step: int, total_steps: int, metrics: Mapping[str, Any]) -> str:
    """'step   120/2000 | loss 4.2310 | lr 3.00e-04 | gnorm 0.91 | 41.2k tok/s | mfu 38.1% | 512ms | ...'."""
    if total_steps and total_steps > 0:
        head = f"step {step:>{max(5, len(str(total_steps)))}}/{total_steps}"
    else:
        head = f"step {step:>5}"
    return " | ".join([head, *metric_parts(metrics)])


def format_eval_line(step: int, metrics: Mapping[str, Any]) -> str:
    """'eval step 120 | seq 512 | val loss 4.1021 | ppl 60.45 | best 4.0012' (for Console.print)."""
    parts = [f"eval step {step}"]
    if (seq := _get(metrics, "seq_len")) is not None:
        parts.append(f"seq {int(seq)}")
    if (loss := _get(metrics, "val_loss", "loss")) is not None:
        parts.append(f"val loss {loss:.4f}")
        if math.isfinite(loss) and loss < 700:
            parts.append(f"ppl {math.exp(loss):.2f}")
    if (best := _get(metrics, "best")) is not None:
        parts.append(f"best {best:.4f}")
    return " | ".join(parts)


class _Eta:
    """Remaining time from this session's own pace (resumed steps done earlier do not count)."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None

    def __call__(self, step: int, total: int) -> float | None:
        now = time.monotonic()
        if self._first is None or step < self._first[1]:
            self._first = (now, step)
            return None
        t0, s0 = self._first
        if not total or step <= s0:
            return None
        return (now - t0) / (step - s0) * max(0, total - step)


class Console:
    """Progress output. mode: auto (rich on a TTY, else basic) | rich | basic | off.

    `print` writes messages/warnings above the live view; in `off` mode they still go to stderr so that
    warnings are never lost, only the per-step lines are silenced.
    """

    def __init__(self, mode: str = "auto", total_steps: int = 0, start_step: int = 0,
                 file: TextIO | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"console mode must be one of {MODES}, got {mode!r}")
        self.file = file if file is not None else sys.stdout
        if mode == "auto":
            isatty = getattr(self.file, "isatty", lambda: False)
            mode = "rich" if isatty() and os.environ.get("TERM") != "dumb" else "basic"
        self.mode = mode
        self.total_steps = int(total_steps or 0)
        self._eta = _Eta()
        self._live = None
        if mode == "rich":
            self._start_rich(start_step)

    def _start_rich(self, start_step: int) -> None:
        from rich.console import Console as RichConsole
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        # force_terminal: an explicit --live rich means "draw it" even when stdout is a pipe or a buffer.
        self._rich = RichConsole(file=self.file, force_terminal=True)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
            console=self._rich,
        )
        self._task = self._progress.add_task(
            "train", total=self.total_steps or None, completed=start_step, eta="-")
        self._metrics_text = Text("waiting for the first step...")
        # Redraw only on update/print: a timer refresh would stream escape codes 4x a second into
        # whatever captures stdout (wandb's console log, nohup files).
        self._live = Live(Group(self._progress, self._metrics_text), console=self._rich,
                          auto_refresh=False, transient=False)
        self._live.start()

    def update(self, step: int | Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> None:
        """Show the metrics of `step` (also accepts update(metrics) with a 'step' key)."""
        if isinstance(step, Mapping):
            metrics, step = step, int(step.get("step", 0))
        metrics = dict(metrics or {})
        if self.mode == "off":
            return
        eta = self._eta(step, self.total_steps)
        if eta is not None and "eta_s" not in metrics:
            metrics["eta_s"] = eta
        if self.mode == "basic":
            print(format_train_line(step, self.total_steps, metrics), file=self.file, flush=True)
        elif self._live is not None:
            self._progress.update(self._task, completed=step,
                                  eta=format_duration(eta) if eta is not None else "-")
            metrics.pop("eta_s", None)  # the bar already shows it
            self._metrics_text.plain = " | ".join(metric_parts(metrics)) or "-"
            self._live.refresh()

    def print(self, line: str) -> None:
        """A message or warning, printed above the live view."""
        if self._live is not None:
            self._rich.print(line, markup=False, highlight=False)
        elif self.mode == "off":
            print(line, file=sys.stderr, flush=True)
        else:
            print(line, file=self.file, flush=True)

    def close(self) -> None:
        """Stop the live view (leaves its last frame on screen); safe to call twice."""
        if self._live is not None:
            self._live.stop()
            self._live = None
            self.mode = "basic"  # later print() calls fall back to plain lines

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
