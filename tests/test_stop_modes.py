"""A stop that lands while a compile traces must not raise in Python that C++ called, leave torch's dispatch modes
pushed, nor print autograd's anomaly-mode traceback for the backward it cuts short (pretrain/stopping.py).

Seen in CI: SIGTERM during the first `--compile` step left dynamo's ProxyTorchDispatchMode set, and the next op
aborted the trainer in C++ ("trying to set the current ProxyTorchDispatchMode, but one already exists") instead
of saving step 0 and exiting 75. Landing a signal at that exact bytecode is timing; its effect is made here.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain import stopping
from pretrain.train.loop import StopRequested

ROOT = Path(__file__).resolve().parents[1]


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_a_stop_mid_trace_leaves_no_mode_pushed_and_ops_run_after_it():
    keys = torch._C._TorchDispatchModeKey
    stopping.reset()
    try:
        with pytest.raises(stopping.StopNow):
            with stopping.interruptible():
                # What an interrupted trace leaves behind: infra modes set and user modes pushed, never popped.
                torch._C._set_dispatch_mode(FakeTensorMode())
                torch._C._push_on_torch_dispatch_stack(_Passthrough())
                raise stopping.StopNow("stopped by signal SIGTERM")
        assert torch._C._get_dispatch_mode(keys.FAKE) is None
        assert torch._C._len_torch_dispatch_stack() == 0
        # The ops the stop path runs next (a split, as the fused q/k/v projection does) and a new trace work.
        a, b = torch.arange(6.0).split(3)
        assert a.tolist() == [0.0, 1.0, 2.0] and b.tolist() == [3.0, 4.0, 5.0]
        assert make_fx(lambda x: x.split(2))(torch.ones(4)) is not None
    finally:
        stopping.reset()


def _backward_stopped_under_anomaly_mode(stop: bool) -> list[str]:
    """A backward run under anomaly mode (AOTAutograd's joint trace turns it on) whose hook raises; the warnings."""
    x = torch.ones(3, requires_grad=True)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if stop:
            stopping.request(signal.SIGTERM)
        raise RuntimeError("not a stop")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(stopping.StopNow if stop else RuntimeError):
            with torch.autograd.detect_anomaly(check_nan=False), stopping.interruptible():
                y = (x * 2).sin()
                y.register_hook(hook)
                y.sum().backward()
    return [str(w.message) for w in seen]


def test_a_stop_unwinding_a_backward_prints_no_forward_traceback():
    # Seen in CI: SIGTERM in the first --compile step's backward trace printed autograd's "Error detected in
    # ...Backward0. Traceback of forward call that caused the error" to the trainer's stderr on a clean stop.
    stopping.reset()
    stopping.arm()
    try:
        assert not [m for m in _backward_stopped_under_anomaly_mode(stop=True) if "Traceback of forward" in m]
    finally:
        stopping.reset()
    # Only while stopping: a real error in a backward still shows where its forward ran.
    assert [m for m in _backward_stopped_under_anomaly_mode(stop=False) if "Traceback of forward" in m]


# A stop arrives while `busy` runs; `spin` runs until it is raised.
_BUSY = """
def busy(n):
    os.kill(os.getpid(), signal.SIGUSR1)
    total = 0
    for i in range(n):
        total += i
    return total
"""
_SPIN = """
def spin(deadline):
    while time.monotonic() < deadline:
        pass
"""
N = 300_000


def _function_in(path: Path, source: str, name: str):
    """`name` from `source`, its frames carrying `path` as their file: where a signal lands is decided by that."""
    namespace = {"os": os, "signal": signal, "time": time}
    exec(compile(source, str(path), "exec"), namespace)
    return namespace[name]


def _seconds_to_the_stop(first) -> float:
    """With the trainer's handler installed, run `first` (which signals) in a region, then spin in this repo's code
    until StopNow; the seconds from the spin's start to the raise."""
    spin = _function_in(ROOT / "model" / "stop_probe.py", _SPIN, "spin")
    handler = StopRequested()
    handler.install()
    stopping.arm()
    t0 = time.monotonic()
    try:
        with pytest.raises(stopping.StopNow), stopping.interruptible():
            first()
            t0 = time.monotonic()
            spin(t0 + 5.0)
        return time.monotonic() - t0
    finally:
        handler.restore()


def test_a_stop_waits_while_the_dispatcher_runs_python_and_raises_in_our_code_next():
    # Seen in CI: SIGTERM during the first --compile step landed in torch/_library's find_torch_dispatch_rule,
    # which torch's C++ dispatcher calls through pybind11; the raise ended the trainer in std::terminate.
    busy = _function_in(Path(torch.__file__).parent / "_library" / "simple_registry.py", _BUSY, "busy")
    totals: list[int] = []
    waited = _seconds_to_the_stop(lambda: totals.append(busy(N)))
    assert totals == [sum(range(N))], "the stop was raised inside the frame C++ called"
    assert waited < 1.0, f"the retry timer raised {waited:.2f} s after the region reached our code"


def test_a_stop_waits_while_a_dispatch_handler_runs_and_raises_after_it_returns():
    # Also seen in CI: a raise inside FakeTensorMode's handler unwound into the dispatcher's C++ mode guard, which
    # aborted ("trying to set the current FakeTensorMode, but one already exists"). The handler here is in a file
    # where raising is allowed, so only being inside the dispatcher holds the stop back.
    busy = _function_in(ROOT / "model" / "stop_probe.py", _BUSY, "busy")
    totals: list[int] = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            totals.append(busy(N))
            return func(*args, **(kwargs or {}))

    def dispatch() -> None:
        with Mode():
            torch.ones(2).add_(1)

    waited = _seconds_to_the_stop(dispatch)
    assert totals and totals == [sum(range(N))] * len(totals), "the stop was raised inside the handler"
    assert torch._C._len_torch_dispatch_stack() == 0
    assert waited < 1.0, f"the retry timer raised {waited:.2f} s after the region left the dispatcher"


def test_a_stop_dropped_in_a_weakref_callback_prints_nothing_and_other_errors_still_do(monkeypatch):
    # Seen in CI: the raise landed in a dynamo weakref callback; Python dropped it (the timer raises again) and
    # printed "Exception ignored in ... Traceback" on what ended as a clean stop.
    import weakref

    reported: list[BaseException] = []
    monkeypatch.setattr("sys.unraisablehook", lambda report: reported.append(report.exc_value))

    class Owner:
        pass

    def drop(error: BaseException) -> None:
        owner = Owner()
        ref = weakref.ref(owner, lambda _: (_ for _ in ()).throw(error))
        del owner
        assert ref() is None

    stopping.reset()
    try:
        stopping.request(signal.SIGTERM)  # not armed: records the request only
        drop(stopping.StopNow("stopped by signal SIGTERM"))
        drop(RuntimeError("a real error"))
        assert [type(e) for e in reported] == [RuntimeError]
    finally:
        stopping.reset()
    drop(stopping.StopNow("after the stop was served"))  # reported again once reset
    assert [type(e) for e in reported] == [RuntimeError, stopping.StopNow]
