"""Macro-averaged classification metrics, as CMUS-Net reports them (Section 4.2).

ACC is the plain accuracy (the fraction of patients classified correctly); PRE, REC, SPE and F1
are one-vs-rest per class, then averaged over classes (macro); AUC is the macro one-vs-rest ROC
AUC on the softmax probabilities.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

CLASSIFICATION_METRICS = ("ACC", "AUC", "PRE", "REC", "SPE", "F1")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of true class ``i`` predicted as ``j``."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio with 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def macro_ovr_auc(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes that have both positives and negatives.

    Returns ``nan`` with a warning when no class qualifies (a single-class test set). Unlike
    :func:`mmdiag.stats.roc.multiclass_auc`, which requires every class, this tolerates a fold
    whose test set misses a class (small cohorts, MN staging).
    """
    aucs = []
    for k in range(prob.shape[1]):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            aucs.append(roc_auc_score(positives, prob[:, k]))
    if not aucs:
        warnings.warn("AUC undefined: the test set holds a single class", stacklevel=2)
        return float("nan")
    return float(np.mean(aucs))


def classification_metrics(
    y_true: Sequence[int], prob: np.ndarray, *, n_classes: int | None = None
) -> dict[str, float]:
    """ACC, AUC, PRE, REC, SPE and F1 (macro) of class probabilities ``prob`` (n, K).

    The predicted class is the arg-max of ``prob``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2 or len(prob) != len(y_true):
        raise ValueError(f"prob must have shape (n, K) with n={len(y_true)}, got {prob.shape}")
    n_classes = n_classes or prob.shape[1]
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"y_true must lie in 0..{n_classes - 1}, got {np.unique(y_true)}")
    y_pred = prob.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(matrix).astype(float)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    tn = matrix.sum() - tp - fp - fn
    precision = _safe_ratio(tp, tp + fp)
    recall = _safe_ratio(tp, tp + fn)
    specificity = _safe_ratio(tn, tn + fp)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    return {
        "ACC": float(tp.sum() / max(len(y_true), 1)),
        "AUC": macro_ovr_auc(y_true, prob),
        "PRE": float(precision.mean()),
        "REC": float(recall.mean()),
        "SPE": float(specificity.mean()),
        "F1": float(f1.mean()),
    }
