"""Classification metrics against hand-computed confusion-matrix values and scikit-learn."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from mmdiag.evaluation import aggregate_fold_metrics, classification_metrics


def _probabilities_for(predicted: list[int], n_classes: int = 3) -> np.ndarray:
    prob = np.full((len(predicted), n_classes), 0.1)
    prob[np.arange(len(predicted)), predicted] = 0.8
    return prob


def test_known_confusion_matrix():
    # true 0 0 1 1 2 2, predicted 0 1 1 1 2 0: worked by hand in the comments below
    y_true = [0, 0, 1, 1, 2, 2]
    metrics = classification_metrics(y_true, _probabilities_for([0, 1, 1, 1, 2, 0]))
    assert metrics["ACC"] == pytest.approx(4 / 6)
    assert metrics["PRE"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)  # TP/(TP+FP) per class
    assert metrics["REC"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)  # TP/(TP+FN)
    assert metrics["SPE"] == pytest.approx((3 / 4 + 3 / 4 + 1) / 3)  # TN/(TN+FP)
    assert metrics["F1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_matches_scikit_learn_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y_true = rng.integers(0, 4, size=50)
        prob = rng.dirichlet(np.ones(4), size=50)
        metrics = classification_metrics(y_true, prob)
        pre, rec, f1, _ = precision_recall_fscore_support(
            y_true, prob.argmax(1), labels=range(4), average="macro", zero_division=0
        )
        assert metrics["PRE"] == pytest.approx(pre)
        assert metrics["REC"] == pytest.approx(rec)
        assert metrics["F1"] == pytest.approx(f1)
        expected_auc = roc_auc_score(y_true, prob, multi_class="ovr", average="macro")
        assert metrics["AUC"] == pytest.approx(expected_auc)


def test_perfect_and_single_class():
    y_true = [0, 1, 2]
    perfect = classification_metrics(y_true, np.eye(3))
    assert all(value == pytest.approx(1.0) for value in perfect.values())
    with pytest.warns(UserWarning, match="single class"):
        single = classification_metrics([1, 1], _probabilities_for([1, 0]))
    assert np.isnan(single["AUC"]) and single["ACC"] == 0.5


def test_rejects_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.ones((3, 2)))
    with pytest.raises(ValueError, match="y_true"):
        classification_metrics([0, 5], np.ones((2, 3)) / 3)


def _metric_file(tmp_path, variant, fold, metrics=("ACC", "AUC")):
    path = tmp_path / f"{variant}_{fold}.tsv"
    rows = [
        {"method": "cmus", "variant": variant, "fold": fold, "metric": m, "value": 0.5}
        for m in metrics
    ]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_aggregate_complete_and_incomplete(tmp_path):
    files = [_metric_file(tmp_path, v, f) for v in ("a", "b") for f in (0, 1)]
    table = aggregate_fold_metrics(files)
    assert list(table.columns) == ["method", "variant", "fold", "metric", "value"]
    assert len(table) == 8
    with pytest.raises(ValueError, match="different folds"):
        aggregate_fold_metrics(files[:3])
    with pytest.raises(ValueError, match="duplicate"):
        aggregate_fold_metrics([*files, files[0]])
    odd = _metric_file(tmp_path, "c", 0, metrics=("ACC",))
    with pytest.raises(ValueError, match="different metrics"):
        aggregate_fold_metrics([*files, odd])


def test_every_named_metric_matches_its_reference():
    from sklearn.metrics import (
        average_precision_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        f1_score,
    )

    from mmdiag.evaluation.metrics import METRICS, compute_metrics

    rng = np.random.default_rng(1)
    for n_classes in (2, 4):
        y_true = rng.integers(0, n_classes, size=60)
        prob = rng.dirichlet(np.ones(n_classes), size=60)
        y_pred = prob.argmax(1)
        metrics = compute_metrics(["AP", "BACC", "microF1", "QWK"], y_true, prob=prob)
        expected_ap = (
            average_precision_score(y_true, prob[:, 1])
            if n_classes == 2
            else np.mean([average_precision_score(y_true == k, prob[:, k]) for k in range(4)])
        )
        assert metrics["AP"] == pytest.approx(expected_ap)
        assert metrics["BACC"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
        assert metrics["microF1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
        assert metrics["QWK"] == pytest.approx(
            cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=range(n_classes))
        )
    assert {"ACC", "AUC", "PRE", "REC", "SPE", "F1", "AP", "BACC", "QWK", "C-index"} <= set(METRICS)


def test_c_index_and_given_predictions():
    from mmdiag.evaluation.metrics import compute_metrics

    # risks ordered exactly against the event times: every comparable pair is concordant
    time, event = [1.0, 2.0, 3.0, 4.0], [1, 1, 0, 1]
    risk = [4.0, 3.0, 2.0, 1.0]
    y = [0, 0, 1, 1]
    assert compute_metrics(["C-index"], y, time=time, event=event, risk=risk) == {"C-index": 1.0}
    reversed_risk = compute_metrics(["C-index"], y, time=time, event=event, risk=risk[::-1])
    assert reversed_risk["C-index"] == 0.0
    # y_pred, when given, replaces the arg-max of prob (a vote's or a threshold's classes)
    prob = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
    assert compute_metrics(["ACC"], y, prob=prob)["ACC"] == 1.0
    assert compute_metrics(["ACC"], y, prob=prob, y_pred=[1, 0, 1, 1])["ACC"] == 0.75
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["nope"], y, prob=prob)
    with pytest.raises(ValueError, match="C-index needs time"):
        compute_metrics(["C-index"], y, prob=prob)
