"""Agreement between two raters (or a model and a reference) on ordinal grades.

Quadratic weighted kappa as R ``psych::cohen.kappa`` computes its ``weighted.kappa`` with
default weights, checked against psych 2.2 and scikit-learn in ``tests/test_stats_agreement.py``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from mmdiag.stats._validation import as_grades, check_integer, check_same_length

__all__ = ["quadratic_weighted_kappa"]


def quadratic_weighted_kappa(a, b, *, n_classes) -> float:
    """Cohen's kappa with quadratic weights over the fixed categories ``0 .. n_classes - 1``.

    Parameters
    ----------
    a, b : array-like of int, shape (n,)
        Ordinal grades of the same n cases by two raters, integers in ``0 .. n_classes - 1``.
    n_classes : int
        Number of ordered categories K >= 2. Categories neither rater used still count (they
        set the weight scale ``(K - 1)^2``).

    Returns
    -------
    float
        Weighted kappa in [-1, 1]; ``nan`` with a warning when undefined (both raters used one
        and the same category only, so chance agreement is 1).

    Notes
    -----
    With ``p_ij`` the proportion of cases graded i by ``a`` and j by ``b``, the marginals
    ``p_i.`` and ``p_.j``, and agreement weights ``w_ij = 1 - (i - j)^2 / (K - 1)^2``,

    .. math:: \\kappa_w = \\frac{P_o - P_e}{1 - P_e}, \\quad
              P_o = \\sum_{ij} w_{ij} p_{ij}, \\quad P_e = \\sum_{ij} w_{ij} p_{i.} p_{.j},

    the form R's ``psych::cohen.kappa`` evaluates; it equals scikit-learn's
    ``1 - sum(v * O) / sum(v * E)`` with disagreement weights ``v = (i - j)^2``.

    References
    ----------
    .. [1] J. Cohen, "Weighted kappa: nominal scale agreement with provision for scaled
       disagreement or partial credit", Psychological Bulletin 70(4):213-220, 1968.
    .. [2] J. L. Fleiss and J. Cohen, "The equivalence of weighted kappa and the intraclass
       correlation coefficient as measures of reliability", Educational and Psychological
       Measurement 33(3):613-619, 1973.

    Examples
    --------
    >>> round(quadratic_weighted_kappa([0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 0], n_classes=4), 6)
    0.75
    """
    n_classes = check_integer(n_classes, "n_classes", minimum=2)
    a = as_grades(a, "a", n_classes)
    b = as_grades(b, "b", n_classes)
    check_same_length({"a": a, "b": b})
    return _quadratic_weighted_kappa(a, b, n_classes)


def _quadratic_weighted_kappa(a: np.ndarray, b: np.ndarray, n_classes: int) -> float:
    observed = np.zeros((n_classes, n_classes))
    np.add.at(observed, (a, b), 1.0)
    observed /= len(a)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    grade = np.arange(n_classes)
    weight = 1.0 - (grade[:, None] - grade[None, :]) ** 2 / (n_classes - 1) ** 2
    agreement_observed = float(np.sum(weight * observed))
    agreement_expected = float(np.sum(weight * expected))
    if agreement_expected == 1.0:
        warnings.warn(
            "quadratic weighted kappa is undefined when both raters use one and the same "
            "category only; returning nan",
            RuntimeWarning,
            stacklevel=3,
        )
        return math.nan
    return (agreement_observed - agreement_expected) / (1.0 - agreement_expected)
