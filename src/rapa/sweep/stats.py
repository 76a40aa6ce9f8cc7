"""Seed-level statistics for the claims: Student-t intervals, paired differences, chance level.

A battery trains every scheme with the same seeds. A scheme's number is the mean over
its seeds with a 95% Student-t interval (``mean ± t_{0.975, n-1} * sd / sqrt(n)``); two
schemes are compared seed by seed (:func:`paired`: the interval of the per-seed
differences, over the seeds both have), which removes the variation that both share
(same data order, same initial draw). One seed gives no interval: every comparison on it
is inconclusive.

A net "did not learn" (:func:`near_chance`) when its error is within
:data:`CHANCE_MARGIN_PP` percentage points (or two binomial standard errors, if larger) of
the trivial classifier's error on its own test set (always the most frequent class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["CHANCE_MARGIN_PP", "CONFIDENCE", "SeedStats", "near_chance", "paired", "seed_stats", "student_t_cdf",
           "t_quantile"]

CONFIDENCE = 0.95
"""Two-sided confidence of the intervals."""
CHANCE_MARGIN_PP = 10.0
"""Percentage points below the trivial error a net must reach to count as trained."""


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df!r} must be positive")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r} must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class SeedStats:
    """Mean and 95% Student-t interval of per-seed values."""

    n: int
    """Number of seeds."""
    mean: float
    """Mean over the seeds (NaN without any)."""
    sd: float
    """Sample standard deviation (NaN with fewer than 2 seeds)."""
    half: float
    """Half-width of the interval (NaN with fewer than 2 seeds)."""
    seeds: tuple[int, ...] = ()
    """The seeds, in order."""

    @property
    def lo(self) -> float:
        """Lower end of the interval."""
        return self.mean - self.half

    @property
    def hi(self) -> float:
        """Upper end of the interval."""
        return self.mean + self.half

    def text(self, digits: int = 2, unit: str = "") -> str:
        """``12.34 ± 0.56`` (``12.34`` with one seed, ``–`` with none)."""
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        if self.n < 2:
            return f"{self.mean:.{digits}f}{unit}"
        return f"{self.mean:.{digits}f}{unit} ± {self.half:.{digits}f}"

    def as_dict(self) -> dict[str, float | int | list[int]]:
        """For the JSON: n, mean, sd, half, lo, hi, seeds."""
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "half": self.half, "lo": self.lo, "hi": self.hi,
                "seeds": list(self.seeds)}


def seed_stats(values: Mapping[int, float] | Sequence[float]) -> SeedStats:
    """:class:`SeedStats` of per-seed values (a seed -> value mapping, or a plain sequence)."""
    if isinstance(values, Mapping):
        seeds = tuple(sorted(values))
        xs = [float(values[s]) for s in seeds]
    else:
        xs = [float(v) for v in values]
        seeds = tuple(range(len(xs)))
    n = len(xs)
    if n == 0:
        return SeedStats(0, math.nan, math.nan, math.nan, seeds)
    mean = math.fsum(xs) / n
    if n < 2:
        return SeedStats(1, mean, math.nan, math.nan, seeds)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2.0, n - 1) * sd / math.sqrt(n)
    return SeedStats(n, mean, sd, half, seeds)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> SeedStats:
    """Interval of the per-seed differences ``a[s] - b[s]`` over the seeds both have."""
    common = sorted(set(a) & set(b))
    return seed_stats({s: float(a[s]) - float(b[s]) for s in common})


def near_chance(error_pct: float, trivial_pct: float, n_test: int | None = None) -> bool:
    """Whether a net with test error ``error_pct`` did not beat the trivial classifier
    (error ``trivial_pct``, percent, on the same ``n_test`` images) by more than
    :data:`CHANCE_MARGIN_PP` or two binomial standard errors of the trivial error."""
    margin = CHANCE_MARGIN_PP
    if n_test:
        p = min(max(trivial_pct / 100.0, 0.0), 1.0)
        margin = max(margin, 2.0 * 100.0 * math.sqrt(p * (1.0 - p) / n_test))
    return not error_pct <= trivial_pct - margin
