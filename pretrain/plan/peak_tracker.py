"""The memory tracker of the fake-tensor step estimate (pretrain/plan/memory.py) and of tests that track real steps.

Its own module because importing torch's MemTracker costs ~1.5 s (it pulls in torch.distributed.tensor and
inductor): memory.py imports it only when an estimate is actually computed, not for a plan served from the
estimate cache (pretrain/plan/estimate_cache.py).
"""

from __future__ import annotations

from torch.distributed._tools.mem_tracker import MemTracker


class PeakTracker(MemTracker):
    """MemTracker keeping only the global peak, and optionally the total after every op with its segment.

    The stock tracker also updates a per-module peak for every active module on every op, which is O(modules)
    per op and makes a 1B step take a minute instead of seconds; the global figures are the same. A segment is
    (in backward?, index of the block running or None).
    """

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.record = record
        self.ops: list[tuple[tuple[bool, int | None], int]] = []

    def total(self) -> int:
        return sum(snap["Total"] for snap in self._curr_mem_snap.values())

    def _pre_fw_hook(self, module, inputs) -> None:  # type: ignore[no-untyped-def]
        # The stock tracker refuses a module called again from the top level (its per-module stats assume one
        # iteration); passes call the LM head once per slice of logits, or the model once per eval length, and
        # only the global figures are kept here.
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                return
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:  # type: ignore[no-untyped-def]
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
        if self.record:
            block = None
            for name in self._mod_tracker.parents:
                head, _, index = name.rpartition(".")
                if head.endswith(".blocks") and index.isdigit():
                    block = int(index)
            self.ops.append(((self._mod_tracker.is_bw, block), self.total()))

    def peak(self) -> tuple[int, dict[str, int]]:
        """(total, breakdown by category) of the highest point so far."""
        total, snap = 0, {}
        for dev_snap in self._peak_mem_snap.values():
            total += dev_snap["Total"]
            for k, v in dev_snap.items():
                if k != "Total":
                    name = _CATEGORY.get(str(getattr(k, "value", k)), str(k))
                    snap[name] = snap.get(name, 0) + v
        return total, snap


_CATEGORY = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Activation": "activations",
             "Temp": "backward_temp", "Optstate": "optimizer", "Other": "other"}
