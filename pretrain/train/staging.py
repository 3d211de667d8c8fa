"""Bounded host staging for checkpoint snapshots, and the host RAM a save needs (which the plan shows).

A device tensor reaches host memory through one fixed-size staging buffer (page-locked on CUDA, where a copy into
pinned memory is one DMA), piece by piece, into an ordinary host tensor. Pinned memory thus stays at
STAGING_BYTES for the whole run, whatever the model size; the snapshot itself lives in ordinary memory only
until its background write is done. Allocating the buffer may fail (the OS refuses to pin): the caller then
saves synchronously. Device-specific calls go through pretrain/train/device.py, so CPU tests drive all of it.
"""

from __future__ import annotations

import torch

from pretrain.train import device as dev

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
