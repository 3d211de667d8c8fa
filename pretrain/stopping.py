"""A stop request ends any long pass of the trainer within ~2 s: the request, the regions it cuts short, the exception.

The trainer's signal handler (pretrain/train/loop.py `StopRequested`: SIGTERM, SIGINT, SIGUSR1, SIGHUP) records
the request here. Long work runs inside `interruptible()` regions: the eval batches, the multi-length eval,
diagnostics, sampling, downstream scoring, and each micro-batch's forward/backward (whose first call compiles
for up to minutes and cannot poll a flag). Inside a region the handler raises `StopNow` at once; it unwinds to
the training loop, which saves the state of the last full step, and the trainer exits `EXIT_STOPPED`
(pretrain/errors.py). A region holds only work that changes no state the checkpoint holds, or whose partial
effects the stop path discards (a micro-batch's gradients): never the optimizer step, a checkpoint snapshot,
or a train.jsonl write. A request that came outside any region raises on entering the next one (`check`).

In-pass stops are off until the loop `arm`s them: a command that never installed the trainer's handler
(`python -m pretrain.evals.downstream`) is never stopped this way, and under torchrun, where every rank must
stop after the same step, the loop only checks the flag at step boundaries (all ranks agree there).
Signals are process-wide, so is this state.

A raise from a signal handler lands wherever the main thread is, and Python drops an exception raised inside a
weakref callback or `__del__` (torch.compile runs those often). So while the request is not yet served and a
region is open, a timer (SIGALRM every RETRY_S) raises StopNow again, and Python's report of a dropped StopNow
("Exception ignored in ...", a traceback on a clean stop) is silenced (`sys.unraisablehook`, other reports kept).

Nor may it land in Python that C++ called through pybind11 on a path that cannot carry an exception: seen in CI, a
SIGTERM during the first compile arrived in torch/_library's `find_torch_dispatch_rule` (called by torch's C++
dispatcher) and the trainer died in `std::terminate` instead of saving. So the handler raises only when the
interrupted frame is in code that Python called: not in installed packages, except this repo's own and torch's
tracing and compiling packages (their errors reach the caller as exceptions), and not inside a `__torch_dispatch__`
handler, where unwinding meets the dispatcher's C++ mode guards (also seen: "trying to set the current
FakeTensorMode, but one already exists", then std::terminate). Anywhere else it waits for the timer's next tick, a
quarter second later.
"""

from __future__ import annotations

import functools
import os
import signal
import site
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pretrain.runstatus import RunStatus, stopped_by_signal


class StopNow(BaseException):
    """A stop request cut a long pass short. BaseException, like KeyboardInterrupt: library code that catches
    Exception (torch.compile's suppress_errors, tracker clients) must not swallow it."""


RETRY_S = 0.25
# Autograd's anomaly mode (AOTAutograd turns it on while it traces a compiled backward) warns with the forward's
# traceback when an error leaves a backward node: after a stop request that error is StopNow unwinding, and the
# user would read a traceback where the run stopped cleanly. Ignored from the request until reset().
_ANOMALY_MESSAGE = r"Error detected in \w+\. Traceback of forward call"

_signum: int | None = None
_armed = False
_regions = 0  # depth of interruptible() regions the main thread is in
_previous_alarm: Any = None  # the SIGALRM handler before ours, while the retry timer runs
_previous_unraisable: Any = None  # sys.unraisablehook before ours, from a request until reset()
# Installed code where a raise may land: this repo's packages (wherever installed) and torch's tracing/compiling ones,
# as path prefixes ("fx/graph": graph.py and graph_module.py). Not torch/_library, torch/_ops, fx/experimental's
# SymNode, sympy, ...: Python that torch's C++ calls.
_OWN = ("pretrain", "model")
_TORCH = ("_dynamo/", "_inductor/", "_functorch/", "fx/graph", "fx/interpreter.py", "fx/proxy.py",
          "fx/experimental/proxy_tensor.py", "nn/", "_subclasses/")


def reset() -> None:
    """Forget any request and disarm (a trainer starting or ending in this process)."""
    global _signum, _armed, _regions
    _stop_retrying()
    _signum, _armed, _regions = None, False, 0
    _quiet_anomaly_warning(False)
    _quiet_dropped_stops(False)


def arm(on: bool = True) -> None:
    """Let passes stop mid-way (single-process runs) from now on; a request that already came applies at once."""
    global _armed
    _armed = on


def request(signum: int, frame: FrameType | None = None) -> None:
    """Record a stop request (called from the signal handler with the frame it interrupted); raises StopNow
    inside an interruptible region when that frame may carry it (the timer retries otherwise)."""
    global _signum
    _signum = signum
    _quiet_anomaly_warning(True)
    _quiet_dropped_stops(True)
    if _armed and _regions:
        _retry()
        if _may_raise_in(frame):
            raise StopNow(describe())


def _may_raise_in(frame: FrameType | None) -> bool:
    """Whether a StopNow raised in `frame` reaches the region as an exception (see the module docstring)."""
    if frame is None:
        return True
    path = frame.f_code.co_filename
    allowed = not path.startswith(_library_prefixes()) or path.startswith(_allowed_prefixes())
    return allowed and not _in_dispatch_handler()


@functools.cache
def _library_prefixes() -> tuple[str, ...]:
    """The installed packages' folders. The standard library stays allowed: waiting on a child process (inductor
    compiling a kernel with the C++ compiler) is a stretch of seconds with nothing but subprocess.py on top."""
    paths = sysconfig.get_paths()
    dirs = {paths["purelib"], paths["platlib"], *site.getsitepackages(), site.getusersitepackages()}
    return tuple(os.path.join(d, "") for d in dirs)


def _in_dispatch_handler() -> bool:
    """Whether torch's dispatcher is running a Python handler: it excludes the keys after Python's while it does."""
    torch = sys.modules.get("torch")
    return torch is not None and torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.PythonTLSSnapshot)


def _allowed_prefixes() -> tuple[str, ...]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch = sys.modules.get("torch")
    torch_dir = () if torch is None else (os.path.dirname(torch.__file__),)
    return (*(os.path.join(root, d, "") for d in _OWN), *(os.path.join(t, d) for t in torch_dir for d in _TORCH))


def _quiet_dropped_stops(on: bool) -> None:
    global _previous_unraisable
    if on and _previous_unraisable is None:
        _previous_unraisable = sys.unraisablehook
        sys.unraisablehook = _unraisable
    elif not on and _previous_unraisable is not None:
        sys.unraisablehook, _previous_unraisable = _previous_unraisable, None


def _unraisable(report: Any) -> None:
    if not isinstance(report.exc_value, StopNow):  # a dropped StopNow is retried by the timer
        (_previous_unraisable or sys.__unraisablehook__)(report)


def _quiet_anomaly_warning(on: bool) -> None:
    ours = [f for f in warnings.filters if f[0] == "ignore" and getattr(f[1], "pattern", None) == _ANOMALY_MESSAGE]
    if on and not ours:
        warnings.filterwarnings("ignore", _ANOMALY_MESSAGE, UserWarning)
    elif not on and ours:
        warnings.filters[:] = [f for f in warnings.filters if f not in ours]
        warnings._filters_mutated()  # what filterwarnings() itself calls: drops the per-module "already warned" caches


def _retry() -> None:
    """Raise again every RETRY_S while a region is open, in case Python dropped the raise (see the docstring)."""
    global _previous_alarm
    if _previous_alarm is None:
        _previous_alarm = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, RETRY_S, RETRY_S)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _signum is not None and _armed and _regions and _may_raise_in(frame):
        raise StopNow(describe())


def _stop_retrying() -> None:
    global _previous_alarm
    if _previous_alarm is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, _previous_alarm)
        _previous_alarm = None


def requested() -> bool:
    return _signum is not None


def status() -> RunStatus:
    """The run's end status for this request."""
    return stopped_by_signal(_signum)


def describe() -> str:
    """The run's end status for this request, as train.jsonl's `end` event has always written it."""
    return str(status())


def check() -> None:
    """Raise StopNow when a stop was requested and passes may stop mid-way (on entering a region; cheap)."""
    if _signum is not None and _armed:
        raise StopNow(describe())


@contextmanager
def interruptible() -> Iterator[None]:
    """A region the signal handler may leave by raising StopNow: only for work that changes no state the
    checkpoint holds, or whose partial effects the stop path discards (a micro-batch's gradients)."""
    global _regions
    check()
    _regions += 1
    modes = _dispatch_modes()
    try:
        yield
    except StopNow:
        _restore_dispatch_modes(modes)
        raise
    finally:
        _regions -= 1
        if not _regions:
            _stop_retrying()  # out of the region: the loop's own checks see the request from here on


def _dispatch_modes() -> tuple[int, int, tuple[bool, ...]] | None:
    """torch's thread-local mode stacks on entering a region (None before torch is imported: nothing to restore)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    keys = torch._C._TorchDispatchModeKey
    return (torch._C._len_torch_dispatch_stack(), torch._C._len_torch_function_stack(),
            tuple(torch._C._get_dispatch_mode(k) is not None for k in (keys.FAKE, keys.FUNCTIONAL, keys.PROXY)))


def _restore_dispatch_modes(entered: tuple[int, int, tuple[bool, ...]] | None) -> None:
    """Pop the modes a StopNow left pushed. A raise can land between a mode's push and the `try` that pops it (a
    compile traces under ProxyTorchDispatchMode), and the next op then aborts the process in C++ ("trying to set
    the current ProxyTorchDispatchMode, but one already exists") instead of letting the stop path save."""
    torch = sys.modules.get("torch")
    if entered is None or torch is None:
        return
    dispatch_len, function_len, infra = entered
    while torch._C._len_torch_dispatch_stack() > dispatch_len:
        torch._C._pop_torch_dispatch_stack(None)
    while torch._C._len_torch_function_stack() > function_len:
        torch._C._pop_torch_function_stack()
    keys = torch._C._TorchDispatchModeKey
    for key, was_set in zip((keys.FAKE, keys.FUNCTIONAL, keys.PROXY), infra, strict=True):
        if not was_set and torch._C._get_dispatch_mode(key) is not None:
            torch._C._unset_dispatch_mode(key)
