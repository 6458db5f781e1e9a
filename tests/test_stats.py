"""The comparison statistics on inputs with known answers: hand-computed Wilcoxon signed-rank cases
and rank-biserial correlations, scipy's own results on random samples, and mean +- std."""

import itertools
import math
import statistics

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from xmorpher.stats import mean_std, paired_wilcoxon, rank_biserial  # noqa: E402


def exact_two_sided_p(differences):
    """The exact two-sided p-value by enumerating every sign assignment of the ranks (no ties)."""
    ranks = scipy_stats.rankdata(np.abs(differences))
    observed = min(ranks[np.asarray(differences) > 0].sum(), ranks[np.asarray(differences) < 0].sum())
    sums = [sum(r for r, sign in zip(ranks, signs) if sign) for signs in itertools.product((0, 1), repeat=len(ranks))]
    return min(1.0, 2 * sum(s <= observed for s in sums) / len(sums))


def test_all_differences_positive_give_the_smallest_exact_p_and_r_one():
    # W- = 0: only the all-positive sign pattern is as extreme on each side: p = 2 / 2**6
    result = paired_wilcoxon([1.5, 2.5, 3.5, 4.5, 5.5, 6.5], [0.5] * 6)
    assert result.statistic == 0 and result.p_value == pytest.approx(2 / 64)
    assert result.rank_biserial == 1.0 and result.method == "exact"
    assert result.mean_difference == pytest.approx(3.5) and result.median_difference == pytest.approx(3.5)


def test_hand_computed_case_with_a_zero_difference():
    # d = 1, -2, 3, 0, 5: the zero is dropped; ranks of |d| 1, 2, 3, 4; R+ = 1 + 3 + 4 = 8, R- = 2.
    # Sign patterns of ranks {1, 2, 3, 4} with a rank sum <= 2: {}, {1}, {2}: 3 of 16, twice for two sides.
    result = paired_wilcoxon([1, -2, 3, 0, 5], [0, 0, 0, 0, 0])
    assert (result.pairs, result.nonzero) == (5, 4)
    assert result.statistic == 2 and result.p_value == pytest.approx(6 / 16)
    assert result.rank_biserial == pytest.approx((8 - 2) / 10)


@pytest.mark.parametrize("size", [5, 9, 14])
def test_exact_p_values_match_enumeration_and_scipy(seed, size):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.6, 0.1, size), rng.normal(0.58, 0.1, size)
    result = paired_wilcoxon(a, b)
    assert result.method == "exact"
    assert result.p_value == pytest.approx(exact_two_sided_p(a - b), rel=1e-9)
    reference = scipy_stats.wilcoxon(a, b, method="exact")
    assert result.p_value == pytest.approx(reference.pvalue) and result.statistic == pytest.approx(reference.statistic)


def test_ties_switch_to_scipys_normal_approximation():
    a = [0.5, 0.6, 0.7, 0.8, 0.9, 0.6, 0.7, 0.8]
    b = [0.4, 0.5, 0.6, 0.7, 0.95, 0.55, 0.65, 0.6]  # |differences| tie at 0.1 and 0.05
    result = paired_wilcoxon(a, b)
    assert result.method == "asymptotic"
    differences = np.subtract(a, b)
    reference = scipy_stats.wilcoxon(differences[differences != 0], method="asymptotic")
    assert result.p_value == pytest.approx(reference.pvalue)
    # the normal approximation by hand: mean n(n+1)/4, variance n(n+1)(2n+1)/24 less the tie term
    n = np.count_nonzero(differences)
    ranks = scipy_stats.rankdata(np.abs(differences))
    _, tie_counts = np.unique(ranks, return_counts=True)
    variance = n * (n + 1) * (2 * n + 1) / 24 - (tie_counts**3 - tie_counts).sum() / 48
    z = (result.statistic - n * (n + 1) / 4) / math.sqrt(variance)
    assert result.p_value == pytest.approx(2 * scipy_stats.norm.cdf(-abs(z)), rel=1e-9)


def test_rank_biserial_is_antisymmetric_and_ignores_zeros(seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=11)
    assert rank_biserial(d) == pytest.approx(-rank_biserial(-d))
    assert rank_biserial(np.append(d, [0.0, 0.0])) == pytest.approx(rank_biserial(d))
    assert -1 <= rank_biserial(d) <= 1
    assert math.isnan(rank_biserial([0.0, 0.0]))


def test_pairs_with_nan_are_left_out_and_equal_methods_give_no_p_value():
    with_nan = paired_wilcoxon([1.0, float("nan"), 3.0, 4.0, 5.0, 7.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert with_nan.pairs == 5
    assert with_nan.p_value == pytest.approx(paired_wilcoxon([1.0, 3.0, 4.0, 5.0, 7.0], [0.0, 1.0, 1.0, 1.0, 1.0]).p_value)
    same = paired_wilcoxon([0.5, 0.6], [0.5, 0.6])
    assert same.nonzero == 0 and math.isnan(same.p_value) and math.isnan(same.rank_biserial)


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="one length"):
        paired_wilcoxon([1.0, 2.0], [1.0])


def test_mean_std_is_the_sample_std_of_the_values_that_are_not_nan(seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=7).tolist()
    result = mean_std(values + [float("nan")])
    assert result.count == 7
    assert result.mean == pytest.approx(statistics.fmean(values)) and result.std == pytest.approx(statistics.stdev(values))
    assert mean_std([1.0, 2.0, 3.0]).as_dict() == {"mean": 2.0, "std": 1.0, "count": 3}
    one = mean_std([0.25])
    assert one.mean == 0.25 and math.isnan(one.std)
    assert math.isnan(mean_std([]).mean) and mean_std([float("nan")]).count == 0
