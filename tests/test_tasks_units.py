"""Tests of prediction tasks (any label column), units of prediction, predefined and
seed-repeated splits: labels validated by the manifest, no patient's units in two parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mmdiag.config import ConfigError, load_config
from mmdiag.data import (
    MANIFEST_COLUMNS,
    ManifestError,
    ManifestRules,
    Task,
    build_manifest,
    cohort_tasks,
    make_splits,
    method_tasks,
    patient_labels,
    read_manifest,
    sequence_units,
    split_units,
    training_seed,
    write_manifest,
    write_splits,
)
from mmdiag.data.splits import load_splits, scheme_fold_count
from mmdiag.data.tasks import MISSING
from mmdiag.data.units import image_units
from tests.test_manifest import make_cohort

GRADE = {"grade": {"classes": ["G1", "G2", "G3"], "ordinal": True, "required": True}}
RULES_CONFIG = {
    "classes": ["IgAN", "MN", "LN"],
    "stages": ["I", "II", "III"],
    "required_modalities": ["OM", "IM", "TEM"],
    "min_image_px": {"OM": 32, "IM": 32, "TEM": 32, "CT": 16},
    "tasks": GRADE | {"who": {"column": "who_type", "classes": ["A", "B"]}},
}


# --------------------------------------------------------------------------- tasks


def test_task_encodes_in_class_order_and_names_unknown_labels() -> None:
    task = Task("grade", "grade", ("G1", "G2", "G3"), ordinal=True)
    assert task.encode(["G3", "", "G1", " G2 "]).tolist() == [2, MISSING, 0, 1]
    assert task.decode([2, MISSING, 0]) == ["G3", "", "G1"]
    assert "QWK" in task.metrics and "QWK" not in Task("d", "d", ("a", "b")).metrics
    with pytest.raises(ValueError, match=r"clinical.tsv: task 'grade'.*\['G4', 'g1'\]"):
        task.encode(["G4", "g1", "G1"], where="clinical.tsv")
    with pytest.raises(ValueError, match="at least 2 classes"):
        Task("t", "t", ("only",))


def test_cohort_tasks_built_in_and_declared() -> None:
    tasks = cohort_tasks(RULES_CONFIG)
    assert list(tasks) == ["disease", "mn_stage", "grade", "who"]
    assert tasks["disease"].classes == ("IgAN", "MN", "LN") and tasks["disease"].required
    assert tasks["mn_stage"].ordinal and not tasks["mn_stage"].required
    assert tasks["who"].column == "who_type" and not tasks["who"].ordinal
    assert [t.name for t in method_tasks({"tasks": ["grade", "disease"]}, RULES_CONFIG)] == [
        "grade",
        "disease",
    ]
    assert [t.name for t in method_tasks({}, RULES_CONFIG)] == ["disease"]
    with pytest.raises(ValueError, match=r"\['stage'\] are not tasks"):
        method_tasks({"tasks": ["stage"]}, RULES_CONFIG)
    with pytest.raises(ValueError, match="built in"):
        cohort_tasks(RULES_CONFIG | {"tasks": {"disease": {"classes": ["a", "b"]}}})


# --------------------------------------------------------------------------- manifest


def _cohort_with_tasks(root: Path, grades=("G2", "G1"), who=("A", "")) -> Path:
    make_cohort(root)
    clinical = pd.read_csv(root / "clinical.tsv", sep="\t", dtype=str, keep_default_na=False)
    clinical["grade"] = list(grades)
    clinical["who_type"] = list(who)
    clinical.to_csv(root / "clinical.tsv", sep="\t", index=False)
    return root


def test_manifest_carries_and_validates_task_columns(tmp_path: Path) -> None:
    root = _cohort_with_tasks(tmp_path / "cohort")
    rules = ManifestRules.from_config(RULES_CONFIG)
    frame = build_manifest(cohort_root=root, rules=rules)
    assert list(frame.columns) == [*MANIFEST_COLUMNS, "grade", "who_type"]
    per_patient = frame.drop_duplicates("patient_id").set_index("patient_id")
    assert per_patient.loc["P2", "grade"] == "G2" and per_patient.loc["P1", "grade"] == "G1"
    assert per_patient.loc["P2", "who_type"] == "A" and per_patient.loc["P1", "who_type"] == ""
    path = write_manifest(frame, tmp_path / "manifest.tsv")
    pd.testing.assert_frame_equal(read_manifest(path), frame)

    labels = patient_labels(frame, method_tasks({"tasks": ["grade", "who"]}, RULES_CONFIG))
    assert labels.to_dict("list") == {
        "patient_id": ["P1", "P2"],
        "grade": [0, 1],
        "who": [MISSING, 0],
    }


def test_manifest_rejects_task_labels_outside_classes_or_missing(tmp_path: Path) -> None:
    rules = ManifestRules.from_config(RULES_CONFIG)
    root = _cohort_with_tasks(tmp_path / "a", grades=("G2", "G9"), who=("A", "C"))
    with pytest.raises(ManifestError) as error:
        build_manifest(cohort_root=root, rules=rules)
    message = str(error.value)
    assert "clinical.tsv: labels outside the allowed values (2)" in message
    assert "patient 'P1' (row 3): grade 'G9' is not one of the classes" in message
    assert "who_type 'C'" in message

    root = _cohort_with_tasks(tmp_path / "b", grades=("", "G1"))
    with pytest.raises(ManifestError, match=r"patient 'P2' \(row 2\): grade is empty \(required\)"):
        build_manifest(cohort_root=root, rules=rules)

    root = make_cohort(tmp_path / "c")
    with pytest.raises(ManifestError, match=r"lacks required columns \['grade', 'who_type'\]"):
        build_manifest(cohort_root=root, rules=rules)


def test_user_manifest_task_labels_must_agree_within_a_patient(tmp_path: Path) -> None:
    root = _cohort_with_tasks(tmp_path / "cohort")
    rules = ManifestRules.from_config(RULES_CONFIG)
    frame = build_manifest(cohort_root=root, rules=rules)
    user = frame[["patient_id", "modality", "path", "disease", "grade", "who_type"]].copy()
    user.loc[user.index[0], "grade"] = "G3"  # P1's first image disagrees with its others
    user.to_csv(tmp_path / "user.tsv", sep="\t", index=False)
    with pytest.raises(ManifestError, match=r"patient 'P1': grade takes values \['G1', 'G3'\]"):
        build_manifest(manifest_tsv=tmp_path / "user.tsv", rules=rules)


# --------------------------------------------------------------------------- splits


def _manifest(n_per_class: int = 6) -> pd.DataFrame:
    ids = [f"P{i:02d}" for i in range(3 * n_per_class)]
    labels = ["IgAN", "MN", "LN"] * n_per_class
    return pd.DataFrame({"patient_id": ids, "disease": labels})


def _partition(path: Path, manifest: pd.DataFrame, repeats: int = 1) -> Path:
    rows = []
    for repeat in range(repeats):
        for i, pid in enumerate(manifest["patient_id"]):
            part = ("train", "train", "val", "test")[(i + repeat) % 4]
            rows.append({"patient_id": pid, "part": part, "repeat": repeat})
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(path, sep="\t", index=False)
    return path


def test_predefined_splits_follow_the_table(tmp_path: Path) -> None:
    manifest = _manifest()
    table = _partition(tmp_path / "parts.tsv", manifest, repeats=2)
    scheme = {"type": "predefined", "path": str(table), "label": "disease"}
    splits = make_splits(manifest, "mine", scheme, seed=3)
    rows = pd.read_csv(table, sep="\t")
    assert len(splits["folds"]) == 2 == scheme_fold_count(scheme)
    for fold in splits["folds"]:
        mine = rows[rows["repeat"] == fold["fold"]]
        for part in ("train", "val", "test"):
            assert fold[part] == sorted(mine.loc[mine["part"] == part, "patient_id"])
    written = write_splits(splits, tmp_path / "mine.json")
    assert load_splits(written)["folds"] == splits["folds"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t[t["patient_id"] != "P03"], r"cohort patients missing: \['P03'\]"),
        (
            lambda t: pd.concat(
                [t, pd.DataFrame([{"patient_id": "X9", "part": "test", "repeat": "0"}])]
            ),
            r"not in the cohort \(or without the label\): \['X9'\]",
        ),
        (lambda t: t.assign(part=t["part"].replace("val", "valid")), r"\['valid'\] are not"),
        (lambda t: pd.concat([t, t.head(1)]), r"listed twice within a repeat.*\(0, 'P\d+'\)"),
        (lambda t: t.assign(part="train"), "the test part is empty"),
        (lambda t: t.drop(columns="part"), r"lacks columns \['part'\]"),
    ],
)
def test_predefined_table_errors_name_file_and_patients(tmp_path: Path, edit, message) -> None:
    manifest = _manifest()
    path = _partition(tmp_path / "parts.tsv", manifest)
    table = pd.read_csv(path, sep="\t", dtype=str)
    edit(table).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=message) as error:
        make_splits(manifest, "mine", {"type": "predefined", "path": str(path)}, seed=0)
    assert "parts.tsv" in str(error.value)


def test_seed_repeats_repeat_one_partition_with_consecutive_seeds(tmp_path: Path) -> None:
    manifest = _manifest()
    scheme = {"type": "holdout", "fractions": [0.6, 0.1, 0.3], "n_seeds": 3}
    splits = make_splits(manifest, "three_seeds", scheme, seed=5)
    single = make_splits(manifest, "one", scheme | {"n_seeds": 1}, seed=5)["folds"][0]
    assert (
        [f["fold"] for f in splits["folds"]] == [0, 1, 2] == list(range(scheme_fold_count(scheme)))
    )
    for r, fold in enumerate(splits["folds"]):
        assert {k: fold[k] for k in ("train", "val", "test")} == {
            k: single[k] for k in ("train", "val", "test")
        }
        assert fold["seed_index"] == r and training_seed(fold, 10) == 10 + r
    assert training_seed(single, 10) == 10
    write_splits(splits, tmp_path / "s.json")  # the validator accepts identical partitions


def test_config_checks_labels_tasks_and_predefined_paths(tmp_path: Path) -> None:
    override = {
        "splits": {
            "schemes": {
                "own": {"type": "predefined"},
                "by_grade": {"type": "kfold", "label": "grade", "n_seeds": 2},
            }
        },
        "methods": {"cmus": {"split": "by_grade"}},
    }
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(override))
    with pytest.raises(ConfigError) as error:
        load_config(["config/config.yaml", "config/methods/cmus.yaml", tmp_path / "over.yaml"])
    message = str(error.value)
    assert "splits.schemes.own: a predefined scheme needs `path`" in message
    assert "splits.schemes.by_grade: n_seeds applies to holdout and predefined" in message
    assert "methods.cmus.split: its label 'grade' is not a label column" in message

    override["manifest"] = {"tasks": GRADE}
    override["splits"]["schemes"] = {"by_grade": {"type": "kfold", "label": "grade"}}
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(override))
    config = load_config(["config/config.yaml", "config/methods/cmus.yaml", tmp_path / "over.yaml"])
    assert config["manifest"]["tasks"]["grade"]["ordinal"] is True


# --------------------------------------------------------------------------- units


def _ct_manifest() -> pd.DataFrame:
    rows = []
    for p in range(12):
        pid = f"P{p:02d}"
        for v in range(1 + p % 3):  # one to three CT volumes per patient
            rows.append({"patient_id": pid, "modality": "CT", "image_id": f"ct/{pid}_{v}"})
        rows.append({"patient_id": pid, "modality": "WSI", "image_id": f"wsi/{pid}"})
    frame = pd.DataFrame(rows)
    frame["disease"] = frame["patient_id"].map(lambda p: ["IgAN", "MN", "LN"][int(p[1:]) % 3])
    return frame


def test_no_patient_has_sequences_in_two_parts() -> None:
    manifest = _ct_manifest()
    ct = manifest[manifest["modality"] == "CT"]
    sequences = {image_id: [(20, 44), (44, 68)] for image_id in ct["image_id"]}
    units = sequence_units(manifest, sequences)
    assert len(units) == 2 * len(ct)
    assert units.loc[0, "unit_id"] == "ct/P00_0@20-44"
    splits = make_splits(manifest, "kfold", {"type": "kfold", "n_folds": 3}, seed=1)
    tested = []
    for fold in splits["folds"]:
        parts = split_units(units, fold)
        patients = {part: set(frame["patient_id"]) for part, frame in parts.items()}
        assert not patients["train"] & patients["test"]
        assert not patients["train"] & patients["val"]
        assert patients["test"] == set(fold["test"])
        assert sum(len(frame) for frame in parts.values()) == len(units)
        tested += parts["test"]["unit_id"].tolist()
    assert sorted(tested) == sorted(units["unit_id"])  # every sequence tested exactly once


def test_split_units_rejects_a_patient_in_two_parts_and_duplicate_units() -> None:
    units = image_units(_ct_manifest(), "WSI")
    with pytest.raises(ValueError, match="patient 'P01' is in both train and test"):
        split_units(units, {"fold": 0, "train": ["P00", "P01"], "test": ["P01"]})
    with pytest.raises(ValueError, match="not unique"):
        split_units(pd.concat([units, units.head(1)]), {"train": ["P00"], "test": ["P01"]})
    with pytest.raises(ValueError, match="no MR image"):
        image_units(_ct_manifest(), "MR")
    with pytest.raises(ValueError, match=r"not in the manifest: \['ct/X'\]"):
        sequence_units(_ct_manifest(), {"ct/X": [(0, 24)]})


def test_splits_cli_writes_a_predefined_scheme(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmdiag.cli import app

    manifest = _manifest()
    manifest_path = tmp_path / "manifest.tsv"
    full = pd.DataFrame({c: [""] * len(manifest) for c in MANIFEST_COLUMNS})
    full[["patient_id", "disease"]] = manifest.to_numpy()
    full[["modality", "image_id", "path", "sha256"]] = "OM"
    full[["width_px", "height_px"]] = 64
    full.to_csv(manifest_path, sep="\t", index=False)
    table = _partition(tmp_path / "parts.tsv", manifest)
    settings = {
        "splits": {
            "seed": 0,
            "schemes": {"own": {"type": "predefined", "path": str(table), "n_seeds": 2}},
        }
    }
    out = tmp_path / "own.json"
    result = CliRunner().invoke(
        app,
        [
            "splits",
            "--manifest",
            str(manifest_path),
            "--scheme",
            "own",
            "--out",
            str(out),
            "--settings-json",
            json.dumps(settings),
        ],
    )
    assert result.exit_code == 0, result.output
    folds = json.loads(out.read_text())["folds"]
    assert [f.get("seed_index", 0) for f in folds] == [0, 1]
    rows = pd.read_csv(table, sep="\t")
    assert folds[1]["test"] == sorted(rows.loc[rows["part"] == "test", "patient_id"])
    assert np.array_equal(folds[0]["train"], folds[1]["train"])
