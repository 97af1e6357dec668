"""Paired comparison of two arms over seeds: bootstrap interval and Wilcoxon signed-rank test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedComparison:
    """``b - a`` over paired seeds.

    ``mean_difference``: mean of the per-seed differences; ``ci_low``/``ci_high``: percentile
    bootstrap interval of that mean at ``level``; ``p_value``: exact Wilcoxon signed-rank test
    (``alternative`` as in :func:`scipy.stats.wilcoxon`; None with fewer than two non-zero
    differences); ``wins``: seeds where ``b > a``.
    """

    n: int
    mean_difference: float
    ci_low: float
    ci_high: float
    level: float
    p_value: float | None
    alternative: str
    wins: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_interval(values: Sequence[float], resamples: int, seed: int, level: float = 0.95
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def compare_paired(a: Sequence[float], b: Sequence[float], *, alternative: str = "two-sided",
                   resamples: int = 10000, seed: int = 0, level: float = 0.95) -> PairedComparison:
    """Compare ``b`` with ``a`` (same length, paired by position, e.g. by seed)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired values need two equal-length lists, got {a.shape} and {b.shape}")
    diff = b - a
    low, high = bootstrap_interval(diff, resamples, seed, level)
    p = None
    if np.count_nonzero(diff) >= 2:
        # exact null distribution: seeds are few, and the normal approximation is poor there
        method = "exact" if np.count_nonzero(diff) == len(diff) else "auto"
        p = float(stats.wilcoxon(diff, alternative=alternative, method=method).pvalue)
    return PairedComparison(len(diff), float(diff.mean()), low, high, level, p, alternative, int((diff > 0).sum()))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of ``p_values`` (one family of tests; None stays None): compare
    each adjusted value with the family's level, and at most that share of families with any true
    null hypothesis claims one."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        out[i] = running
    return out
