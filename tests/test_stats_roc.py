"""Tests of mmdiag.stats.roc: pROC's numbers, a slow O(n^2) DeLong reference, sklearn, bootstrap."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from mmdiag import stats
from mmdiag.stats import roc
from mmdiag.stats.roc import (
    AUCInterval,
    BootstrapResult,
    DeLongResult,
    auc_ci,
    bootstrap_auc_test,
    delong_test,
    delong_variance,
    multiclass_auc,
)

FIXTURES = Path(__file__).parent / "fixtures" / "stats" / "roc"
REL, ABS = 1e-9, 1e-15


def approx(expected):
    return pytest.approx(expected, rel=REL, abs=ABS, nan_ok=True)


# --------------------------------------------------------------------------------------------
# Slow, obviously correct reference: DeLong et al. (1988) with the pairwise kernel
# --------------------------------------------------------------------------------------------


def psi(x: float, y: float) -> float:
    """Mann-Whitney kernel: positive score x against negative score y."""
    if x > y:
        return 1.0
    if x == y:
        return 0.5
    return 0.0


def reference_delong(y, scores):
    """AUCs and covariance matrix S10 / m + S01 / n by explicit loops over all pairs."""
    y = np.asarray(y)
    k = len(scores)
    pos_idx = [i for i in range(len(y)) if y[i] == 1]
    neg_idx = [j for j in range(len(y)) if y[j] == 0]
    m, n = len(pos_idx), len(neg_idx)
    v10 = [[0.0] * m for _ in range(k)]  # structural components of the positives
    v01 = [[0.0] * n for _ in range(k)]  # ... and of the negatives
    auc = [0.0] * k
    for r, s in enumerate(scores):
        for a, i in enumerate(pos_idx):
            for b, j in enumerate(neg_idx):
                value = psi(s[i], s[j])
                v10[r][a] += value / n
                v01[r][b] += value / m
                auc[r] += value / (m * n)
    s10 = [[0.0] * k for _ in range(k)]
    s01 = [[0.0] * k for _ in range(k)]
    for r in range(k):
        for q in range(k):
            s10[r][q] = sum((v10[r][a] - auc[r]) * (v10[q][a] - auc[q]) for a in range(m)) / (m - 1)
            s01[r][q] = sum((v01[r][b] - auc[r]) * (v01[q][b] - auc[q]) for b in range(n)) / (n - 1)
    cov = [[s10[r][q] / m + s01[r][q] / n for q in range(k)] for r in range(k)]
    return auc, cov


def reference_test(y, a, b):
    auc, s = reference_delong(y, [a, b])
    var_diff = s[0][0] + s[1][1] - 2 * s[0][1]
    z = (auc[0] - auc[1]) / math.sqrt(var_diff) if var_diff > 1e-14 else math.nan
    p = 2 * (1 - norm.cdf(abs(z))) if not math.isnan(z) else math.nan
    return auc, s, z, p


def random_case(rng, n, decimals):
    n_pos = int(rng.integers(2, n - 1))
    y = np.zeros(n, dtype=int)
    y[rng.choice(n, n_pos, replace=False)] = 1
    a = np.round(y * rng.uniform(0, 1.5) + rng.standard_normal(n), decimals)
    b = np.round(0.5 * a + y * rng.uniform(0, 1) + rng.standard_normal(n), decimals)
    return y, a, b


@pytest.mark.parametrize("seed", range(150))
def test_fast_delong_matches_pairwise_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 60))
    decimals = [0, 1, 3][seed % 3]  # 0 and 1 decimal: heavy ties
    y, a, b = random_case(rng, n, decimals)
    auc, s, z, p = reference_test(y, a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rare degenerate draws
        result = delong_test(y, a, b)
    assert result.auc_a == pytest.approx(auc[0], rel=1e-12, abs=1e-15)
    assert result.auc_b == pytest.approx(auc[1], rel=1e-12, abs=1e-15)
    assert result.var_a == pytest.approx(s[0][0], rel=1e-10, abs=1e-15)
    assert result.var_b == pytest.approx(s[1][1], rel=1e-10, abs=1e-15)
    assert result.cov == pytest.approx(s[0][1], rel=1e-10, abs=1e-15)
    if not math.isnan(z):
        assert result.z == pytest.approx(z, rel=1e-8, abs=1e-12)
        assert result.p_value == pytest.approx(p, rel=1e-8, abs=1e-12)
    assert delong_variance(y, a) == pytest.approx((auc[0], s[0][0]), rel=1e-10, abs=1e-15)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(50):
        y, a, _ = random_case(rng, int(rng.integers(5, 300)), int(rng.integers(0, 3)))
        assert delong_variance(y, a)[0] == pytest.approx(roc_auc_score(y, a), rel=1e-12)


# --------------------------------------------------------------------------------------------
# pROC (R) reference numbers, see fixtures/stats/roc/regenerate.py
# --------------------------------------------------------------------------------------------


def _parse_r_number(text: str) -> float:
    """Exact (correctly rounded) parse of R's ``sprintf("%.17g")`` output, NA included."""
    return math.nan if text == "NA" else float(text)  # float() knows NaN, Inf, -Inf


def _read_tsv(path: Path) -> pd.DataFrame:
    # Read as text and parse with float(): correctly rounded, so the 17 significant digits
    # give back R's doubles bit for bit (what float_precision="round_trip" did; deprecated).
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    for column in table.columns:
        if column not in ("case", "file", "description"):
            table[column] = [_parse_r_number(v) for v in table[column]]
    return table


R_RESULTS = _read_tsv(FIXTURES / "r_results.tsv").set_index("case")
CASES = _read_tsv(FIXTURES / "cases.tsv").set_index("case")


def _load_case(case: str):
    data = _read_tsv(FIXTURES / CASES.loc[case, "file"])
    return data["y"].to_numpy().astype(int), data["a"].to_numpy(), data["b"].to_numpy()


def _r_test_is_degenerate(r) -> bool:
    """pROC's L S L' is 0: pROC 1.18 reports Z = 0, p = 1 or Z = +-Inf, p = 0."""
    return r["var_a"] + r["var_b"] - 2 * r["cov"] == 0


def test_fixture_cases_cover_the_brief():
    sizes = set(R_RESULTS["n"])
    assert {10, 100, 1000, 10_000, 100_000} <= sizes
    assert any(R_RESULTS["n_pos"] / R_RESULTS["n"] == 0.01)
    for case in ("constant_both", "perfect_both", "identical", "n10000_ties", "n1000_highcorr"):
        assert case in R_RESULTS.index
    total_bytes = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total_bytes < 3_000_000


@pytest.mark.parametrize("case", list(R_RESULTS.index))
def test_delong_matches_proc(case):
    r = R_RESULTS.loc[case]
    y, a, b = _load_case(case)
    assert (y.size, int(y.sum())) == (r.n, r.n_pos)
    if _r_test_is_degenerate(r):
        with pytest.warns(UserWarning, match="variance of the AUC difference is 0.0 "):
            result = delong_test(y, a, b)
        # deliberate departure from pROC 1.18 (documented in delong_test's Notes)
        assert (r.z, r.p_value) in {(0.0, 1.0), (-math.inf, 0.0), (math.inf, 0.0)}
        assert math.isnan(result.z) and math.isnan(result.p_value)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = delong_test(y, a, b)
        assert result.z == approx(r.z)
        assert result.p_value == approx(r.p_value)
    assert result.auc_a == approx(r.auc_a)
    assert result.auc_b == approx(r.auc_b)
    assert result.var_a == approx(r.var_a)
    assert result.var_b == approx(r.var_b)
    assert result.cov == approx(r["cov"])
    assert delong_variance(y, b) == (result.auc_b, result.var_b)


@pytest.mark.parametrize("case", list(R_RESULTS.index))
def test_auc_ci_matches_proc(case):
    r = R_RESULTS.loc[case]
    y, a, b = _load_case(case)
    ci_a = auc_ci(y, a)
    assert (ci_a.auc, ci_a.low, ci_a.high) == approx((r.auc_a, r.ci95_a_low, r.ci95_a_high))
    ci_a90 = auc_ci(y, a, level=0.90)
    assert (ci_a90.low, ci_a90.high) == approx((r.ci90_a_low, r.ci90_a_high))
    ci_b = auc_ci(y, b, level=0.95)
    assert (ci_b.auc, ci_b.low, ci_b.high) == approx((r.auc_b, r.ci95_b_low, r.ci95_b_high))


# --------------------------------------------------------------------------------------------
# Behaviour of the DeLong functions
# --------------------------------------------------------------------------------------------


def test_results_are_frozen_dataclasses_of_floats():
    y, a, b = random_case(np.random.default_rng(0), 40, 2)
    result = delong_test(y, a, b)
    assert [f.name for f in dataclasses.fields(DeLongResult)] == [
        "auc_a", "auc_b", "var_a", "var_b", "cov", "z", "p_value",
    ]  # fmt: skip
    assert all(type(getattr(result, f.name)) is float for f in dataclasses.fields(result))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.z = 0.0  # type: ignore[misc]
    interval = auc_ci(y, a)
    assert [f.name for f in dataclasses.fields(AUCInterval)] == ["auc", "low", "high"]
    assert all(type(v) is float for v in dataclasses.astuple(interval))
    auc, var = delong_variance(y, a)
    assert type(auc) is float and type(var) is float


def test_label_encodings_and_list_inputs_agree():
    y, a, b = random_case(np.random.default_rng(1), 30, 1)
    expected = delong_test(y, a, b)
    assert delong_test(y.astype(bool), a, b) == expected
    assert delong_test(y.astype(float), a, b) == expected
    assert delong_test(y.tolist(), a.tolist(), b.tolist()) == expected


def test_swapping_scores_flips_z():
    y, a, b = random_case(np.random.default_rng(2), 80, 2)
    ab, ba = delong_test(y, a, b), delong_test(y, b, a)
    assert ba.z == pytest.approx(-ab.z, rel=1e-12)
    assert ba.p_value == pytest.approx(ab.p_value, rel=1e-12)
    assert (ba.var_a, ba.var_b, ba.cov) == pytest.approx((ab.var_b, ab.var_a, ab.cov), rel=1e-12)


def test_monotone_transform_changes_nothing():
    y, a, b = random_case(np.random.default_rng(3), 60, 1)
    assert delong_test(y, np.exp(3 * a), b) == delong_test(y, a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], None),  # identical
        ([0.3] * 6, [0.7] * 6),  # both constant
        ([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0.0, 0.1, 0.2, 0.5, 0.6, 0.9]),  # both perfect
    ],
)
def test_zero_variance_warns_and_returns_nan(a, b):
    y = [0, 0, 0, 1, 1, 1]
    b = a if b is None else b
    with pytest.warns(UserWarning, match="undefined"):
        result = delong_test(y, a, b)
    assert math.isnan(result.z) and math.isnan(result.p_value)
    assert result.auc_a == pytest.approx(result.auc_b)


def test_single_sample_in_a_class_warns_and_returns_nan_variance():
    y, a, b = [0, 0, 0, 1], [0.1, 0.5, 0.3, 0.4], [0.2, 0.1, 0.3, 0.9]
    with pytest.warns(UserWarning, match="fewer than 2 samples"):
        auc, var = delong_variance(y, a)
    assert auc == pytest.approx(2 / 3) and math.isnan(var)
    with pytest.warns(UserWarning, match="fewer than 2 samples"):
        result = delong_test(y, a, b)
    assert math.isnan(result.var_a) and math.isnan(result.p_value)
    with pytest.warns(UserWarning, match="fewer than 2 samples"):
        interval = auc_ci(y, a)
    assert math.isnan(interval.low) and math.isnan(interval.high)


def test_auc_ci_is_clipped_and_centred():
    y = [0, 0, 0, 1, 1, 1]
    interval = auc_ci(y, [0.1, 0.3, 0.5, 0.4, 0.8, 0.9])
    assert interval.high == 1.0
    auc, var = delong_variance(y, [0.1, 0.3, 0.5, 0.4, 0.8, 0.9])
    assert interval.low == pytest.approx(auc - norm.ppf(0.975) * math.sqrt(var), rel=1e-12)


def test_fast_delong_handles_large_input_quickly():
    rng = np.random.default_rng(4)
    n = 200_000
    y = rng.random(n) < 0.3
    a, b = y + rng.standard_normal(n), 0.8 * y + rng.standard_normal(n)
    result = delong_test(y, a, b)
    assert 0.5 < result.auc_b < result.auc_a < 1 and result.p_value < 1e-10


# --------------------------------------------------------------------------------------------
# Multi-class AUC against scikit-learn
# --------------------------------------------------------------------------------------------


def reference_hand_till(y, prob):
    """Hand & Till (2001) M by its definition, with the pairwise kernel."""
    y, prob = np.asarray(y), np.asarray(prob)
    n_classes = prob.shape[1]

    def a(i, j):  # A(i|j): class i against class j, with score prob[:, i]
        xs, ys = prob[y == i, i], prob[y == j, i]
        return sum(psi(x, v) for x in xs for v in ys) / (xs.size * ys.size)

    pairs = list(combinations(range(n_classes), 2))
    return sum((a(i, j) + a(j, i)) / 2 for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(25))
def test_multiclass_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(3, 6))
    n = int(rng.integers(3 * n_classes, 120))
    y = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)])
    logits = rng.standard_normal((n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    prob = np.round(prob, 2 if seed % 2 else 6)  # ties on odd seeds
    prob /= prob.sum(axis=1, keepdims=True)
    for method in ("ovr", "ovo"):
        expected = roc_auc_score(y, prob, multi_class=method, average="macro")
        assert multiclass_auc(y, prob, method=method) == pytest.approx(expected, rel=1e-12)
    assert multiclass_auc(y, prob, method="ovo") == pytest.approx(
        reference_hand_till(y, prob), rel=1e-12
    )


def test_multiclass_auc_two_classes_equals_binary_auc():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 50)
    y[:2] = [0, 1]
    p1 = np.round(rng.random(50), 1)
    prob = np.column_stack([1 - p1, p1])
    binary = delong_variance(y, p1)[0]
    assert multiclass_auc(y, prob) == pytest.approx(binary)
    assert multiclass_auc(y, prob, method="ovo") == pytest.approx(binary)
    assert type(multiclass_auc(y, prob)) is float


# --------------------------------------------------------------------------------------------
# Bootstrap test
# --------------------------------------------------------------------------------------------


def test_stratified_resamples_keep_class_counts():
    m, n = 7, 13
    draws = list(roc._bootstrap_indices(m, n, n_boot=25, seed=3, chunk=4))
    assert sum(idx_pos.shape[0] for idx_pos, _ in draws) == 25
    for idx_pos, idx_neg in draws:
        assert idx_pos.shape[1] == m and idx_neg.shape[1] == n
        assert idx_pos.min() >= 0 and idx_pos.max() < m
        assert idx_neg.min() >= 0 and idx_neg.max() < n
        assert (roc._row_counts(idx_pos, m).sum(axis=1) == m).all()
        assert (roc._row_counts(idx_neg, n).sum(axis=1) == n).all()


def test_stream_does_not_depend_on_chunk_size():
    big = np.concatenate([p for p, _ in roc._bootstrap_indices(5, 6, 10, seed=9, chunk=10)])
    small = np.concatenate([p for p, _ in roc._bootstrap_indices(5, 6, 10, seed=9, chunk=3)])
    np.testing.assert_array_equal(big, small)


def test_weighted_auc_equals_auc_of_the_resampled_data():
    rng = np.random.default_rng(6)
    pos, neg = np.round(rng.normal(0.5, 1, 15), 1), np.round(rng.normal(0, 1, 20), 1)
    weighted = roc._WeightedAUC(pos, neg)
    for idx_pos, idx_neg in roc._bootstrap_indices(15, 20, 40, seed=1, chunk=16):
        aucs = weighted(roc._row_counts(idx_pos, 15), roc._row_counts(idx_neg, 20))
        for row in range(idx_pos.shape[0]):
            rp, rn = pos[idx_pos[row]], neg[idx_neg[row]]
            y = np.r_[np.ones(rp.size), np.zeros(rn.size)]
            assert aucs[row] == pytest.approx(roc_auc_score(y, np.r_[rp, rn]), rel=1e-12)


def _two_scores(seed, n, shift_a, shift_b):
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=int)
    y[: n // 2] = 1
    shared = rng.standard_normal(n)
    a = shift_a * y + shared + rng.standard_normal(n)
    b = shift_b * y + shared + rng.standard_normal(n)
    return y, a, b


def test_bootstrap_is_deterministic_and_seeded():
    y, a, b = _two_scores(0, 120, 1.0, 0.7)
    first = bootstrap_auc_test(y, a, b, n_boot=300, seed=5)
    assert first == bootstrap_auc_test(y, a, b, n_boot=300, seed=5)
    assert first != bootstrap_auc_test(y, a, b, n_boot=300, seed=6)
    assert [f.name for f in dataclasses.fields(BootstrapResult)] == [
        "auc_a", "auc_b", "difference", "p_value", "ci_low", "ci_high", "n_boot",
    ]  # fmt: skip
    assert first.n_boot == 300 and type(first.p_value) is float


def test_bootstrap_does_not_depend_on_chunking(monkeypatch):
    y, a, b = _two_scores(1, 90, 1.0, 0.7)
    expected = bootstrap_auc_test(y, a, b, n_boot=200, seed=2)
    monkeypatch.setattr(roc, "_BOOTSTRAP_CHUNK_CELLS", 500)
    assert bootstrap_auc_test(y, a, b, n_boot=200, seed=2) == expected


def test_bootstrap_ci_contains_observed_difference_and_aucs_are_exact():
    y, a, b = _two_scores(2, 200, 1.0, 0.6)
    result = bootstrap_auc_test(y, a, b)
    delong = delong_test(y, a, b)
    assert (result.auc_a, result.auc_b) == pytest.approx((delong.auc_a, delong.auc_b), rel=1e-12)
    assert result.difference == pytest.approx(delong.auc_a - delong.auc_b, rel=1e-12)
    assert result.ci_low < result.difference < result.ci_high
    narrow = bootstrap_auc_test(y, a, b, level=0.5)
    assert result.ci_low < narrow.ci_low < narrow.ci_high < result.ci_high


def test_bootstrap_p_value_agrees_roughly_with_delong():
    y, a, b = _two_scores(3, 400, 1.0, 0.8)
    boot, delong = bootstrap_auc_test(y, a, b), delong_test(y, a, b)
    # the bootstrap sd estimates DeLong's sd; D and z agree to Monte Carlo error
    d = boot.difference / norm.isf(boot.p_value / 2)
    assert d == pytest.approx(math.sqrt(delong.var_a + delong.var_b - 2 * delong.cov), rel=0.1)


def test_bootstrap_p_value_small_for_clearly_different_scores():
    y, a, b = _two_scores(4, 300, 2.0, 0.3)
    assert bootstrap_auc_test(y, a, b, n_boot=1000).p_value < 0.01


def test_bootstrap_p_value_calibrated_under_null():
    p_values = []
    for seed in range(20):
        y, a, b = _two_scores(100 + seed, 150, 0.8, 0.8)
        p_values.append(bootstrap_auc_test(y, a, b, n_boot=400, seed=seed).p_value)
    p_values = np.array(p_values)
    assert p_values.min() > 1e-3
    assert (p_values < 0.05).sum() <= 4
    assert np.median(p_values) > 0.2


def test_bootstrap_zero_spread_warns_and_returns_nan():
    y = [0, 0, 0, 1, 1, 1]
    with pytest.warns(UserWarning, match="undefined"):
        result = bootstrap_auc_test(y, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.3] * 6)
    assert math.isnan(result.p_value) and result.difference == 0.5
    with pytest.warns(UserWarning, match="undefined"):
        one = bootstrap_auc_test(y, [0.1, 0.5, 0.3, 0.4, 0.2, 0.6], [0.3] * 6, n_boot=1)
    assert math.isnan(one.p_value) and one.n_boot == 1


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------

Y, A, B = [0, 1, 0, 1], [0.1, 0.9, 0.4, 0.3], [0.2, 0.6, 0.5, 0.7]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: delong_test(Y, A[:3], B), r"score_a has length 3, but y_true has length 4"),
        (lambda: delong_test(Y, A, B + [0.1]), r"score_b has length 5"),
        (lambda: delong_test([0, 1, 2, 1], A, B), r"y_true must hold 0/1 or bool.*\[0, 1, 2\]"),
        (lambda: delong_test([0, 0, 0, 0], A, B), r"class 1 is absent"),
        (lambda: delong_test([1, 1, 1, 1], A, B), r"class 0 is absent"),
        (lambda: delong_test(["a", "b", "a", "b"], A, B), r"y_true must hold 0/1"),
        (lambda: delong_test([[0, 1, 0, 1]], A, B), r"y_true must be 1-D"),
        (lambda: delong_test([], [], []), r"y_true must not be empty"),
        (lambda: delong_test(Y, [0.1, np.nan, 0.2, 0.3], B), r"score_a must not contain NaN"),
        (lambda: delong_test(Y, A, ["x"] * 4), r"score_b must be numeric"),
        (lambda: delong_variance(Y, [0.1, 0.2]), r"score has length 2"),
        (lambda: delong_variance([0.5, 1, 0, 1], A), r"0/1 or bool.*0\.5"),
        (lambda: auc_ci(Y, A, level=1.0), r"level must be a number in \(0, 1\), got 1\.0"),
        (lambda: auc_ci(Y, A, level=0), r"level must be .* got 0"),
        (lambda: auc_ci(Y, A, level="0.9"), r"level must be .* got '0\.9'"),
        (lambda: auc_ci(Y, [np.nan] * 4), r"score must not contain NaN, got 4"),
        (lambda: bootstrap_auc_test(Y, A, B, n_boot=0), r"n_boot must be an integer >= 1, got 0"),
        (lambda: bootstrap_auc_test(Y, A, B, n_boot=2.5), r"n_boot .* got 2\.5"),
        (lambda: bootstrap_auc_test(Y, A, B, level=1.5), r"level .* got 1\.5"),
        (lambda: bootstrap_auc_test(Y, A, B, seed=-1), r"seed .* got -1"),
        (lambda: bootstrap_auc_test(Y, A[:2], B), r"score_a has length 2"),
        (lambda: bootstrap_auc_test([0, 0, 0, 0], A, B), r"class 1 is absent"),
        (lambda: multiclass_auc([0, 1, 2], np.eye(3), method="x"), r"method .* got 'x'"),
        (lambda: multiclass_auc([0, 1], np.eye(3)), r"prob has 3 rows, but y_true has length 2"),
        (lambda: multiclass_auc([0, 1, 1], np.eye(3)), r"class \[2\] is absent"),
        (lambda: multiclass_auc([0, 1, 3], np.eye(3)), r"labels 0\.\.2 .* got \[3\]"),
        (lambda: multiclass_auc([0, 1, 2], [0.1, 0.2, 0.3]), r"prob must be 2-D"),
        (lambda: multiclass_auc([0, 0], [[0.2], [0.3]]), r"at least 2 columns"),
        (lambda: multiclass_auc([0.5, 1, 2], np.eye(3)), r"integer labels"),
        (lambda: multiclass_auc([0, 1, 2], np.full((3, 3), np.nan)), r"prob must not contain NaN"),
    ],
)
def test_invalid_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: auc_ci(Y, A, 0.9),
        lambda: bootstrap_auc_test(Y, A, B, 100),
        lambda: multiclass_auc([0, 1, 2], np.eye(3), "ovo"),
    ],
)
def test_optional_arguments_are_keyword_only(call):
    with pytest.raises(TypeError):
        call()


# One level validator for every public function of mmdiag.stats that takes ``level``.
LEVEL_CALLS = {
    "auc_ci": lambda level: stats.auc_ci(Y, A, level=level),
    "bootstrap_auc_test": lambda level: stats.bootstrap_auc_test(Y, A, B, n_boot=50, level=level),
    "paired_ttest": lambda level: stats.paired_ttest(A, B, level=level),
}


def test_level_calls_cover_every_public_function_with_a_level():
    with_level = {
        name
        for name in stats.__all__
        if callable(obj := getattr(stats, name))
        and not isinstance(obj, type)
        and "level" in inspect.signature(obj).parameters
    }
    assert with_level == set(LEVEL_CALLS)


@pytest.mark.parametrize("name", sorted(LEVEL_CALLS))
def test_level_accepts_numpy_reals_and_rejects_bools(name):
    call = LEVEL_CALLS[name]
    assert call(np.float32(0.9)) == call(float(np.float32(0.9)))
    assert call(np.float64(0.9)) == call(0.9)
    for bad in (True, False, np.True_, np.int64(1), np.float64(np.nan), "0.9", None):
        with pytest.raises(ValueError, match=r"level must be a number in \(0, 1\), got"):
            call(bad)
