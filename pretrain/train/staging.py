"""Checkpoint snapshots in host memory: the deep copy of a training state a save writes, the bounded staging
device tensors stream through on the way, and the host RAM a save needs (which the plan shows).

A device tensor reaches host memory through one fixed-size staging buffer (page-locked on CUDA, where a copy into
pinned memory is one DMA), piece by piece, into an ordinary host tensor. Pinned memory thus stays at
STAGING_BYTES for the whole run, whatever the model size; the snapshot itself lives in ordinary memory only
until its background write is done. Allocating the buffer may fail (the OS refuses to pin): the caller then
saves synchronously. Device-specific calls go through pretrain/train/device.py, so CPU tests drive all of it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pretrain.train import device as dev

_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
STAGING_BYTES = 64 * 2**20  # ~3 ms of PCIe DMA per piece: large enough that the per-piece sync costs little


def host_ram_bytes(state_bytes: int, device: str = "cuda") -> int:
    """Host RAM an asynchronous checkpoint save needs at its peak: the snapshot of `state_bytes` (ordinary memory,
    freed when written) plus, on a GPU, the staging buffer kept for the run."""
    return state_bytes + (STAGING_BYTES if device != "cpu" else 0)


class HostStaging:
    """Copies device tensors to ordinary host memory through one reused buffer of `nbytes`."""

    def __init__(self, nbytes: int = STAGING_BYTES) -> None:
        if nbytes <= 0:
            raise ValueError(f"staging buffer must have a positive size, got {nbytes}")
        self.nbytes = int(nbytes)
        self._buf: torch.Tensor | None = None

    def buffer(self) -> torch.Tensor:
        """The staging buffer, allocated on first use. Raises RuntimeError when it cannot be allocated (pinned)."""
        if self._buf is None:
            self._buf = dev.host_staging_buffer(self.nbytes)
        return self._buf

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` in ordinary (pageable) memory, streamed through the staging buffer in pieces."""
        t = t.detach()
        out = torch.empty(t.shape, dtype=t.dtype)
        if t.numel() == 0:
            return out
        if not t.is_contiguous():  # state dicts hold contiguous tensors; anything else takes the driver's path
            out.copy_(t)
            return out
        src, dst = t.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
        buf = self.buffer()
        for i in range(0, src.numel(), buf.numel()):
            piece = buf[: min(buf.numel(), src.numel() - i)]
            piece.copy_(src[i:i + piece.numel()], non_blocking=True)
            dev.synchronize(t.device)  # the piece must have landed before it is read (and the buffer reused)
            dst[i:i + piece.numel()].copy_(piece)
        return out


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # copy=True: a CPU tensor must not alias the live parameter the optimizer keeps updating.
    return t.detach().to("cpu", copy=True)


def _alias_key(t: torch.Tensor) -> Any:
    """One key for every tensor that is the same view of the same memory. A tied embedding is one Parameter,
    but state_dict() returns a fresh tensor object per name (`wte.weight`, `lm_head.weight`), so id() would
    copy and store it twice (a third of a tiny model's checkpoint, ~0.4 GB of a 1b one)."""
    try:
        if t.numel() and t.layout == torch.strided:
            return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                    t.dtype)
    except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
        pass
    return id(t)


def snapshot(obj: Any, path: str, memo: dict[Any, torch.Tensor],
              copy_tensor: Callable[[torch.Tensor], torch.Tensor] = cpu_copy) -> Any:
    """Deep copy of a nested state with every tensor passed through `copy_tensor`; refuses what weights_only
    can't load.

    `memo` keeps tensors that alias (tied embeddings, see `_alias_key`) shared, so they are copied and stored
    once; torch.save writes a shared storage once and torch.load gives it back shared.
    """
    if isinstance(obj, torch.Tensor):
        key = _alias_key(obj)
        if key not in memo:
            memo[key] = copy_tensor(obj)
        return memo[key]
    if isinstance(obj, dict):
        out: dict = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            where = f"{path}[{k!r}]"
            out[snapshot(k, where, memo, copy_tensor)] = snapshot(v, where, memo, copy_tensor)
        if hasattr(obj, "_metadata"):  # state_dict() carries per-module versions that load_state_dict reads
            out._metadata = snapshot(obj._metadata, path, memo, copy_tensor)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list | tuple):
        items = [snapshot(v, f"{path}[{i}]", memo, copy_tensor) for i, v in enumerate(obj)]
        if isinstance(obj, torch.Size):
            return torch.Size(items)
        return tuple(items) if isinstance(obj, tuple) else items  # namedtuples etc. would not load
    if isinstance(obj, np.generic):
        # np.float64 is a float subclass yet pickles as a numpy global that weights_only refuses.
        return obj.item()
    if isinstance(obj, _LEAF_TYPES):
        return obj
    raise TypeError(
        f"checkpoint state{path} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store tensors, numbers, strings, lists or dicts instead"
    )


def live(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, for a synchronous save (training waits, so nothing mutates it): torch.save moves one
    storage at a time to host memory. A view of a larger storage is copied, or the whole storage would be saved."""
    t = t.detach()
    compact = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if compact and t.is_contiguous() else cpu_copy(t)
