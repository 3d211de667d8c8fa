"""How numbers read everywhere (plan, summary.md, compare, prepare's progress): counts, bytes, durations, finite
values, precision names. One rule each; every stage imports these, none re-implements them."""

from __future__ import annotations

import math
from typing import Any

KiB, MiB, GiB = 1024, 1024**2, 1024**3
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the precision names flags accept (--param-dtype, --amp-dtype, --dtype)


def fmt_count(n: float, unit: str = "") -> str:
    """10_000_000_000 -> '10.00B', 1320 -> '1.32K', 131 -> '131'; `unit` is appended ('1.32Ktok')."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def fmt_bytes(n: float) -> str:
    """Binary units, one decimal: 3.2 GiB, 140.0 MiB, 2.0 KiB, 12 B."""
    for scale, suffix in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= scale / 10:
            return f"{n / scale:.1f} {suffix}"
    return f"{n:.0f} B"


def fmt_duration(seconds: float) -> str:
    """95 -> '1m35s', 3725 -> '1h02m', 200000 -> '2d 7h'."""
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite int/float (not a bool, NaN or inf), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def torch_dtype(name: str) -> Any:
    """'fp32' / 'bf16' / 'fp16' -> the torch dtype (torch imported only here, when asked)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
