"""Paired two-sample tests for comparing two models on the same patients.

McNemar's test compares paired correctness, the paired t-test and the Wilcoxon signed-rank test
compare paired scores (e.g. per-fold AUCs of two methods). Every test reproduces the value of
R's ``stats`` function of the same name with its default arguments (two-sided), checked against
R 4.2 in ``tests/test_stats_paired.py``; each docstring names the R call it matches.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import special, stats

from mmdiag.stats._validation import (
    as_binary,
    as_finite_float,
    as_labels,
    check_flag,
    check_level,
    check_same_length,
)

__all__ = [
    "McNemarResult",
    "PairedTTestResult",
    "WilcoxonResult",
    "mcnemar_test",
    "paired_ttest",
    "wilcoxon_test",
]

# R's wilcox.test switches from the exact signed-rank distribution to the normal approximation
# at this many non-zero differences (its default ``exact = (n < 50)``).
WILCOXON_EXACT_MAX_N = 49


@dataclass(frozen=True)
class McNemarResult:
    """Result of :func:`mcnemar_test`.

    ``statistic`` is the number of discordant pairs won by model A (``n10``) for the exact test,
    the chi-square statistic otherwise.
    """

    statistic: float
    p_value: float
    n10: int
    n01: int


@dataclass(frozen=True)
class PairedTTestResult:
    """Result of :func:`paired_ttest`; the CI is for the mean of ``a - b``."""

    t: float
    df: int
    p_value: float
    ci_low: float
    ci_high: float
    mean_difference: float


@dataclass(frozen=True)
class WilcoxonResult:
    """Result of :func:`wilcoxon_test`: R's ``V`` and whether the p-value is exact."""

    statistic: float
    p_value: float
    exact: bool


# --------------------------------------------------------------------------------- McNemar


def mcnemar_test(y_true, pred_a, pred_b, *, exact=True, correction=True) -> McNemarResult:
    """McNemar's test that two classifiers have the same error rate on the same cases.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        True labels (any hashable labels; multi-class is fine, only correctness is used).
    pred_a, pred_b : array-like of shape (n,)
        Predicted labels of model A and model B for the same cases.
    exact : bool, default=True
        Exact binomial test on the discordant pairs (R ``binom.test(n10, n10 + n01, 0.5)``);
        if False, the chi-square test of R ``mcnemar.test`` on the 2x2 correctness table.
    correction : bool, default=True
        Continuity correction of the chi-square form (ignored when ``exact=True``).

    Returns
    -------
    McNemarResult
        ``statistic`` (``n10`` if exact, else chi-square with 1 df), two-sided ``p_value``,
        ``n10`` (A right, B wrong) and ``n01`` (A wrong, B right).

    Notes
    -----
    Only the discordant pairs carry information. Exact: under H0, ``n10 ~ Bin(n10 + n01, 1/2)``,
    and the two-sided p-value of R's ``binom.test`` (sum of the probabilities not above that of
    the observed count) reduces for p = 1/2 to

    .. math:: p = \\min\\{1, 2 F(\\min(n_{10}, n_{01}); n_{10} + n_{01}, 1/2)\\},

    with ``p = 1`` when there are no discordant pairs. Chi-square:

    .. math:: X^2 = \\frac{(|n_{10} - n_{01}| - c)^2}{n_{10} + n_{01}},

    with ``c = 1`` if ``correction`` and ``n10 != n01`` (R applies no correction to a symmetric
    table), else ``c = 0``; ``p = P(\\chi^2_1 > X^2)``. Without discordant pairs X^2 is 0/0 and
    the result is ``nan`` with a warning, as R's ``NaN``.

    References
    ----------
    .. [1] Q. McNemar, "Note on the sampling error of the difference between correlated
       proportions or percentages", Psychometrika 12(2):153-157, 1947.
    .. [2] T. G. Dietterich, "Approximate statistical tests for comparing supervised
       classification learning algorithms", Neural Computation 10(7):1895-1923, 1998.

    Examples
    --------
    >>> y = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    >>> a = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    >>> b = [0, 0, 0, 1, 0, 1, 1, 0, 0, 1]
    >>> result = mcnemar_test(y, a, b)
    >>> result.n10, result.n01, round(result.p_value, 6)
    (6, 0, 0.03125)
    """
    y_true = as_labels(y_true, "y_true")
    pred_a = as_labels(pred_a, "pred_a")
    pred_b = as_labels(pred_b, "pred_b")
    check_same_length({"y_true": y_true, "pred_a": pred_a, "pred_b": pred_b})
    check_flag(exact, "exact")
    check_flag(correction, "correction")
    return mcnemar_from_correctness(
        pred_a == y_true, pred_b == y_true, exact=exact, correction=correction
    )


def mcnemar_from_correctness(correct_a, correct_b, *, exact=True, correction=True):
    """McNemar's test from per-case correctness of two models (see :func:`mcnemar_test`).

    Parameters
    ----------
    correct_a, correct_b : array-like of bool or 0/1, shape (n,)
        Whether model A (B) classified each case correctly.
    exact, correction : bool
        As in :func:`mcnemar_test`.

    Returns
    -------
    McNemarResult

    Examples
    --------
    >>> mcnemar_from_correctness([1, 1, 1, 0], [0, 1, 0, 1], exact=False).statistic
    0.0
    """
    correct_a = as_binary(correct_a, "correct_a")
    correct_b = as_binary(correct_b, "correct_b")
    check_same_length({"correct_a": correct_a, "correct_b": correct_b})
    check_flag(exact, "exact")
    check_flag(correction, "correction")
    n10 = int(np.count_nonzero(correct_a & ~correct_b))
    n01 = int(np.count_nonzero(~correct_a & correct_b))
    if exact:
        return _mcnemar_exact(n10, n01)
    return _mcnemar_chi2(n10, n01, correction)


def _mcnemar_exact(n10: int, n01: int) -> McNemarResult:
    n = n10 + n01
    if n == 0 or 2 * n10 == n:
        p_value = 1.0
    else:
        # R's binom.test sums P(k) <= P(x) * (1 + 1e-7) over both tails; for p = 1/2 the pmf is
        # symmetric and strictly monotone on each side of n/2 (ratio (n-k)/(k+1) >= 1 + 2/n),
        # so that set is exactly {k <= min} u {k >= n - min} for n below 2e7.
        p_value = min(1.0, 2.0 * float(stats.binom.cdf(min(n10, n01), n, 0.5)))
    if n >= 20_000_000:
        p_value = _binom_two_sided_r(n10, n)
    return McNemarResult(statistic=float(n10), p_value=p_value, n10=n10, n01=n01)


def _binom_two_sided_r(x: int, n: int) -> float:
    """R's ``binom.test(x, n, 0.5)$p.value`` literally, for n where the shortcut is unproven."""
    m = n / 2
    if x == m:
        return 1.0
    rel_err = 1 + 1e-7
    d = stats.binom.pmf(x, n, 0.5)
    if x < m:
        other = np.arange(math.ceil(m), n + 1)
        y = int(np.count_nonzero(stats.binom.pmf(other, n, 0.5) <= d * rel_err))
        p_value = stats.binom.cdf(x, n, 0.5) + stats.binom.sf(n - y, n, 0.5)
    else:
        other = np.arange(0, math.floor(m) + 1)
        y = int(np.count_nonzero(stats.binom.pmf(other, n, 0.5) <= d * rel_err))
        p_value = stats.binom.cdf(y - 1, n, 0.5) + stats.binom.sf(x - 1, n, 0.5)
    return min(1.0, float(p_value))


def _mcnemar_chi2(n10: int, n01: int, correction: bool) -> McNemarResult:
    n = n10 + n01
    if n == 0:
        warnings.warn(
            "McNemar chi-square is undefined without discordant pairs (n10 + n01 == 0); "
            "returning nan",
            RuntimeWarning,
            stacklevel=3,
        )
        return McNemarResult(statistic=math.nan, p_value=math.nan, n10=n10, n01=n01)
    # R: if (correct && (r == 2) && any(x - t(x) != 0)) -- no correction for n10 == n01
    continuity = 1.0 if correction and n10 != n01 else 0.0
    statistic = (abs(n10 - n01) - continuity) ** 2 / n
    p_value = float(stats.chi2.sf(statistic, 1))
    return McNemarResult(statistic=float(statistic), p_value=p_value, n10=n10, n01=n01)


# ------------------------------------------------------------------------------- t-test


def paired_ttest(a, b, *, level=0.95) -> PairedTTestResult:
    """Paired Student t-test of mean(a - b) = 0, as R ``t.test(a, b, paired = TRUE)``.

    Parameters
    ----------
    a, b : array-like of float, shape (n,)
        Paired measurements (e.g. the per-fold AUC of two methods on the same folds), n >= 2.
    level : float, default=0.95
        Confidence level of the interval for the mean difference, in (0, 1).

    Returns
    -------
    PairedTTestResult
        ``t``, ``df = n - 1``, two-sided ``p_value``, ``ci_low``/``ci_high`` and
        ``mean_difference`` of ``a - b``.

    Notes
    -----
    With ``d = a - b``, mean ``\\bar d`` and sample standard deviation ``s_d``:

    .. math:: t = \\frac{\\bar d}{s_d / \\sqrt n}, \\quad p = 2 P(T_{n-1} > |t|), \\quad
              \\mathrm{CI} = (t \\mp t_{n-1, 1 - \\alpha/2}) \\, s_d / \\sqrt n,

    the CI written as R evaluates it. R stops with "data are essentially constant" when
    ``s_d / sqrt(n) < 10 eps |d bar|`` and returns ``NaN`` when every difference is zero; in
    both cases ``t``, ``p_value`` and the CI are ``nan`` here, with a warning.

    References
    ----------
    .. [1] Student, "The probable error of a mean", Biometrika 6(1):1-25, 1908.

    Examples
    --------
    >>> result = paired_ttest([0.81, 0.84, 0.79, 0.88, 0.83], [0.78, 0.80, 0.80, 0.84, 0.79])
    >>> result.df, round(result.mean_difference, 4), round(result.p_value, 4)
    (4, 0.028, 0.0447)
    """
    a = as_finite_float(a, "a")
    b = as_finite_float(b, "b")
    check_same_length({"a": a, "b": b})
    level = check_level(level)
    return _paired_ttest(a - b, level)


def _paired_ttest(d: np.ndarray, level: float) -> PairedTTestResult:
    n = len(d)
    df = n - 1
    mean = _mean(d)
    stderr = math.sqrt(float(np.sum((d - mean) ** 2)) / df / n)
    # R stops with "data are essentially constant"; all-zero differences give R's NaN (0/0)
    if stderr == 0.0 or stderr < 10 * np.finfo(float).eps * abs(mean):
        warnings.warn(
            "differences a - b are essentially constant; t and p_value are undefined (nan)",
            RuntimeWarning,
            stacklevel=3,
        )
        return PairedTTestResult(math.nan, df, math.nan, math.nan, math.nan, mean)
    t = mean / stderr
    p_value = 2.0 * float(stats.t.sf(abs(t), df))
    quantile = float(stats.t.ppf(1.0 - (1.0 - level) / 2.0, df))
    return PairedTTestResult(
        t=t,
        df=df,
        p_value=p_value,
        ci_low=(t - quantile) * stderr,
        ci_high=(t + quantile) * stderr,
        mean_difference=mean,
    )


def _mean(x: np.ndarray) -> float:
    # R's mean(): sum / n, then one refinement pass, which makes it accurate to the last bit
    mean = float(np.sum(x)) / len(x)
    return mean + float(np.sum(x - mean)) / len(x)


# ----------------------------------------------------------------------------- Wilcoxon


def wilcoxon_test(a, b) -> WilcoxonResult:
    """Wilcoxon signed-rank test of paired samples, as R ``wilcox.test(a, b, paired = TRUE)``.

    Parameters
    ----------
    a, b : array-like of float, shape (n,)
        Paired measurements, n >= 2.

    Returns
    -------
    WilcoxonResult
        ``statistic`` (R's ``V``), two-sided ``p_value`` and ``exact`` (whether the exact
        signed-rank distribution was used).

    Notes
    -----
    Differences ``d = a - b`` equal to zero are dropped, leaving n of them; with ``R_i`` the
    (mid-)rank of ``|d_i|``, ``V = sum_{d_i > 0} R_i``. As R's defaults:

    * exact when ``n < 50`` and there are neither ties among ``|d|`` nor zeros:
      ``p = min(1, 2 P(V' >= V))`` if ``V > n(n+1)/4``, else ``min(1, 2 P(V' <= V))``, with
      ``V'`` the null signed-rank distribution (counts of subsets of ``1..n`` by sum);
    * otherwise the normal approximation with continuity and tie correction

      .. math:: z = \\frac{V - n(n+1)/4 - \\operatorname{sign}(\\cdot)/2}
                {\\sqrt{n(n+1)(2n+1)/24 - \\sum_j (t_j^3 - t_j)/48}},
                \\quad p = 2 \\min(\\Phi(z), 1 - \\Phi(z)),

      where ``t_j`` are the sizes of groups of tied ``|d|``.

    Ties are exact floating-point equality of ``|a - b|`` (R's default ``digits.rank = Inf``).
    When every difference is zero the p-value is undefined (R: ``NaN``): ``nan`` with a
    warning.

    References
    ----------
    .. [1] F. Wilcoxon, "Individual comparisons by ranking methods", Biometrics Bulletin
       1(6):80-83, 1945.
    .. [2] M. Hollander and D. A. Wolfe, Nonparametric Statistical Methods, Wiley, 1973.

    Examples
    --------
    >>> result = wilcoxon_test([12, 15, 11, 18, 14], [10, 11, 14, 13, 13])
    >>> result.statistic, result.p_value, result.exact
    (12.0, 0.3125, True)
    """
    a = as_finite_float(a, "a")
    b = as_finite_float(b, "b")
    check_same_length({"a": a, "b": b})
    return _wilcoxon(a - b)


def _wilcoxon(d: np.ndarray) -> WilcoxonResult:
    has_zeros = bool(np.any(d == 0))
    d = d[d != 0]
    n = len(d)
    abs_d = np.abs(d)
    ranks = stats.rankdata(abs_d, method="average")
    statistic = float(np.sum(ranks[d > 0]))
    _, tie_sizes = np.unique(abs_d, return_counts=True)
    has_ties = bool(np.any(tie_sizes > 1))
    if n <= WILCOXON_EXACT_MAX_N and not has_ties and not has_zeros:
        return WilcoxonResult(statistic, _signrank_exact_p(int(statistic), n), True)
    if n == 0:
        warnings.warn(
            "all differences a - b are zero; the Wilcoxon p-value is undefined (nan)",
            RuntimeWarning,
            stacklevel=3,
        )
        return WilcoxonResult(statistic, math.nan, False)
    z = statistic - n * (n + 1) / 4
    tie_sizes = tie_sizes.astype(np.float64)
    sigma = math.sqrt(n * (n + 1) * (2 * n + 1) / 24 - float(np.sum(tie_sizes**3 - tie_sizes)) / 48)
    z = (z - np.sign(z) * 0.5) / sigma
    p_value = 2.0 * min(float(special.ndtr(z)), float(special.ndtr(-z)))
    return WilcoxonResult(statistic, p_value, False)


@cache
def _signrank_counts(n: int) -> tuple[int, ...]:
    """Number of subsets of {1, ..., n} with each sum 0..n(n+1)/2 (exact integers)."""
    counts = [1] + [0] * (n * (n + 1) // 2)
    for k in range(1, n + 1):
        for total in range(k * (k + 1) // 2, k - 1, -1):
            counts[total] += counts[total - k]
    return tuple(counts)


def _signrank_exact_p(statistic: int, n: int) -> float:
    counts = _signrank_counts(n)
    if statistic > n * (n + 1) / 4:
        tail = sum(counts[statistic:])  # P(V >= statistic), R: psignrank(V - 1, upper)
    else:
        tail = sum(counts[: statistic + 1])  # P(V <= statistic)
    return min(1.0, 2.0 * tail / 2**n)
