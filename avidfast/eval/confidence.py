"""Confidence intervals for the fractions the evaluations report (top-1, recall@k, precision@1).

A fraction measured on ``n`` held-out queries is a binomial proportion; its 95% Wilson score
interval stays inside [0, 1] and keeps a sensible width at 0 or n successes, where the normal
approximation collapses to a point.
"""
import math
from typing import Tuple

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """(low, high), fractions in [0, 1]: the Wilson score interval of ``successes`` out of ``n``
    trials (default 95%). Raises ValueError when ``n < 1`` or ``successes`` is outside [0, n]."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if int(successes) != successes or not 0 <= successes <= n:
        raise ValueError(f"successes must be an integer between 0 and n={n}, got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding past 0 / 1
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def fraction_interval(fraction: float, n: int, z: float = Z95) -> Tuple[float, float]:
    """:func:`wilson_interval` of a fraction measured on ``n`` queries (``fraction * n`` is
    rounded to the whole number of successes it stands for)."""
    return wilson_interval(int(round(fraction * n)), n, z)
