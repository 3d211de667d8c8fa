"""Process topology and the few places training differs under torchrun: DDP by default, FSDP2 with --fsdp.

A single process (no WORLD_SIZE, or WORLD_SIZE=1) takes the trivial path of every function. Under torchrun
the work is done by PyTorch's own engines: `DistributedDataParallel`, or FSDP2 (`fully_shard` per block,
then the root). Checkpoints always hold full, unsharded tensors keyed by parameter name (the format of
`torch.distributed.checkpoint.state_dict`), so a run saved at N ranks resumes at M ranks, DDP or FSDP.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from pretrain.errors import UserError
from pretrain.train.grad_clip import clip_grad_norm_cpu_

# A rank that dies leaves the others blocked in a collective; torchrun kills them as soon as it notices,
# so this only bounds the truly stuck cases (a hung node). 30 min is gloo's default, too long on a rented GPU.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Dist:
    """Who this process is. Single-process runs are rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A gloo group for host-side flags (stop requests): agreeing on a bool then needs no GPU sync.
    control: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> Dist:
    """Join torchrun's process group (nccl on CUDA, gloo otherwise); a plain `python` run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise UserError("WORLD_SIZE is set but RANK/MASTER_ADDR are not: launch multi-process runs with torchrun")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"multi-process training runs on cuda or cpu, not {device.type}; use --device cuda or cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                 device_id=device if device.type == "cuda" else None)
    control = tdist.new_group(backend="gloo") if backend != "gloo" else tdist.group.WORLD
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")), control=control)


def wrap_model(model: nn.Module, fsdp: bool, cpu_offload: bool, dist: Dist, device: torch.device,
               amp_dtype: torch.dtype | None = None) -> nn.Module:
    """The module to call for forward/backward: the model itself, DDP, or (sharded in place) FSDP2.

    FSDP2 mixed precision: blocks all-gather their weights in `amp_dtype` (half the traffic; autocast
    would cast them for the matmuls anyway) and reduce gradients in fp32. `cast_forward_inputs=False`
    and a full-precision root keep the residual stream in fp32, as single-process autocast does: the
    embedding output would otherwise be bf16 and every residual add rounded to bf16.
    config.validate has refused the settings FSDP2 cannot train (--cpu-offload alone, bf16 parameters, fp16).
    """
    if not fsdp:
        if not dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's weights at construction, so every replica starts identical.
        return DDP(model, **ddp_options(device))

    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--fsdp runs on cuda or cpu, not {device.type}; drop --fsdp or use --device cpu")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not tdist.is_initialized():
        # One process can use FSDP2 too: with --cpu-offload it trains a model larger than the GPU.
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=tdist.HashStore(),
                                 rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT)
    mesh = init_device_mesh(device.type, (dist.world_size,))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    block_mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_mp, offload_policy=offload)
    # The root (embedding, tied LM head, final norm) is needed right after forward by backward: no reshard.
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
                offload_policy=offload, reshard_after_forward=False)
    return model


def ddp_options(device: torch.device) -> dict[str, Any]:
    """DDP's settings. gradient_as_bucket_view: the gradients live in the all-reduce buckets instead of beside
    a copy of them (one gradient's worth of memory less; what the planner's estimate assumes)."""
    return {"device_ids": [device.index] if device.type == "cuda" else None, "gradient_as_bucket_view": True}


@contextlib.contextmanager
def maybe_no_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """DDP: skip the gradient all-reduce on all but the last micro-batch of an accumulation.

    FSDP2 reduce-scatters every micro-batch on purpose: skipping it would keep full unsharded gradients
    alive across micro-batches, the memory FSDP exists to save.
    """
    no_sync = getattr(wrapped, "no_sync", None)
    if sync or no_sync is None:
        yield
    else:
        with no_sync():
            yield


def _all_reduce(t: torch.Tensor, group: Any = None, op: Any = None) -> torch.Tensor:
    """A reduced copy: the caller's tensor (e.g. the loop's running loss) is left as it was."""
    out = t.detach().clone()
    tdist.all_reduce(out, op=op or tdist.ReduceOp.SUM, group=group)
    return out


def any_rank(flag: bool, dist: Dist) -> bool:
    """True when `flag` is set on any rank (a stop signal reaching one rank stops all, at the same step)."""
    if not dist.enabled:
        return flag
    return bool(_all_reduce(torch.tensor([int(flag)]), dist.control, tdist.ReduceOp.MAX).item())


def mean_across_ranks(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The mean of `value` over ranks (a new tensor; SUM then divide, as gloo has no AVG)."""
    if not dist.enabled:
        return value
    return _all_reduce(value) / dist.world_size


def gather_from_ranks(obj: Any, dist: Dist) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank (picklable host data: RNG states, flags)."""
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj, group=dist.control)
    return out


def replicas_match(model: nn.Module, dist: Dist) -> bool:
    """Under DDP: True when every rank holds bit-identical weights (always True single-process or sharded).

    DDP only averages gradients; the weights stay identical only if every rank applies the same update,
    which bf16 stochastic rounding makes depend on each rank's random draws. One exact integer checksum per
    tensor (its bits summed), compared across ranks: a collective, so every rank must call it.
    """
    if not dist.enabled or getattr(model, "no_sync", None) is None:
        return True
    sums = []
    for p in model.parameters():
        bits = p.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()])
        sums.append(bits.sum(dtype=torch.int64))
    mine = torch.stack(sums)
    lo, hi = _all_reduce(mine, op=tdist.ReduceOp.MIN), _all_reduce(mine, op=tdist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def clip_grad_norm(model: nn.Module, max_norm: float, dist: Dist,
                   fold: Callable[[float], bool] | None = None) -> torch.Tensor:
    """Clip the global gradient norm; returns it as a plain (replicated) tensor.

    Under FSDP2 the gradients are DTensor shards and torch's clip returns a DTensor norm; its full value
    is the same on every rank, so non-finite steps are skipped by all ranks alike. A single process with its
    gradients on CPU skips the multiply when it would be by 1.0 (pretrain/train/grad_clip.py).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # FSDP2 in one process (--fsdp --cpu-offload) has DTensor gradients on CPU: torch's clip handles those.
    if not dist.enabled and all(g.device.type == "cpu" and type(g) is torch.Tensor for g in grads):
        norm = clip_grad_norm_cpu_(model.parameters(), max_norm, fold)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def _options(dist: Dist, **kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full tensors gathered to rank 0's CPU memory only, the one rank that writes checkpoints.
    return StateDictOptions(full_state_dict=True, cpu_offload=tdist.is_initialized(), **kw)


def model_state(model: nn.Module, dist: Dist) -> dict[str, Any]:
    """Full (unsharded) model weights; a collective under FSDP, so every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _share_tied(model, get_model_state_dict(model, options=_options(dist)))


def _share_tied(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """One tensor under every name of a tied parameter (`wte.weight` and `lm_head.weight`): FSDP's full gather
    returns a copy per name, which the checkpoint would then store twice (~0.4 GB of a 1b checkpoint)."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        a = first.setdefault(id(p), name)
        if a != name and a in state and name in state and state[a].shape == state[name].shape:
            state[name] = state[a]
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name (independent of world size and DDP/FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(dist))


def load_model_state(model: nn.Module, state: dict[str, Any], dist: Dist) -> None:
    """Load full weights (every rank holds them) into the plain, DDP or FSDP2 model; shards as needed."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(dist))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         dist: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # A state saved by the other AdamW implementation (--opt-fused may change on resume) has group keys
    # (amsgrad, fused, ...) this optimizer lacks, which set_optimizer_state_dict cannot map: keep ours.
    known = set().union(*(g.keys() for g in optimizer.param_groups))
    state = {**state, "param_groups": [{k: v for k, v in g.items() if k in known} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=_options(dist))


def check_same_start(step: int | None, dist: Dist) -> None:
    """Refuse to train when ranks would resume from different checkpoints (run dir not shared by nodes)."""
    if not dist.enabled:
        return
    mine = torch.tensor([-1 if step is None else step])
    lo, hi = _all_reduce(mine, dist.control, tdist.ReduceOp.MIN), _all_reduce(mine, dist.control, tdist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise UserError("ranks found different checkpoints to resume from (steps "
                        f"{lo.item()}..{hi.item()}, -1 = none); multi-node runs need --out-dir on storage "
                        "every node sees (NFS, a shared volume)")


def saved_config_for(state: dict[str, Any], cfg: Any, dist: Dist, path: Any) -> dict[str, Any]:
    """A checkpoint's train config as this topology would have written it, for the resume check.

    --batch-size, --grad-accum and --fsdp may change with the number of ranks (checkpoints hold full
    state, the sampler one global order) as long as the global batch, batch x accum x ranks, stays the same.
    """
    saved = dict(state["train_config"])
    world = state["world_size"]
    old = (saved.get("batch_size", cfg.batch_size), saved.get("grad_accum", cfg.grad_accum), world)
    new = (cfg.batch_size, cfg.grad_accum, dist.world_size)
    if old[0] * old[1] * old[2] != new[0] * new[1] * new[2]:
        raise UserError(f"cannot resume from {path}: its global batch is {old[0] * old[1] * old[2]} sequences "
                        f"(--batch-size {old[0]} x --grad-accum {old[1]} x {world} ranks), this run's "
                        f"{new[0] * new[1] * new[2]}; choose --batch-size and --grad-accum so that "
                        f"batch x accum x {dist.world_size} ranks = {old[0] * old[1] * old[2]}")
    return saved | {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "fsdp": cfg.fsdp}


def cleanup(dist: Dist) -> None:
    """Tear down the process group cleanly: release, barrier, destroy (gloo aborts at exit otherwise).

    The caller must drop its references to the wrapped model and optimizer first; collecting them here
    frees DDP's reducer / FSDP's state before the group they hold goes away.
    """
    if not tdist.is_initialized():
        return
    gc.collect()
    tdist.barrier()
    tdist.destroy_process_group()
