"""Error bars, one rule each: the standard error of a mean over independent batches, of a proportion
(binomial), and of a difference between two estimates. The trainer, the downstream eval and compare import
these, so a figure's ± means the same thing wherever it is printed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

NOISE_SIGMAS = 2.0  # a difference smaller than 2 standard errors of itself is called inside the noise (~95 %)


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean of `values` (sample sd / sqrt(n)); None for fewer than two values."""
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def binomial_se(p: float, n: int) -> float | None:
    """Standard error of an accuracy p measured on n independent items, sqrt(p (1 - p) / n); None for n = 0."""
    if n <= 0:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def combined_se(*errors: float | None) -> float | None:
    """Standard error of a sum or difference of independent estimates; None when any is unknown."""
    if any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors))
