"""VRAM tiers: what a GPU of a given memory size should run by default, which tier this machine is, and the
machine's figures the plan needs (memory to fit in, peak FLOP/s for the time estimate).

A tier fixes how one optimizer step is executed (micro-batch, gradient accumulation, activation checkpointing,
parameter dtype, compile), never what is trained: every GPU tier takes the same model, sequence schedule and
GLOBAL_BATCH sequences per optimizer step, so a 24 GB card runs the same training run as an 80 GB one, only
slower. The defaults were chosen with the planner's own memory estimate for the 1b preset (docs/tiers.md shows
the figures). `cpu` is a smoke tier on the tiny preset.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from pretrain.errors import UserError

GiB = 1024**3
# Sequences per optimizer step on every GPU tier: 256 x 2048 = 524,288 tokens at the 1b block size, the
# batch GPT-3 used for its 1.3B model and in the range of TinyLlama / Pythia-1B.
GLOBAL_BATCH = 256
# Cards report less than their marketing size: an L4 "24 GB" shows 22.5 GiB, a T4 "16 GB" 14.7 GiB. A tier's
# memory when no GPU is present is its nominal size times this, the smallest card of the class.
USABLE_FRACTION = 0.92


@dataclass(frozen=True)
class Tier:
    """Defaults for one class of device. `schedule` holds (fraction of the block size, start step) pairs.

    `micro_batch` and `grad_checkpoint` are where the planner starts: it keeps checkpointing off when the step
    fits without it and picks the largest micro-batch that fits each phase (pretrain/plan/fit.py); the tier's
    values are kept only when nothing fits.
    """

    name: str
    size: str
    micro_batch: int
    global_batch: int
    grad_checkpoint: bool
    param_dtype: str
    compile: bool
    schedule: tuple[tuple[float, int], ...]
    reference_gpu: str  # whose peak FLOP/s the time estimate assumes when no GPU is detected
    steps: int | None = None  # None: the token budget decides (default 20 tokens per parameter)
    optimizer: str = "adamw"
    # When set, the planner takes the first of these whose step fits the card (pretrain/plan/pick_optimizer.py),
    # and `optimizer` is only the fallback when none does.
    optimizers: tuple[str, ...] = ()

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"

    @property
    def memory_bytes(self) -> int | None:
        return int(int(self.name) * USABLE_FRACTION * GiB) if self.is_gpu else None

    def seq_schedule(self, block_size: int) -> str:
        """The tier's sequence-length schedule for a model of `block_size`, e.g. "512@0,1024@500,2048@1500"."""
        return ",".join(f"{max(8, int(block_size * frac))}@{start}" for frac, start in self.schedule)


# Sequence-length warm-up (short sequences first: cheaper early steps, as in Li et al. 2022, "The
# Stability-Efficiency Dilemma"): a quarter of the block for 500 steps, half until step 1500, then full.
_GPU_SCHEDULE = ((0.25, 0), (0.5, 500), (1.0, 1500))

TIERS: dict[str, Tier] = {
    # Micro-batch and checkpointing here are the planner's starting point (kept only when nothing fits): fit.py
    # picks each phase's largest micro-batch whose estimate fits 90 % of the card, and checkpointing only where a
    # phase does not fit without it. What that gives per tier: `--json`, or docs/tiers.md's table generated from
    # it (plan/tier_table.py).
    "80": Tier("80", "1b", 4, GLOBAL_BATCH, False, "fp32", True, _GPU_SCHEDULE, "A100 80GB"),
    "48": Tier("48", "1b", 2, GLOBAL_BATCH, False, "fp32", True, _GPU_SCHEDULE, "RTX A6000"),
    "40": Tier("40", "1b", 1, GLOBAL_BATCH, False, "fp32", True, _GPU_SCHEDULE, "A100 40GB"),
    "24": Tier("24", "1b", 8, GLOBAL_BATCH, True, "bf16", True, _GPU_SCHEDULE, "RTX 4090"),
    # 16: picks by what fits, in this order: AdamW (bf16 weights + grads + fp32 state, 2 + 2 + 8 bytes per parameter:
    # the 1b step leaves no room for activations on a 16 GB card), AdamW with 8-bit moments (~2 bytes of state), Lion
    # (4 bytes; the original research code's answer for small cards, and the fallback when nothing fits). The plan
    # says which fit and which it took; the same tokens per step as every GPU tier.
    "16": Tier("16", "1b", 2, GLOBAL_BATCH, True, "bf16", True, _GPU_SCHEDULE, "RTX 4080", optimizer="lion",
               optimizers=("adamw", "adamw8bit", "lion")),
    # Smoke tier: tiny preset, no compile (a cold compile costs more than a short CPU run).
    "cpu": Tier("cpu", "tiny", 8, 8, False, "fp32", False, ((0.5, 0), (1.0, 50)), "cpu", steps=100),
}
VRAM_CHOICES = ("auto", *TIERS)
# Why a tier departs from AdamW: shown as the optimizer's source in the plan's settings table.
OPTIMIZER_WHY = {"lion": "Lion (Chen et al. 2023): 4 bytes of state/param instead of AdamW's 8, so the 1b step "
                         "fits 16 GB; the original code's choice for small cards"}


@dataclass(frozen=True)
class GpuInfo:
    """What the planner needs to know about the local GPU (tests pass their own)."""

    name: str
    total_bytes: int
    capability: tuple[int, int]

    @property
    def has_bf16(self) -> bool:
        # The trainer's rule too (pretrain/train/device.py): T4 (7.5) and V100 (7.0) need fp16 + GradScaler.
        from pretrain.train import device as dev  # torch: on use, so the launcher's --help stays light

        return dev.capability_has_bf16(self.capability)

    @property
    def has_float8(self) -> bool:
        from pretrain.train import device as dev

        return dev.capability_has_float8(self.capability)

    @property
    def peak_flops(self) -> float | None:
        from pretrain.train import device as dev

        return dev.peak_flops_for_name(self.name)


MiB = 1024**2
# Cards a tier serves: total memory as nvidia-smi reports it (torch's total_memory can be ~2 % lower: a T4 shows
# 15360 MiB there and 15110 MiB to torch, which is what the T4 entry holds) and compute capability. `--gpu NAME`
# plans for one of them without the card; the tiers' card lists in the plan and in docs/tiers.md derive from
# this table. card_named() matches a device name to an entry.
CARDS: tuple[GpuInfo, ...] = (
    GpuInfo("H100 80GB", 81559 * MiB, (9, 0)),
    GpuInfo("A100 80GB", 81920 * MiB, (8, 0)),
    GpuInfo("RTX A6000", 49140 * MiB, (8, 6)),
    GpuInfo("L40S", 46068 * MiB, (8, 9)),
    GpuInfo("A40", 46068 * MiB, (8, 6)),
    GpuInfo("A100 40GB", 40960 * MiB, (8, 0)),
    GpuInfo("V100 32GB", 32510 * MiB, (7, 0)),
    GpuInfo("RTX 4090", 24564 * MiB, (8, 9)),
    GpuInfo("RTX 3090", 24576 * MiB, (8, 6)),
    GpuInfo("L4", 23034 * MiB, (8, 9)),
    GpuInfo("A10G", 23028 * MiB, (8, 6)),
    GpuInfo("A10", 23028 * MiB, (8, 6)),
    GpuInfo("RTX 4080", 16376 * MiB, (8, 9)),
    GpuInfo("RTX A4000", 16376 * MiB, (8, 6)),
    GpuInfo("V100 16GB", 16160 * MiB, (7, 0)),
    GpuInfo("T4", 15110 * MiB, (7, 5)),
)


def card_named(name: str) -> GpuInfo:
    """The CARDS entry `name` names: the same name, else one whose name is in it ("Tesla T4", "NVIDIA L4"), else
    the first containing it ("a100 80", "4090"), case-insensitive. UserError if none."""
    want = name.lower().strip()
    by_length = sorted(CARDS, key=lambda c: -len(c.name))
    for match in (lambda c: c.name.lower() == want,
                  lambda c: re.search(rf"\b{re.escape(c.name.lower())}\b", want) is not None,
                  lambda c: want in c.name.lower()):
        for card in by_length if want else ():
            if match(card):
                return card
    raise UserError(f"unknown --gpu {name!r}; use one of: {', '.join(c.name for c in CARDS)} "
                    "(or run on the card: --vram auto reads it)")


def tier_cards(tier_name: str) -> list[GpuInfo]:
    """The cards of CARDS that `--vram auto` puts in this tier."""
    return [c for c in CARDS if tier_for_memory(c.total_bytes, strict=False) == tier_name]


def cards_text(tier_name: str) -> str:
    """The cards a tier serves, for the plan and docs/tiers.md: "RTX 4080, T4 (no bf16: fp16)"."""
    cards = tier_cards(tier_name)
    return ", ".join(c.name + ("" if c.has_bf16 else " (no bf16: fp16)") for c in cards) or "no GPU: smoke test"


def detect_gpu() -> GpuInfo | None:
    """The first CUDA device, or None on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(props.name, int(props.total_memory), (props.major, props.minor))


def tier_for_memory(total_bytes: int, strict: bool = True) -> str | None:
    """The largest tier whose usable memory the card has (a card below the smallest tier: an error, or None)."""
    for name in sorted((n for n in TIERS if n != "cpu"), key=int, reverse=True):
        if total_bytes >= TIERS[name].memory_bytes:  # type: ignore[operator]
            return name
    if not strict:
        return None
    raise UserError(
        f"this GPU has {total_bytes / GiB:.1f} GiB, less than the smallest tier (16 GB); "
        "plan with --vram cpu for a smoke run, or pick a tier explicitly (e.g. --vram 16) with a smaller --size"
    )


def select_tier(vram: str, gpu: GpuInfo | None) -> tuple[Tier, str]:
    """(tier, how it was chosen) for --vram; auto reads the GPU (cpu when there is none)."""
    if vram not in VRAM_CHOICES:
        raise UserError(f"unknown --vram tier {vram!r}; use one of {', '.join(VRAM_CHOICES)}")
    if vram != "auto":
        return TIERS[vram], f"--vram {vram}"
    if gpu is None:
        return TIERS["cpu"], "auto: no GPU found"
    return TIERS[tier_for_memory(gpu.total_bytes)], f"auto: {gpu.name}, {gpu.total_bytes / GiB:.1f} GiB"  # type: ignore[index]


def cpu_matmul_flops(seconds: float = 0.1) -> float:
    """This CPU's fp32 matmul FLOP/s: measured on one thread, per second of that thread's CPU time, times torch's
    thread count.

    One thread, because a multi-threaded measurement collapses when other processes load the cores (OpenMP
    threads spin-wait), which says more about this moment than about the machine. CPU time, not wall time, for the
    same reason: the time the thread waits for a core is the other processes' (24 fresh processes each, 2 busy cores,
    load 3-5: wall 83-240 GFLOP/s, CPU time 135-232, for the same 0.1 s of CPU). A cpu plan's time rests on this
    figure until real steps are timed (pretrain/plan/cpu_rate.py).
    """
    import torch

    threads = torch.get_num_threads()
    n = 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.set_num_threads(1)
    try:
        a @ b
        iters, t0 = 0, time.thread_time()
        while (elapsed := time.thread_time() - t0) < seconds:
            a @ b
            iters += 1
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 * iters / elapsed * threads


def system_memory_bytes() -> int:
    """Physical RAM: what the cpu tier must fit in."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def memory_capacity(tier: Tier, tier_how: str, gpu: GpuInfo | None) -> tuple[int, str]:
    """Device memory the plan must fit in: the detected GPU's (auto), the tier's nominal, or system RAM."""
    if not tier.is_gpu:
        return system_memory_bytes(), "system RAM"
    if gpu is not None and tier_how.startswith("auto"):
        return gpu.total_bytes, f"{gpu.name} total memory"
    return tier.memory_bytes, f"{tier.name} GB tier (smallest card of the class: {tier.memory_bytes / GiB:.1f} GiB)"


def peak_flops(peak_tflops: float | None, tier: Tier, gpu: GpuInfo | None) -> tuple[float, str]:
    """Device peak FLOP/s for the time estimate, and where the figure comes from."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise UserError(f"--peak-tflops must be positive, got {peak_tflops}")
        return peak_tflops * 1e12, "--peak-tflops"
    import torch

    from pretrain.train import device as dev

    if not tier.is_gpu:
        how = f"measured: this CPU's 1-thread fp32 matmul rate (per CPU second) x {torch.get_num_threads()} threads"
        return cpu_matmul_flops(), how
    if gpu is not None and gpu.peak_flops:
        return gpu.peak_flops, f"{gpu.name} datasheet peak (pretrain/train/device.py)"
    why = f"no GPU here; assumes the tier's reference {tier.reference_gpu}" if gpu is None else \
        f"{gpu.name} is not in the peak table; assumes {tier.reference_gpu}"
    return dev.peak_flops_for_name(tier.reference_gpu) or 100e12, why + " (set --peak-tflops for your card)"
