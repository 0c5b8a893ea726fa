"""The one predictions writer, the provenance record and the one table reader."""

import numpy as np
import pandas as pd
import pytest

from mmdiag.io import read_tsv, sha256_file, sha256_path, write_tsv
from mmdiag.training.fold_outputs import PREDICTION_COLUMNS, predictions_frame, provenance


def test_predictions_have_the_design_columns_in_order():
    prob = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    frame = predictions_frame(
        ["007", "012"], fold=2, variant="v", y_true=[0, 1], prob=prob, classes=["A", "B", "C"]
    )
    assert list(frame.columns) == [*PREDICTION_COLUMNS, "prob_A", "prob_B", "prob_C"]
    assert frame["y_pred"].tolist() == [0, 2]  # the arg-max unless given
    survival = predictions_frame(
        ["a", "b"],
        fold=0,
        variant="v",
        y_true=[0, 1],
        y_pred=[1, 1],
        prob=prob[:, :2] / prob[:, :2].sum(1, keepdims=True),
        classes=["low", "high"],
        survival={"time": [3.0, 5.5], "event": [1, 0], "risk": [0.2, -0.1]},
        extra={"score_max": [0.9, 0.8]},
    )
    assert list(survival.columns)[-4:] == ["time", "event", "risk", "score_max"]
    assert survival["y_pred"].tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"prob has shape \(2, 3\); expected \(2, 2\)"):
        predictions_frame(["a", "b"], fold=0, variant="v", y_true=[0, 1], prob=prob, classes="AB")
    with pytest.raises(ValueError, match="lack"):
        predictions_frame(
            ["a"], fold=0, variant="v", y_true=[0], y_pred=[0], survival={"time": [1.0]}
        )


def test_ids_stay_strings_through_a_round_trip(tmp_path):
    frame = predictions_frame(
        ["007", "12"], fold=0, variant="v", y_true=[0, 1], prob=np.eye(2), classes=["A", "B"]
    )
    read = read_tsv(write_tsv(frame, tmp_path / "p.tsv"))
    assert read["patient_id"].tolist() == ["007", "12"]
    assert read["prob_A"].dtype == np.float64
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_tsv(tmp_path / "missing.tsv")
    (tmp_path / "bad.tsv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bad.tsv"):
        read_tsv(tmp_path / "bad.tsv")


def test_provenance_checksums_every_input(tmp_path):
    manifest = tmp_path / "manifest.tsv"
    pd.DataFrame({"patient_id": ["a"]}).to_csv(manifest, sep="\t", index=False)
    store = tmp_path / "stores" / "s.zarr"
    (store / "features" / "c").mkdir(parents=True)
    (store / "zarr.json").write_text('{"attributes": {"complete": true}}')
    (store / "features" / "c" / "0").write_bytes(b"\x00" * 64)
    settings = {"variants": {"v": {"model": "m"}}, "train": {"epochs": 1}}
    record = provenance(
        method="x",
        variant="v",
        fold=1,
        method_settings=settings,
        classes=["A", "B"],
        inputs={"manifest": manifest, "features": tmp_path / "stores"},
        n_cases={"train": 3, "test": 1},
    )
    assert record["model"] == "m" and record["classes"] == ["A", "B"]
    assert record["inputs"]["manifest"]["sha256"] == sha256_file(manifest)
    before = record["inputs"]["features"]["sha256"]
    assert set(record["versions"]) == {"mmdiag", "torch", "python"}
    # a folder's fingerprint follows its metadata and its files' sizes
    (store / "zarr.json").write_text('{"attributes": {"complete": false}}')
    assert sha256_path(tmp_path / "stores") != before
    (store / "zarr.json").write_text('{"attributes": {"complete": true}}')
    assert sha256_path(tmp_path / "stores") == before
    (store / "features" / "c" / "1").write_bytes(b"\x01")
    assert sha256_path(tmp_path / "stores") != before


def test_multitask_metrics_per_task_leave_out_unlabelled_cases():
    from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

    from mmdiag.data import Task
    from mmdiag.training.fold_outputs import multitask_fold_metrics, multitask_predictions

    grade = Task("grade", "grade", ("G1", "G2", "G3"), ordinal=True)
    tumour = Task("tumour", "tumour", ("no", "yes"))
    rng = np.random.default_rng(0)
    ids = [f"P{i}" for i in range(12)]
    grade_prob = rng.dirichlet(np.ones(3), 12)
    grade_true = np.array([0, 1, 2, 2, 1, 0, 0, 1, 2, 1, 0, 2])
    tumour_prob = rng.dirichlet(np.ones(2), 12)
    tumour_true = np.array([0, 1, -1, 1, 0, 1, -1, 0, 1, 0, 1, 0])  # two unlabelled cases
    predictions = multitask_predictions(
        {
            "grade": predictions_frame(
                ids, fold=0, variant="v", y_true=grade_true, prob=grade_prob, classes=grade.classes
            ),
            "tumour": predictions_frame(
                ids,
                fold=0,
                variant="v",
                y_true=tumour_true,
                prob=tumour_prob,
                classes=("no", "yes"),
            ),
        }
    )
    assert list(predictions.columns[:6]) == [
        "patient_id",
        "fold",
        "variant",
        "task",
        "y_true",
        "y_pred",
    ]
    assert predictions["prob_G1"].isna().sum() == 12  # tumour rows have no grade classes
    metrics = multitask_fold_metrics(predictions, [grade, tumour])
    assert metrics["grade/QWK"] == pytest.approx(
        cohen_kappa_score(grade_true, grade_prob.argmax(1), weights="quadratic")
    )
    assert "tumour/QWK" not in metrics
    labelled = tumour_true >= 0
    assert metrics["tumour/ACC"] == pytest.approx(
        accuracy_score(tumour_true[labelled], tumour_prob.argmax(1)[labelled])
    )
    assert metrics["tumour/AUC"] == pytest.approx(
        roc_auc_score(tumour_true[labelled], tumour_prob[labelled, 1])
    )
