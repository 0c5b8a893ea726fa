"""Every metric the five papers report, by name, in one place.

A fold trainer names the metrics its paper reports and calls :func:`compute_metrics`; the
statistics stage and the tables read them back by the same names.

- ``ACC``: accuracy, the fraction of cases classified correctly;
- ``AUC``: macro one-vs-rest ROC AUC of the class probabilities (over the classes present);
- ``PRE``, ``REC``, ``SPE``, ``F1``: precision, recall (sensitivity), specificity and F1, one
  vs rest per class, averaged over classes (macro);
- ``AP``: average precision of the positive class (binary) or its macro mean over classes;
- ``BACC``: balanced accuracy, mean recall over the classes present in ``y_true``
  (scikit-learn's definition);
- ``microF1``: micro-averaged F1 (for single-label classification it equals ACC);
- ``QWK``: Cohen's kappa with quadratic weights over the configured classes (ordinal grades);
- ``C-index``: Harrell's concordance of the predicted risk with right-censored survival;
- ``mAcc``, ``mPre``, ``mRec``, ``mF1``: MHD-Net's tumour-typing metrics (Zhang et al.,
  "MHD-Net: Memory-Aware Hetero-Modal Distillation Network for Thymic Epithelial Tumor
  Typing With Missing Pathology Modality", Table II: its mAcc, Pre, Rec and F1). ``mAcc``
  is plain accuracy (correct over all predictions, as ``ACC``); ``mPre`` and ``mRec`` are
  macro precision and recall over
  the classes present in ``y_true`` or ``y_pred`` (scikit-learn's default labels: a class in
  neither has no defined precision or recall and is left out, whereas ``PRE`` and ``REC``
  count it as 0); ``mF1`` is ``2 * mPre * mRec / (mPre + mRec)`` of those macro values, not
  the mean of per-class F1 (``F1``). The paper's QWK is the registry's ``QWK``.

ACC, PRE, REC, SPE, F1, BACC, microF1, QWK, mAcc, mPre, mRec and mF1 read the predicted
classes: ``y_pred`` when given, else the arg-max of ``prob``. AUC and AP read the
probabilities, C-index ``time``, ``event`` and ``risk``. Metrics that are undefined on a fold
(a single-class test set) warn and return ``nan``; so do mAcc, mPre, mRec and mF1 of a fold
without cases. A class present in only one of ``y_true`` and ``y_pred`` has precision or
recall 0 where its denominator is 0 (scikit-learn's ``zero_division=0``); ``mF1`` is 0 when
``mPre + mRec`` is 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

CLASSIFICATION_METRICS = ("ACC", "AUC", "PRE", "REC", "SPE", "F1")


@dataclass(frozen=True)
class FoldPredictions:
    """A fold's test predictions as arrays: what the metric functions read."""

    y_true: np.ndarray
    n_classes: int
    prob: np.ndarray | None = None
    y_pred_given: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    risk: np.ndarray | None = None

    @cached_property
    def y_pred(self) -> np.ndarray:
        if self.y_pred_given is not None:
            return self.y_pred_given
        if self.prob is None:
            raise ValueError("label metrics need y_pred or prob")
        return self.prob.argmax(axis=1)

    @cached_property
    def one_vs_rest(self) -> dict[str, np.ndarray]:
        """Per-class true/false positives and negatives of the confusion matrix."""
        matrix = confusion_matrix(self.y_true, self.y_pred, self.n_classes)
        tp = np.diag(matrix).astype(float)
        fp = matrix.sum(axis=0) - tp
        fn = matrix.sum(axis=1) - tp
        tn = matrix.sum() - tp - fp - fn
        return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


MetricFunction = Callable[[FoldPredictions], float]
METRICS: dict[str, MetricFunction] = {}


def _metric(name: str) -> Callable[[MetricFunction], MetricFunction]:
    def register(function: MetricFunction) -> MetricFunction:
        METRICS[name] = function
        return function

    return register


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of true class ``i`` predicted as ``j``."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio with 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def _precision(p: FoldPredictions) -> np.ndarray:
    counts = p.one_vs_rest
    return _safe_ratio(counts["tp"], counts["tp"] + counts["fp"])


def _recall(p: FoldPredictions) -> np.ndarray:
    counts = p.one_vs_rest
    return _safe_ratio(counts["tp"], counts["tp"] + counts["fn"])


@_metric("ACC")
def accuracy(p: FoldPredictions) -> float:
    return float(p.one_vs_rest["tp"].sum() / max(len(p.y_true), 1))


@_metric("AUC")
def macro_ovr_auc_of(p: FoldPredictions) -> float:
    return macro_ovr_auc(p.y_true, _needs(p.prob, "AUC", "prob"))


@_metric("PRE")
def macro_precision(p: FoldPredictions) -> float:
    return float(_precision(p).mean())


@_metric("REC")
def macro_recall(p: FoldPredictions) -> float:
    return float(_recall(p).mean())


@_metric("SPE")
def macro_specificity(p: FoldPredictions) -> float:
    counts = p.one_vs_rest
    return float(_safe_ratio(counts["tn"], counts["tn"] + counts["fp"]).mean())


@_metric("F1")
def macro_f1(p: FoldPredictions) -> float:
    precision, recall = _precision(p), _recall(p)
    return float(_safe_ratio(2 * precision * recall, precision + recall).mean())


@_metric("AP")
def average_precision(p: FoldPredictions) -> float:
    prob = _needs(p.prob, "AP", "prob")
    present = [k for k in range(prob.shape[1]) if 0 < (p.y_true == k).sum() < len(p.y_true)]
    if not present:
        warnings.warn("AP undefined: the test set holds a single class", stacklevel=3)
        return float("nan")
    if prob.shape[1] == 2:
        return float(average_precision_score(p.y_true == 1, prob[:, 1]))
    return float(np.mean([average_precision_score(p.y_true == k, prob[:, k]) for k in present]))


@_metric("BACC")
def balanced_accuracy(p: FoldPredictions) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes predicted but absent from y_true
        return float(balanced_accuracy_score(p.y_true, p.y_pred))


@_metric("microF1")
def micro_f1(p: FoldPredictions) -> float:
    return float(f1_score(p.y_true, p.y_pred, labels=range(p.n_classes), average="micro"))


@_metric("QWK")
def quadratic_weighted_kappa_of(p: FoldPredictions) -> float:
    from mmdiag.stats import quadratic_weighted_kappa

    return quadratic_weighted_kappa(p.y_true, p.y_pred, n_classes=p.n_classes)


@_metric("C-index")
def concordance(p: FoldPredictions) -> float:
    from mmdiag.stats import concordance_index

    time, event, risk = (_needs(v, "C-index", n) for v, n in _survival_arrays(p))
    return float(concordance_index(time, event, risk))


@_metric("mAcc")
def typing_accuracy(p: FoldPredictions) -> float:
    """MHD-Net's mAcc: correct predictions over all predictions (``nan`` on an empty fold)."""
    if not _has_cases(p, "mAcc"):
        return float("nan")
    return accuracy(p)


@_metric("mPre")
def typing_precision(p: FoldPredictions) -> float:
    """MHD-Net's Pre: mean precision over the classes in ``y_true`` or ``y_pred``."""
    if not _has_cases(p, "mPre"):
        return float("nan")
    return float(_precision(p)[_observed_classes(p)].mean())


@_metric("mRec")
def typing_recall(p: FoldPredictions) -> float:
    """MHD-Net's Rec: mean recall over the classes in ``y_true`` or ``y_pred``."""
    if not _has_cases(p, "mRec"):
        return float("nan")
    return float(_recall(p)[_observed_classes(p)].mean())


@_metric("mF1")
def typing_f1(p: FoldPredictions) -> float:
    """MHD-Net's F1: the harmonic mean of the macro Pre and Rec (Table II of the paper)."""
    if not _has_cases(p, "mF1"):
        return float("nan")
    precision, recall = typing_precision(p), typing_recall(p)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _has_cases(p: FoldPredictions, metric: str) -> bool:
    """Whether the fold has any case; warns (the metric is then undefined) when it has none."""
    if len(p.y_true) == 0:
        warnings.warn(f"{metric} undefined: the fold holds no cases", stacklevel=4)
        return False
    return True


def _observed_classes(p: FoldPredictions) -> np.ndarray:
    """Mask of the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's labels)."""
    counts = p.one_vs_rest
    return (counts["tp"] + counts["fp"] + counts["fn"]) > 0


def _survival_arrays(p: FoldPredictions):
    return ((p.time, "time"), (p.event, "event"), (p.risk, "risk"))


def _needs(value, metric: str, argument: str):
    if value is None:
        raise ValueError(f"metric {metric} needs {argument}")
    return value


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


def compute_metrics(
    names: Sequence[str],
    y_true: Sequence[int],
    *,
    prob: np.ndarray | None = None,
    y_pred: Sequence[int] | None = None,
    n_classes: int | None = None,
    time: Sequence[float] | None = None,
    event: Sequence[int] | None = None,
    risk: Sequence[float] | None = None,
) -> dict[str, float]:
    """The metrics ``names`` (keys of :data:`METRICS`) of one fold's predictions, in order.

    ``prob`` is (n, K) class probabilities; ``y_pred`` the predicted classes (default: the
    arg-max of ``prob``); ``time``, ``event`` and ``risk`` the survival outcome and prediction.
    """
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    y_true = np.asarray(y_true, dtype=np.int64)
    if prob is not None:
        prob = np.asarray(prob, dtype=np.float64)
        if prob.ndim != 2 or len(prob) != len(y_true):
            raise ValueError(f"prob must have shape (n, K) with n={len(y_true)}, got {prob.shape}")
    n_classes = n_classes or (prob.shape[1] if prob is not None else int(y_true.max()) + 1)
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"y_true must lie in 0..{n_classes - 1}, got {np.unique(y_true)}")
    predictions = FoldPredictions(
        y_true=y_true,
        n_classes=n_classes,
        prob=prob,
        y_pred_given=None if y_pred is None else np.asarray(y_pred, dtype=np.int64),
        time=None if time is None else np.asarray(time, dtype=np.float64),
        event=None if event is None else np.asarray(event),
        risk=None if risk is None else np.asarray(risk, dtype=np.float64),
    )
    return {name: METRICS[name](predictions) for name in names}


def classification_metrics(
    y_true: Sequence[int], prob: np.ndarray, *, n_classes: int | None = None
) -> dict[str, float]:
    """ACC, AUC, PRE, REC, SPE and F1 (macro) of class probabilities ``prob`` (n, K).

    The predicted class is the arg-max of ``prob``.
    """
    return compute_metrics(CLASSIFICATION_METRICS, y_true, prob=prob, n_classes=n_classes)
