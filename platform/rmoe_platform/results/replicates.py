"""Statistics over replicates (runs of one setting that differ only in their seed): mean, standard
deviation and Student-t confidence interval of a value, and of the paired difference between two settings
run with the same seeds. Pure functions, shared by the printed report, the sweep tables and the dashboard."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values with its two-sided Student-t confidence interval [low, high]; with one value
    the spread is unknown (std, low and high are NaN)."""

    mean: float
    std: float  # sample standard deviation (ddof=1)
    n: int
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0: a difference distinguishable from noise."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval | None:
    """The mean and t-interval of the finite `values` (None when there are none)."""
    clean = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(clean)
    if n == 0:
        return None
    mean = math.fsum(clean) / n
    if n == 1:
        return Interval(mean, math.nan, 1, math.nan, math.nan, confidence)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in clean) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half, confidence)


def paired_difference(
    values: Mapping[int, float | None], reference: Mapping[int, float | None], confidence: float = CONFIDENCE
) -> Interval | None:
    """The interval of `values[seed] - reference[seed]` over the seeds both have a finite value for: pairing
    by seed removes what the two runs of a seed share (the same dense core, data order and draws)."""
    seeds = sorted(s for s in values if _finite(values[s]) and _finite(reference.get(s)))
    return interval([values[s] - reference[s] for s in seeds], confidence)  # type: ignore[operator]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
