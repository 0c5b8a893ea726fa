"""McNemar, paired t and Wilcoxon signed-rank tests against R 4.2 and slow references.

The R values come from ``tests/fixtures/stats/paired/`` (``regenerate.py`` rewrites them).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mmdiag.stats.paired import (
    McNemarResult,
    _binom_two_sided_r,
    _signrank_exact_p,
    mcnemar_from_correctness,
    mcnemar_test,
    paired_ttest,
    wilcoxon_test,
)

FIXTURES = Path(__file__).parent / "fixtures" / "stats" / "paired"
REL = 1e-9


def read_exact(name: str) -> pd.DataFrame:
    """A fixture TSV with floats parsed by Python's correctly rounded ``float`` ("NA" -> nan)."""
    table = pd.read_csv(FIXTURES / name, sep="\t", dtype=str, keep_default_na=False)
    for column in table.columns.drop("case"):
        if column in {"t_error", "wilcoxon_exact"}:  # text columns
            continue
        table[column] = [math.nan if v in {"NA", "NaN"} else float(v) for v in table[column]]
    return table.set_index("case")


def assert_matches_r(actual: float, expected: float, what: str) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: R gives NA, got {actual!r}"
    else:
        assert abs(actual - expected) <= REL * abs(expected), (
            f"{what}: {actual!r} vs R {expected!r}"
        )


# ----------------------------------------------------------------------------- McNemar

MCNEMAR_CASES = read_exact("mcnemar_inputs.tsv")
MCNEMAR_R = read_exact("mcnemar_expected.tsv")


def labels_from_table(n11: int, n10: int, n01: int, n00: int, seed: int):
    """Shuffled three-class labels whose correctness table is [[n11, n10], [n01, n00]]."""
    rng = np.random.default_rng(seed)
    correct_a = np.repeat([True, True, False, False], [n11, n10, n01, n00])
    correct_b = np.repeat([True, False, True, False], [n11, n10, n01, n00])
    order = rng.permutation(len(correct_a))
    correct_a, correct_b = correct_a[order], correct_b[order]
    y_true = rng.integers(0, 3, len(correct_a))
    wrong = (y_true + rng.integers(1, 3, len(y_true))) % 3  # any other class
    return y_true, np.where(correct_a, y_true, wrong), np.where(correct_b, y_true, wrong)


@pytest.mark.parametrize("case", MCNEMAR_CASES.index)
def test_mcnemar_matches_r(case):
    n11, n10, n01, n00 = (int(v) for v in MCNEMAR_CASES.loc[case])
    y_true, pred_a, pred_b = labels_from_table(n11, n10, n01, n00, seed=len(case))
    expected = MCNEMAR_R.loc[case]

    exact = mcnemar_test(y_true, pred_a, pred_b)
    assert (exact.n10, exact.n01) == (n10, n01)
    assert_matches_r(exact.statistic, expected["exact_statistic"], f"{case} exact statistic")
    assert_matches_r(exact.p_value, expected["exact_p"], f"{case} exact p")

    for correction, prefix in ((True, "corrected"), (False, "plain")):
        if n10 + n01 == 0:
            with pytest.warns(RuntimeWarning, match="discordant"):
                chi2 = mcnemar_test(y_true, pred_a, pred_b, exact=False, correction=correction)
        else:
            chi2 = mcnemar_test(y_true, pred_a, pred_b, exact=False, correction=correction)
        assert_matches_r(chi2.statistic, expected[f"{prefix}_statistic"], f"{case} {prefix}")
        assert_matches_r(chi2.p_value, expected[f"{prefix}_p"], f"{case} {prefix} p")


def test_mcnemar_exact_is_binomial_tail_sum():
    # slow reference: sum the probabilities of all outcomes no likelier than the observed one
    for n10, n01 in itertools.product(range(12), repeat=2):
        n = n10 + n01
        if n == 0:
            continue
        pmf = [math.comb(n, k) / 2**n for k in range(n + 1)]
        expected = min(1.0, sum(p for p in pmf if p <= pmf[n10] * (1 + 1e-7)))
        result = mcnemar_from_correctness(
            [1] * n10 + [0] * n01 + [1, 0], [0] * n10 + [1] * n01 + [1, 0]
        )
        assert result.p_value == pytest.approx(expected, rel=1e-12)
        assert result.p_value == pytest.approx(_binom_two_sided_r(n10, n), rel=1e-12)


def test_mcnemar_symmetric_no_correction_and_result_type():
    result = mcnemar_from_correctness([1, 1, 0, 0, 1], [0, 0, 1, 1, 1], exact=False)
    assert result == McNemarResult(statistic=0.0, p_value=1.0, n10=2, n01=2)
    assert isinstance(result.statistic, float) and isinstance(result.n10, int)
    with pytest.raises(AttributeError):
        result.p_value = 0.5  # frozen


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([0, 1, 1], [0, 1], [0, 1, 1]), {}, "lengths differ"),
        (([1], [1], [0]), {}, "at least 2 pairs"),
        (([0, np.nan], [0, 1], [1, 1]), {}, "y_true contains NaN"),
        (([0, 1], [0, 1], [1, 1]), {"exact": "yes"}, "exact must be True or False"),
        (([[0, 1]], [[0, 1]], [[1, 1]]), {}, "one-dimensional"),
    ],
)
def test_mcnemar_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mcnemar_test(*args, **kwargs)


def test_mcnemar_correctness_must_be_binary():
    with pytest.raises(ValueError, match=r"correct_a must be boolean or 0/1, got 2"):
        mcnemar_from_correctness([0, 2, 1], [1, 1, 0])
    with pytest.raises(ValueError, match="correct_b"):
        mcnemar_from_correctness([0, 1, 1], ["a", "b", "c"])


def test_mcnemar_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        mcnemar_test([0, 1], [0, 1], [1, 1], False)


# ------------------------------------------------------------------ t-test and Wilcoxon

PAIR_CASES = read_exact("pairs_cases.tsv")
PAIR_R = read_exact("pairs_expected.tsv")
PAIRS = pd.read_csv(FIXTURES / "pairs_inputs.tsv.gz", sep="\t", dtype=str)


def pair_inputs(case: str) -> tuple[np.ndarray, np.ndarray]:
    rows = PAIRS[PAIRS["case"] == case]
    return np.array([float(v) for v in rows["a"]]), np.array([float(v) for v in rows["b"]])


@pytest.mark.parametrize("case", PAIR_CASES.index)
def test_paired_ttest_matches_r(case):
    a, b = pair_inputs(case)
    expected = PAIR_R.loc[case]
    level = float(PAIR_CASES.loc[case, "level"])
    if expected["t_error"] or np.all(a == b):
        with pytest.warns(RuntimeWarning, match="constant"):
            result = paired_ttest(a, b, level=level)
    else:
        result = paired_ttest(a, b, level=level)
    assert result.df == int(expected["df"]) and isinstance(result.df, int)
    for field, column in [
        ("t", "t"),
        ("p_value", "t_p"),
        ("ci_low", "ci_low"),
        ("ci_high", "ci_high"),
        ("mean_difference", "mean_difference"),
    ]:
        assert_matches_r(getattr(result, field), expected[column], f"{case} {field}")


@pytest.mark.parametrize("case", PAIR_CASES.index)
def test_wilcoxon_matches_r(case):
    a, b = pair_inputs(case)
    expected = PAIR_R.loc[case]
    if np.all(a == b):
        with pytest.warns(RuntimeWarning, match="all differences"):
            result = wilcoxon_test(a, b)
    else:
        result = wilcoxon_test(a, b)
    assert result.exact is (expected["wilcoxon_exact"] == "TRUE")
    assert_matches_r(result.statistic, expected["v"], f"{case} V")
    assert_matches_r(result.p_value, expected["wilcoxon_p"], f"{case} p")


def signrank_p_by_enumeration(d: np.ndarray) -> float:
    """Two-sided exact p of R's rule, enumerating all 2^n sign patterns (slow reference)."""
    n = len(d)
    ranks = stats.rankdata(np.abs(d))
    v = ranks[d > 0].sum()
    sums = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s)
        for signs in itertools.product((0, 1), repeat=n)
    ]
    sums = np.array(sums)
    tail = np.mean(sums >= v) if v > n * (n + 1) / 4 else np.mean(sums <= v)
    return min(1.0, 2 * tail)


def test_wilcoxon_exact_p_by_enumeration():
    rng = np.random.default_rng(1)
    for n in range(1, 13):
        for _ in range(5):
            a, b = rng.normal(0.4, 1, n), rng.normal(0, 1, n)
            if n == 1:
                a, b = np.r_[a, 1.0], np.r_[b, 0.5]
            result = wilcoxon_test(a, b)
            assert result.exact
            assert result.p_value == pytest.approx(signrank_p_by_enumeration(a - b), rel=1e-12)


def signrank_p_by_convolution(v: int, n: int) -> float:
    """R's two-sided exact p from the null pmf built as the product of (1 + x^k), k = 1..n."""
    counts = np.array([1.0])
    for k in range(1, n + 1):
        counts = np.convolve(counts, np.r_[1.0, np.zeros(k - 1), 1.0])
    pmf = counts / counts.sum()
    tail = pmf[v:].sum() if v > n * (n + 1) / 4 else pmf[: v + 1].sum()
    return min(1.0, 2 * tail)


def test_signrank_exact_p_matches_convolution():
    for n in (5, 20, 49):
        for v in range(0, n * (n + 1) // 2 + 1, 7):
            assert _signrank_exact_p(v, n) == pytest.approx(
                signrank_p_by_convolution(v, n), rel=1e-10
            )


def test_paired_ttest_matches_scipy():
    rng = np.random.default_rng(2)
    for n in (2, 5, 10, 100):
        a, b = rng.normal(0.2, 1, n), rng.normal(0, 1, n)
        result = paired_ttest(a, b, level=0.9)
        reference = stats.ttest_rel(a, b)
        assert result.t == pytest.approx(reference.statistic, rel=1e-12)
        assert result.p_value == pytest.approx(reference.pvalue, rel=1e-10)
        ci = reference.confidence_interval(0.9)
        assert (result.ci_low, result.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], {}, "lengths differ"),
        ([1.0], [2.0], {}, "at least 2 pairs"),
        ([1.0, np.nan], [2.0, 1.0], {}, r"a must be finite, got nan at index 1"),
        ([1.0, 2.0], [2.0, np.inf], {}, "b must be finite"),
        (["x", "y"], [2.0, 1.0], {}, "a must be numeric"),
        ([1.0, 2.0], [2.0, 1.5], {"level": 1.0}, r"level must be a number in \(0, 1\), got 1.0"),
        ([1.0, 2.0], [2.0, 1.5], {"level": 0}, "level"),
        ([1.0, 2.0], [2.0, 1.5], {"level": 95}, "got 95"),
    ],
)
def test_paired_ttest_rejects_bad_arguments(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_ttest(a, b, **kwargs)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "lengths differ"),
        ([1.0], [2.0], "at least 2 pairs"),
        ([1.0, np.nan], [2.0, 1.0], "a must be finite"),
    ],
)
def test_wilcoxon_rejects_bad_arguments(a, b, message):
    with pytest.raises(ValueError, match=message):
        wilcoxon_test(a, b)


def test_paired_ttest_level_is_keyword_only():
    with pytest.raises(TypeError):
        paired_ttest([1.0, 2.0], [0.5, 1.0], 0.9)
