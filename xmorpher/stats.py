"""Statistics for comparing registration methods: mean and spread over seeds, and a paired test of
two methods over the same test pairs (Wilcoxon signed-rank, with an effect size).

The test itself is scipy's (``scipy.stats.wilcoxon``); this module only fixes the conventions a
comparison table needs and reports them with the result: which differences are dropped, which
p-value (two-sided; exact for small samples without ties), and the matched-pairs rank-biserial correlation as the
effect size (Kerby 2014): ``(R+ - R-) / (R+ + R-)``, the share of the rank sum of the non-zero
differences favouring the first method minus the share favouring the second, in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import registration_extra

__all__ = ["MeanStd", "mean_std", "PairedTest", "paired_wilcoxon", "rank_biserial"]


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof 1) of the finite values; ``std`` is NaN for fewer
    than two values, ``mean`` NaN for none; ``count`` says how many values were used."""

    mean: float
    std: float
    count: int

    def as_dict(self) -> dict:
        return asdict(self)


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean +- sample std (ddof 1: the seeds are a sample of the seeds one could have drawn) of the
    values that are not NaN."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    mean = float(finite.mean()) if finite.size else math.nan
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return MeanStd(mean, std, int(finite.size))


def rank_biserial(differences: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation of paired differences: zero differences dropped,
    absolute values ranked (ties get their average rank), ``(R+ - R-) / (R+ + R-)``. 1 when every
    non-zero difference is positive, -1 when every one is negative; NaN when none is non-zero."""
    with registration_extra():
        from scipy.stats import rankdata

    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return math.nan
    ranks = rankdata(np.abs(d))
    positive, negative = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((positive - negative) / (positive + negative))


@dataclass(frozen=True)
class PairedTest:
    """Two-sided Wilcoxon signed-rank test of ``a - b`` over pairs.

    Attributes:
        pairs: pairs compared (pairs with a NaN on either side are left out).
        nonzero: pairs whose difference is not zero (the test ranks only these).
        statistic: scipy's statistic (the smaller of the two signed rank sums, two-sided).
        p_value: two-sided p-value; NaN with no non-zero difference.
        method: "exact" (up to 50 non-zero differences, all of distinct size) or "asymptotic"
            (the normal approximation, without continuity correction).
        rank_biserial: effect size in [-1, 1], positive when ``a`` tends to be larger.
        mean_difference, median_difference: of ``a - b``.
    """

    pairs: int
    nonzero: int
    statistic: float
    p_value: float
    method: str
    rank_biserial: float
    mean_difference: float
    median_difference: float

    def as_dict(self) -> dict:
        return asdict(self)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Wilcoxon signed-rank test of ``a`` against ``b`` paired by position (e.g. two methods' Dice on
    the same test pairs), two-sided, zero differences dropped (Wilcoxon's convention, scipy's
    default); the exact p-value for up to 50 non-zero differences of distinct sizes, the normal
    approximation otherwise."""
    with registration_extra():
        from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a and b must be 1-D and of one length, got shapes {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    nonzero = int(np.count_nonzero(d))
    mean_difference = float(d.mean()) if d.size else math.nan
    median_difference = float(np.median(d)) if d.size else math.nan
    if nonzero == 0:
        return PairedTest(int(d.size), 0, math.nan, math.nan, "none", math.nan, mean_difference, median_difference)
    # Wilcoxon's convention: zero differences say nothing about the direction and are dropped.
    # The exact null distribution assumes distinct |differences|; with ties, the normal approximation.
    nonzero_d = d[d != 0]
    exact = nonzero <= 50 and np.unique(np.abs(nonzero_d)).size == nonzero
    method = "exact" if exact else "asymptotic"
    result = wilcoxon(nonzero_d, alternative="two-sided", method=method)
    return PairedTest(
        int(d.size), nonzero, float(result.statistic), float(result.pvalue), method, rank_biserial(d),
        mean_difference, median_difference,
    )
