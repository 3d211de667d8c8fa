"""A stop that lands while a compile traces must not leave torch's dispatch modes pushed (pretrain/stopping.py).

Seen in CI: SIGTERM during the first `--compile` step left dynamo's ProxyTorchDispatchMode set, and the next op
aborted the trainer in C++ ("trying to set the current ProxyTorchDispatchMode, but one already exists") instead
of saving step 0 and exiting 75. Landing a signal at that exact bytecode is timing; its effect is made here.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain import stopping


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
