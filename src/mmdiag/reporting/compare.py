"""Compare every variant of a method with its reference row (``Ref.``), as the papers do.

The test is set per method in its config (``stats.test``):

- ``paired_ttest`` / ``wilcoxon``: on the per-fold values of one metric (CMUS-Net compares fold
  AUCs with a paired t-test);
- ``delong`` / ``bootstrap``: on the test predictions pooled over folds, binary tasks (CS-MIL);
- ``mcnemar``: on the pooled per-patient correctness (DeepGuide).

Prediction-level tests count each patient once. Under k-fold CV a patient is tested once;
under repeated random splits its test sets overlap (at paper scale a patient is in about 3 of
10), and treating each appearance as an independent case would make p too small. So a
patient tested in several splits enters with the mean of its class probabilities over those
splits, and with its most frequent predicted class (ties: the larger mean probability).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mmdiag.stats.paired import mcnemar_test, paired_ttest, wilcoxon_test
from mmdiag.stats.roc import bootstrap_auc_test, delong_test

TESTS = ("paired_ttest", "wilcoxon", "delong", "bootstrap", "mcnemar")
FOLD_TESTS = ("paired_ttest", "wilcoxon")
SIGNIFICANCE_LEVEL = 0.05
STATS_COLUMNS = ["variant", "reference", "test", "metric", "n", "statistic", "p_value", "mark"]


def significance_mark(p_value: float) -> str:
    """``*`` below the 0.05 level, ``N.S.`` otherwise (and for an undefined p-value)."""
    return "*" if np.isfinite(p_value) and p_value < SIGNIFICANCE_LEVEL else "N.S."


def compare_to_reference(
    fold_all: pd.DataFrame,
    predictions: pd.DataFrame | None,
    *,
    reference: str,
    tests: Sequence[str],
    metric: str = "AUC",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (non-reference variant, test) with the statistic, p-value and mark.

    ``fold_all`` is the long table (variant, fold, metric, value); ``predictions`` the pooled
    ``predictions.tsv`` rows of every variant and fold (needed by the prediction-level tests).
    """
    unknown = sorted(set(tests) - set(TESTS))
    if unknown:
        raise ValueError(f"unknown test(s) {unknown}; allowed: {list(TESTS)}")
    variants = list(dict.fromkeys(fold_all["variant"]))
    if reference not in variants:
        raise ValueError(f"reference variant {reference!r} not in fold_all variants {variants}")
    if predictions is None and set(tests) - set(FOLD_TESTS):
        raise ValueError(f"tests {sorted(set(tests) - set(FOLD_TESTS))} need predictions.tsv files")
    rows = []
    for variant in variants:
        if variant == reference:
            continue
        for test in tests:
            if test in FOLD_TESTS:
                row = _fold_test(fold_all, variant, reference, test, metric)
            else:
                row = _prediction_test(predictions, variant, reference, test, n_boot, seed)
            row |= {"variant": variant, "reference": reference, "test": test}
            row["mark"] = significance_mark(row["p_value"])
            rows.append(row)
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


def _fold_values(fold_all: pd.DataFrame, variant: str, metric: str) -> pd.Series:
    rows = fold_all[(fold_all["variant"] == variant) & (fold_all["metric"] == metric)]
    if rows.empty:
        raise ValueError(f"no {metric!r} values for variant {variant!r} in fold_all")
    return rows.set_index("fold")["value"].sort_index()


def _fold_test(fold_all, variant, reference, test, metric) -> dict:
    """Paired test of the per-fold ``metric`` of ``variant`` (a) against the reference (b)."""
    a, b = _fold_values(fold_all, variant, metric), _fold_values(fold_all, reference, metric)
    if list(a.index) != list(b.index):
        raise ValueError(f"variants {variant!r} and {reference!r} cover different folds")
    if test == "paired_ttest":
        result = paired_ttest(a.to_numpy(), b.to_numpy())
        statistic = result.t
    else:
        result = wilcoxon_test(a.to_numpy(), b.to_numpy())
        statistic = result.statistic
    return {"metric": metric, "n": len(a), "statistic": statistic, "p_value": result.p_value}


def per_patient_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per patient of one variant's predictions over all folds or repeated splits.

    The probabilities are the patient's mean over the splits it was tested in, ``y_pred`` its
    most frequent predicted class (ties: the class of the larger mean probability), ``n_tests``
    the number of splits; ``ValueError`` when a patient's ``y_true`` differs between splits.
    """
    prob_columns = [c for c in predictions.columns if c.startswith("prob_")]
    grouped = predictions.groupby("patient_id", sort=True)
    labels = grouped["y_true"].nunique()
    if (labels > 1).any():
        raise ValueError(f"patients {list(labels[labels > 1].index[:5])} change label across folds")
    table = grouped[prob_columns].mean()
    table["y_true"] = grouped["y_true"].first()
    table["n_tests"] = grouped.size()
    table["y_pred"] = [
        _most_frequent(rows["y_pred"].to_numpy(), table.loc[patient, prob_columns].to_numpy())
        for patient, rows in grouped
    ]
    return table.reset_index()


def _most_frequent(predicted: np.ndarray, mean_prob: np.ndarray) -> int:
    counts = np.bincount(predicted, minlength=len(mean_prob))
    tied = counts == counts.max()
    return int(np.where(tied, mean_prob, -np.inf).argmax())


def _paired_predictions(predictions, variant, reference) -> pd.DataFrame:
    """The two variants' per-patient predictions (:func:`per_patient_predictions`), joined."""
    a = per_patient_predictions(predictions[predictions["variant"] == variant])
    b = per_patient_predictions(predictions[predictions["variant"] == reference])
    joined = a.merge(b, on="patient_id", suffixes=("_a", "_b"), validate="one_to_one")
    if len(joined) != len(a) or len(joined) != len(b):
        raise ValueError(
            f"predictions of {variant!r} ({len(a)} patients) and {reference!r} "
            f"({len(b)} patients) do not cover the same patients"
        )
    if (joined["n_tests_a"] != joined["n_tests_b"]).any():
        raise ValueError(f"{variant!r} and {reference!r} tested patients in different splits")
    if (joined["y_true_a"] != joined["y_true_b"]).any():
        raise ValueError(f"predictions of {variant!r} and {reference!r} disagree on y_true")
    return joined


def _prediction_test(predictions, variant, reference, test, n_boot, seed) -> dict:
    joined = _paired_predictions(predictions, variant, reference)
    y_true = joined["y_true_a"].to_numpy()
    if test == "mcnemar":
        result = mcnemar_test(y_true, joined["y_pred_a"].to_numpy(), joined["y_pred_b"].to_numpy())
        return {
            "metric": "accuracy",
            "n": len(joined),
            "statistic": float(result.statistic),
            "p_value": result.p_value,
        }
    positive = _positive_class_column(predictions, test)
    score_a, score_b = joined[f"{positive}_a"].to_numpy(), joined[f"{positive}_b"].to_numpy()
    if test == "delong":
        result = delong_test(y_true, score_a, score_b)
        return {"metric": "AUC", "n": len(joined), "statistic": result.z, "p_value": result.p_value}
    result = bootstrap_auc_test(y_true, score_a, score_b, n_boot=n_boot, seed=seed)
    return {
        "metric": "AUC",
        "n": len(joined),
        "statistic": result.difference,
        "p_value": result.p_value,
    }


def _positive_class_column(predictions: pd.DataFrame, test: str) -> str:
    """The probability column of class 1, the positive class of a binary task."""
    columns = [c for c in predictions.columns if c.startswith("prob_")]
    if len(columns) != 2:
        raise ValueError(f"{test} compares binary classifiers; predictions have {columns}")
    return columns[1]
