"""MHD-Net's typing metrics (mAcc, Pre, Rec, mF1, QWK): hand-worked values, scikit-learn on
random folds with absent classes, and the paper's own Table III numbers."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, precision_score, recall_score

from mmdiag.evaluation.metrics import METRICS, compute_metrics

TYPING = ["mAcc", "mPre", "mRec", "mF1", "QWK"]
N_TYPES = 8  # A, AB, B1, B1+B2, B2, B2+B3, B3, TC

# Table III of the paper: (method, dataset) -> (F1, Pre, Rec), in percent.
PAPER_TABLE_III = {
    ("MHD-Net", "RPTET"): (89.46, 89.43, 89.50),
    ("AW3M", "RPTET"): (76.29, 76.23, 76.35),
    ("SCKD", "RPTET"): (80.52, 80.92, 80.14),
    ("DGMKD-Net", "CPTAC-LUAD"): (83.18, 83.44, 82.93),
}


def _typing(y_true, y_pred, n_classes=N_TYPES):
    return compute_metrics(TYPING, y_true, y_pred=y_pred, n_classes=n_classes)


def test_typing_metrics_are_registered_under_their_own_names():
    assert set(TYPING) <= set(METRICS)
    assert METRICS["mF1"] is not METRICS["F1"] and METRICS["mPre"] is not METRICS["PRE"]


def test_known_answers_on_a_hand_worked_fold():
    # true 0 0 1 1 2 2, predicted 0 1 1 1 2 0; class 3 configured but in neither
    metrics = _typing([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], n_classes=4)
    assert metrics["mAcc"] == pytest.approx(4 / 6)
    assert metrics["mPre"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)  # class 3 left out
    assert metrics["mRec"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert metrics["mF1"] == pytest.approx(52 / 75)  # 2 * (13/18) * (2/3) / (13/18 + 2/3)
    # observed weighted disagreement 5/54 against 7/54 expected by chance
    assert metrics["QWK"] == pytest.approx(2 / 7)


def test_f1_pr_is_not_the_mean_of_per_class_f1():
    y_true, y_pred = [0, 0, 0, 1, 2, 2], [0, 0, 1, 1, 1, 2]
    metrics = compute_metrics(["F1", "mF1", "mPre", "mRec"], y_true, y_pred=y_pred, n_classes=3)
    harmonic = 2 * metrics["mPre"] * metrics["mRec"] / (metrics["mPre"] + metrics["mRec"])
    assert metrics["mF1"] == pytest.approx(harmonic)
    assert metrics["mF1"] != pytest.approx(metrics["F1"])


@pytest.mark.parametrize("seed", range(30))
def test_matches_scikit_learn_on_random_folds_with_absent_classes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    present = rng.choice(N_TYPES, size=int(rng.integers(2, N_TYPES + 1)), replace=False)
    y_true = rng.choice(present, size=n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(present[:-1], size=n))
    metrics = _typing(y_true, y_pred)
    pre = precision_score(y_true, y_pred, average="macro", zero_division=0)
    rec = recall_score(y_true, y_pred, average="macro", zero_division=0)
    assert metrics["mAcc"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["mPre"] == pytest.approx(pre)
    assert metrics["mRec"] == pytest.approx(rec)
    assert metrics["mF1"] == pytest.approx(2 * pre * rec / (pre + rec) if pre + rec else 0.0)
    kappa = cohen_kappa_score(y_true, y_pred, labels=range(N_TYPES), weights="quadratic")
    assert metrics["QWK"] == pytest.approx(kappa)


def test_class_only_predicted_counts_as_zero_recall_and_only_true_as_zero_precision():
    metrics = _typing([0, 0, 1, 1], [0, 2, 1, 1])  # class 2 predicted, never true
    assert metrics["mPre"] == pytest.approx((1 + 1 + 0) / 3)
    assert metrics["mRec"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    metrics = _typing([0, 3, 1, 1], [0, 0, 1, 1])  # class 3 true, never predicted
    assert metrics["mPre"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["mRec"] == pytest.approx((1 + 1 + 0) / 3)


def test_all_wrong_gives_zero_f1_and_empty_fold_warns_nan():
    assert _typing([0, 1], [1, 0])["mF1"] == 0.0
    with pytest.warns(UserWarning, match="no cases"):
        empty = compute_metrics(["mAcc", "mPre", "mRec", "mF1"], [], y_pred=[], n_classes=8)
    assert all(np.isnan(value) for value in empty.values())


def test_perfect_typing_scores_one_everywhere():
    y = np.arange(N_TYPES).repeat(3)
    assert all(value == pytest.approx(1.0) for value in _typing(y, y).values())


@pytest.mark.parametrize(("row", "values"), PAPER_TABLE_III.items(), ids=str)
def test_paper_table_iii_f1_is_the_harmonic_mean_of_macro_pre_and_rec(row, values):
    f1, pre, rec = values
    # Pre and Rec are printed to 0.01, so their harmonic mean is known to about +-0.01
    assert 2 * pre * rec / (pre + rec) == pytest.approx(f1, abs=0.015)
