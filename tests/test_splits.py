"""Tests of patient-level splits: stratification, no leakage, determinism, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmdiag.data import (
    holdout_split,
    kfold_splits,
    load_splits,
    make_splits,
    repeated_splits,
    write_splits,
)

# 23 IgAN, 17 MN, 11 LN: class sizes that do not divide evenly into folds or fractions
COUNTS = {"IgAN": 23, "MN": 17, "LN": 11}
IDS = [f"P{i:03d}" for i in range(sum(COUNTS.values()))]
LABELS = [label for label, n in COUNTS.items() for _ in range(n)]
LABEL_OF = dict(zip(IDS, LABELS, strict=True))


def _class_counts(patients: list[str]) -> Counter:
    return Counter(LABEL_OF[p] for p in patients)


def _assert_disjoint(fold: dict) -> None:
    train, val, test = set(fold["train"]), set(fold["val"]), set(fold["test"])
    assert not train & val and not train & test and not val & test
    assert len(train) == len(fold["train"]) and len(test) == len(fold["test"])


def _assert_sorted(fold: dict) -> None:
    for part in ("train", "val", "test"):
        assert fold[part] == sorted(fold[part])


def _manifest() -> pd.DataFrame:
    """Two image rows per patient, MN patients carry an mn_stage, the others an empty one."""
    stages = iter(["I", "II", "III"] * 10)
    rows = []
    for pid, label in zip(IDS, LABELS, strict=True):
        stage = next(stages) if label == "MN" else ""
        for modality in ("OM", "TEM"):
            rows.append(
                {"patient_id": pid, "modality": modality, "disease": label, "mn_stage": stage}
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- k-fold


@pytest.mark.parametrize("n_folds", [2, 5, 11])
def test_kfold_stratified_and_without_leakage(n_folds: int) -> None:
    folds = kfold_splits(IDS, LABELS, n_folds=n_folds, seed=3)
    assert [f["fold"] for f in folds] == list(range(n_folds))
    tested = Counter(p for f in folds for p in f["test"])
    assert set(tested) == set(IDS) and set(tested.values()) == {1}  # each tested exactly once
    for fold in folds:
        _assert_disjoint(fold)
        _assert_sorted(fold)
        assert fold["val"] == []
        assert set(fold["train"]) | set(fold["test"]) == set(IDS)
        for label, count in _class_counts(fold["test"]).items():
            assert abs(count - COUNTS[label] / n_folds) <= 1
        assert set(_class_counts(fold["test"])) == set(COUNTS)


def test_kfold_validation_fraction_is_stratified() -> None:
    folds = kfold_splits(IDS, LABELS, n_folds=5, seed=1, val_fraction=0.25)
    tested = Counter(p for f in folds for p in f["test"])
    assert set(tested) == set(IDS) and set(tested.values()) == {1}
    for fold in folds:
        _assert_disjoint(fold)
        assert set(fold["train"]) | set(fold["val"]) | set(fold["test"]) == set(IDS)
        train_and_val = _class_counts(fold["train"] + fold["val"])
        for label, count in _class_counts(fold["val"]).items():
            assert abs(count - 0.25 * train_and_val[label]) <= 1


def test_kfold_deterministic_and_order_independent() -> None:
    first = kfold_splits(IDS, LABELS, n_folds=5, seed=7, val_fraction=0.2)
    again = kfold_splits(IDS, LABELS, n_folds=5, seed=7, val_fraction=0.2)
    order = np.random.default_rng(0).permutation(len(IDS))
    shuffled = kfold_splits(
        [IDS[i] for i in order], [LABELS[i] for i in order], n_folds=5, seed=7, val_fraction=0.2
    )
    other_seed = kfold_splits(IDS, LABELS, n_folds=5, seed=8, val_fraction=0.2)
    assert first == again == shuffled
    assert first != other_seed


def test_kfold_class_smaller_than_folds_is_named() -> None:
    labels = LABELS[:-9]  # LN keeps 2 patients
    with pytest.raises(ValueError, match=r"n_folds=3 .* class 'LN' has 2"):
        kfold_splits(IDS[:-9], labels, n_folds=3, seed=0)


@pytest.mark.parametrize("n_folds", [1, 0, -2, 2.5])
def test_kfold_needs_two_folds(n_folds) -> None:
    with pytest.raises(ValueError, match=r"n_folds must be an integer >= 2"):
        kfold_splits(IDS, LABELS, n_folds=n_folds, seed=0)


def test_kfold_bad_val_fraction() -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        kfold_splits(IDS, LABELS, n_folds=5, seed=0, val_fraction=1.0)


def test_bad_patient_inputs() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        kfold_splits(IDS, LABELS[:-1], n_folds=2, seed=0)
    with pytest.raises(ValueError, match=r"unique, repeated: \['P000'\]"):
        kfold_splits([*IDS, "P000"], [*LABELS, "LN"], n_folds=2, seed=0)


# --------------------------------------------------------------------------- holdout/repeated


def test_holdout_stratified_exact_allocation() -> None:
    (fold,) = holdout_split(IDS, LABELS, fractions=(0.6, 0.1, 0.3), seed=0)
    assert fold["fold"] == 0
    _assert_disjoint(fold)
    _assert_sorted(fold)
    assert set(fold["train"]) | set(fold["val"]) | set(fold["test"]) == set(IDS)
    for part, fraction in (("train", 0.6), ("val", 0.1), ("test", 0.3)):
        counts = _class_counts(fold[part])
        for label, n in COUNTS.items():
            assert abs(counts[label] - fraction * n) <= 1, (part, label)


def test_repeated_splits_differ_between_repeats_and_are_stable() -> None:
    folds = repeated_splits(IDS, LABELS, n_repeats=6, fractions=(0.7, 0.0, 0.3), seed=5)
    assert [f["fold"] for f in folds] == list(range(6))
    assert len({tuple(f["test"]) for f in folds}) > 1
    for fold in folds:
        _assert_disjoint(fold)
        assert fold["val"] == []
        assert set(fold["train"]) | set(fold["test"]) == set(IDS)
        for label, count in _class_counts(fold["test"]).items():
            assert abs(count - 0.3 * COUNTS[label]) <= 1
    # growing n_repeats keeps the earlier repeats; the holdout is repeat 0
    fewer = repeated_splits(IDS, LABELS, n_repeats=2, fractions=(0.7, 0.0, 0.3), seed=5)
    assert fewer == folds[:2]
    assert holdout_split(IDS, LABELS, fractions=(0.7, 0.0, 0.3), seed=5) == folds[:1]
    assert repeated_splits(IDS, LABELS, n_repeats=6, fractions=(0.7, 0.0, 0.3), seed=6) != folds


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.6, 0.1, 0.2), r"fractions must sum to 1, got \[0.6, 0.1, 0.2\]"),
        ((0.5, 0.5), r"fractions must be \(train, val, test\)"),
        ((0.0, 0.5, 0.5), "train and test > 0"),
        ((1.2, 0.0, -0.2), "non-negative"),
    ],
)
def test_bad_fractions(fractions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        holdout_split(IDS, LABELS, fractions=fractions, seed=0)


def test_holdout_with_empty_test_set_is_refused() -> None:
    with pytest.raises(ValueError, match="leave the test set empty"):
        holdout_split(["a", "b"], ["x", "y"], fractions=(0.8, 0.0, 0.2), seed=0)


# --------------------------------------------------------------------------- make/write/load


def test_make_splits_kfold_json_structure(tmp_path: Path) -> None:
    scheme = {"type": "kfold", "n_folds": 5, "val_fraction": 0.0, "label": "disease"}
    splits = make_splits(_manifest(), "cv5", scheme, seed=11)
    assert list(splits) == ["scheme", "type", "seed", "label", "n_patients", "params", "folds"]
    assert splits["scheme"] == "cv5" and splits["type"] == "kfold" and splits["seed"] == 11
    assert splits["label"] == "disease" and splits["n_patients"] == len(IDS)
    assert splits["params"] == {"n_folds": 5, "val_fraction": 0.0}
    assert splits["folds"] == kfold_splits(IDS, LABELS, n_folds=5, seed=11)
    path = write_splits(splits, tmp_path / "splits" / "cv5.json")
    assert json.loads(path.read_text()) == splits
    assert load_splits(path) == splits


def test_make_splits_same_seed_same_json_different_seed_differs(tmp_path: Path) -> None:
    scheme = {"type": "repeated", "n_repeats": 3, "fractions": [0.6, 0.1, 0.3]}
    a = write_splits(make_splits(_manifest(), "rep", scheme, seed=1), tmp_path / "a.json")
    b = write_splits(make_splits(_manifest(), "rep", scheme, seed=1), tmp_path / "b.json")
    c = write_splits(make_splits(_manifest(), "rep", scheme, seed=2), tmp_path / "c.json")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_make_splits_excludes_empty_labels() -> None:
    scheme = {"type": "holdout", "fractions": [0.5, 0.0, 0.5], "label": "mn_stage"}
    splits = make_splits(_manifest(), "stage", scheme, seed=0)
    mn_patients = {p for p, label in LABEL_OF.items() if label == "MN"}
    (fold,) = splits["folds"]
    assert splits["n_patients"] == len(mn_patients) == 17
    assert set(fold["train"]) | set(fold["val"]) | set(fold["test"]) == mn_patients
    assert splits["params"] == {"fractions": [0.5, 0.0, 0.5], "n_seeds": 1}
    assert splits["label"] == "mn_stage"


def test_make_splits_ignores_other_types_keys() -> None:
    # the config schema fills every scheme with the defaults of all scheme types
    scheme = {
        "type": "kfold",
        "n_folds": 3,
        "val_fraction": 0.0,
        "n_repeats": 10,
        "fractions": [0.6, 0.1, 0.3],
        "label": "disease",
    }
    splits = make_splits(_manifest(), "k", scheme, seed=0)
    assert splits["params"] == {"n_folds": 3, "val_fraction": 0.0}
    assert len(splits["folds"]) == 3


def test_make_splits_errors() -> None:
    manifest = _manifest()
    with pytest.raises(ValueError, match=r"scheme 'x': type must be one of .* got 'loo'"):
        make_splits(manifest, "x", {"type": "loo"}, seed=0)
    with pytest.raises(ValueError, match=r"unknown keys \['n_fold'\]"):
        make_splits(manifest, "x", {"type": "kfold", "n_fold": 5}, seed=0)
    with pytest.raises(ValueError, match="manifest has no column 'grade'"):
        make_splits(manifest, "x", {"type": "kfold", "label": "grade"}, seed=0)
    with pytest.raises(ValueError, match="class 'LN' has 11"):
        make_splits(manifest, "x", {"type": "kfold", "n_folds": 12}, seed=0)
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        make_splits(manifest, "x", {"type": "holdout", "fractions": [0.5, 0.5, 0.5]}, seed=0)
    with pytest.raises(ValueError, match="needs 'fractions'"):
        make_splits(manifest, "x", {"type": "repeated", "n_repeats": 2}, seed=0)
    inconsistent = manifest.copy()
    inconsistent.loc[0, "disease"] = "MN"
    with pytest.raises(ValueError, match="differs within patients"):
        make_splits(inconsistent, "x", {"type": "kfold"}, seed=0)


def _good_splits() -> dict:
    scheme = {"type": "kfold", "n_folds": 3}
    return make_splits(_manifest(), "cv3", scheme, seed=0)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s.pop("folds"), r"missing keys \['folds'\]"),
        (lambda s: s["folds"][1].update(fold=5), "numbered 5"),
        (lambda s: s["folds"][0]["train"].append(s["folds"][0]["test"][0]), "both train and test"),
        (lambda s: s["folds"][0]["test"].pop(), "holds 50 patients"),
        (lambda s: s.update(type="bootstrap"), "type must be one of"),
        (lambda s: s["folds"][0].update(val="P001"), "'val' must be a list"),
    ],
)
def test_load_splits_rejects_bad_structure(tmp_path: Path, corrupt, message: str) -> None:
    splits = _good_splits()
    corrupt(splits)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(splits))
    with pytest.raises(ValueError, match=message) as info:
        load_splits(path)
    assert "bad.json" in str(info.value)


def test_load_splits_kfold_needs_each_patient_tested_once(tmp_path: Path) -> None:
    splits = _good_splits()
    # fold 2 also tests a patient of fold 0: each fold stays disjoint and complete on its own
    dup = splits["folds"][0]["test"][0]
    splits["folds"][2]["train"].remove(dup)
    splits["folds"][2]["test"] = sorted([*splits["folds"][2]["test"], dup])
    path = tmp_path / "cv.json"
    path.write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="exactly once") as info:
        load_splits(path)
    assert "cv.json" in str(info.value)


def test_load_splits_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing.json: splits file not found"):
        load_splits(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.json: splits file is not readable JSON"):
        load_splits(tmp_path / "broken.json")


def test_write_splits_refuses_invalid(tmp_path: Path) -> None:
    splits = _good_splits()
    splits["folds"][0]["val"] = [splits["folds"][0]["test"][0]]
    with pytest.raises(ValueError, match="both val and test"):
        write_splits(splits, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
