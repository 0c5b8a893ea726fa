"""Quadratic weighted kappa against R psych 2.2 ``cohen.kappa`` and scikit-learn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from mmdiag.stats.agreement import quadratic_weighted_kappa

FIXTURES = Path(__file__).parent / "fixtures" / "stats" / "paired"
INPUTS = pd.read_csv(FIXTURES / "qwk_inputs.tsv", sep="\t")
EXPECTED = pd.read_csv(
    FIXTURES / "qwk_expected.tsv", sep="\t", dtype=str, keep_default_na=False
).set_index("case")


def kappa_by_definition(a, b, n_classes: int) -> float:
    """Slow reference: 1 - sum(v * O) / sum(v * E) by explicit loops, v = (i - j)^2."""
    n = len(a)
    observed = [[0.0] * n_classes for _ in range(n_classes)]
    for x, y in zip(a, b, strict=True):
        observed[x][y] += 1
    rows = [sum(observed[i]) for i in range(n_classes)]
    cols = [sum(observed[i][j] for i in range(n_classes)) for j in range(n_classes)]
    disagree_observed = disagree_expected = 0.0
    for i in range(n_classes):
        for j in range(n_classes):
            disagree_observed += (i - j) ** 2 * observed[i][j]
            disagree_expected += (i - j) ** 2 * rows[i] * cols[j] / n
    return 1 - disagree_observed / disagree_expected


@pytest.mark.parametrize("case", EXPECTED.index)
def test_matches_r_psych(case):
    rows = INPUTS[INPUTS["case"] == case]
    n_classes = int(rows["n_classes"].iloc[0])
    a, b = rows["a"].to_numpy(), rows["b"].to_numpy()
    expected = EXPECTED.loc[case, "weighted_kappa"]
    if expected in {"NA", "NaN"}:
        with pytest.warns(RuntimeWarning, match="undefined"):
            assert math.isnan(quadratic_weighted_kappa(a, b, n_classes=n_classes))
        return
    expected = float(expected)
    kappa = quadratic_weighted_kappa(a, b, n_classes=n_classes)
    assert isinstance(kappa, float)
    assert abs(kappa - expected) <= 1e-9 * abs(expected) + (expected == 0) * 1e-15
    sklearn = cohen_kappa_score(a, b, weights="quadratic", labels=list(range(n_classes)))
    assert kappa == pytest.approx(sklearn, rel=1e-9, abs=1e-15)


def test_matches_definition_on_random_inputs():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n_classes = int(rng.integers(2, 7))
        n = int(rng.integers(2, 60))
        a = rng.integers(0, n_classes, n)
        b = np.clip(a + rng.integers(-2, 3, n), 0, n_classes - 1)
        if len(set(a) | set(b)) == 1:
            continue
        expected = kappa_by_definition(a.tolist(), b.tolist(), n_classes)
        assert quadratic_weighted_kappa(a, b, n_classes=n_classes) == pytest.approx(
            expected, rel=1e-9, abs=1e-14
        )


def test_unused_category_changes_the_weights():
    a, b = [0, 1, 2, 1, 0, 2], [0, 2, 2, 1, 1, 2]
    with_unused = quadratic_weighted_kappa(a, b, n_classes=4)
    assert with_unused != quadratic_weighted_kappa(a, b, n_classes=3)
    assert with_unused == pytest.approx(
        cohen_kappa_score(a, b, weights="quadratic", labels=range(4))
    )


def test_perfect_and_reversed_agreement():
    grades = [0, 1, 2, 3, 4, 2]
    assert quadratic_weighted_kappa(grades, grades, n_classes=5) == pytest.approx(1.0, abs=1e-14)
    assert quadratic_weighted_kappa(grades, [4 - g for g in grades], n_classes=5) < 0


@pytest.mark.parametrize(
    ("a", "b", "n_classes", "message"),
    [
        ([0, 1, 2], [0, 1], 3, "lengths differ"),
        ([0], [0], 3, "at least 2 pairs"),
        ([0, 3], [0, 1], 3, r"a must lie in 0..2 \(n_classes=3\), got 3 at index 1"),
        ([0, 1], [-1, 1], 3, "b must lie in 0..2"),
        ([0, np.nan], [0, 1], 3, "a must hold integer grades"),
        ([0, 1.5], [0, 1], 3, "a must hold integer grades"),
        ([0, 1], [0, 1], 1, "n_classes must be an integer >= 2, got 1"),
        ([0, 1], [0, 1], 2.5, "n_classes must be an integer"),
        (["a", "b"], [0, 1], 2, "a must hold integer grades"),
    ],
)
def test_rejects_bad_arguments(a, b, n_classes, message):
    with pytest.raises(ValueError, match=message):
        quadratic_weighted_kappa(a, b, n_classes=n_classes)


def test_n_classes_is_keyword_only():
    with pytest.raises(TypeError):
        quadratic_weighted_kappa([0, 1], [0, 1], 2)
