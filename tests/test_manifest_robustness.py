"""Tests of the manifest on cohorts as users build them from real files: symbolic links, one
image listed twice, stray columns and MR as a required modality."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmdiag.data import ManifestRules, build_manifest
from tests.test_manifest import (
    CLINICAL,
    RULES,
    _edit_tsv,
    _error,
    _nifti,
    _real,
    _rgb,
    _write_tsv,
    make_cohort,
)

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"
OM_ONLY = ManifestRules(classes=RULES.classes, stages=RULES.stages, required_modalities=("OM",))
WSI_ONLY = ManifestRules(classes=RULES.classes, stages=RULES.stages, required_modalities=("WSI",))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _link(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _linked_cohort(root: Path, targets: dict[str, Path], name: str, modality: str) -> Path:
    """A cohort whose patient ``P`` has one image, the link ``P/<name>`` to ``targets[P]``."""
    for pid, target in targets.items():
        _link(root / pid / name, target)
    images = [{"patient_id": pid, "modality": modality, "path": f"{pid}/{name}"} for pid in targets]
    _write_tsv(CLINICAL, root / "clinical.tsv")
    _write_tsv(images, root / "images.tsv")
    return root


def _ids_and_paths(frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(frame["image_id"], frame["path"], strict=True))


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    return make_cohort(tmp_path / "cohort")


# --------------------------------------------------------------------------- symbolic links


def test_linked_images_keep_the_written_path_and_id(tmp_path: Path) -> None:
    """Links to two files of one name give the links' ids, not ``slide`` twice."""
    targets = {
        "P1": _rgb(tmp_path / "store" / "a" / "slide.png"),
        "P2": _rgb(tmp_path / "store" / "b" / "slide.png"),
    }
    root = _linked_cohort(tmp_path / "cohort", targets, "om.png", "OM")
    frame = build_manifest(cohort_root=root, rules=OM_ONLY)
    assert _ids_and_paths(frame) == {
        "P1/om": str(root / "P1" / "om.png"),
        "P2/om": str(root / "P2" / "om.png"),
    }
    assert frame["sha256"].tolist() == [_sha256(targets["P1"]), _sha256(targets["P2"])]


def test_real_slides_linked_under_one_name(tmp_path: Path) -> None:
    """The user's layout: ``P/wsi.svs`` -> ``.../slide.svs`` -> a real slide, per patient."""
    real = {"P1": _real("wsi", "CMU-1-Small-Region.svs")}
    real["P2"] = _real("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    targets = {
        pid: _link(tmp_path / "store" / folder / "slide.svs", slide)
        for (pid, slide), folder in zip(real.items(), ("a", "b"), strict=True)
    }
    root = _linked_cohort(tmp_path / "cohort", targets, "wsi.svs", "WSI")
    frame = build_manifest(cohort_root=root, rules=WSI_ONLY)
    assert _ids_and_paths(frame) == {
        "P1/wsi": str(root / "P1" / "wsi.svs"),
        "P2/wsi": str(root / "P2" / "wsi.svs"),
    }
    assert frame["sha256"].tolist() == [_sha256(real["P1"]), _sha256(real["P2"])]
    assert frame.loc[0, ["width_px", "height_px"]].tolist() == [2220, 2967]


def test_linked_folders_and_a_linked_cohort_root(tmp_path: Path) -> None:
    """A folder link inside the cohort keeps its name; a root given by a link still holds
    absolute paths written through its real location; ``..`` is normalised away."""
    real_root = tmp_path / "real_cohort"
    _rgb(tmp_path / "om_store" / "p1.png")
    _rgb(real_root / "om2" / "p2.png")
    _link(real_root / "om", tmp_path / "om_store")
    images = [
        {"patient_id": "P1", "modality": "OM", "path": "om/p1.png"},
        {"patient_id": "P2", "modality": "OM", "path": str(real_root / "x" / ".." / "om2/p2.png")},
    ]
    _write_tsv(CLINICAL, real_root / "clinical.tsv")
    _write_tsv(images, real_root / "images.tsv")
    root = _link(tmp_path / "cohort_link", real_root)

    frame = build_manifest(cohort_root=root, rules=OM_ONLY)
    assert _ids_and_paths(frame) == {
        "om/p1": str(root / "om" / "p1.png"),
        "om2/p2": str(real_root / "om2" / "p2.png"),
    }


def test_user_manifest_keeps_links(tmp_path: Path) -> None:
    target = _rgb(tmp_path / "store" / "slide.png")
    link = _link(tmp_path / "mine" / "P1_om.png", target)
    rows = [{"patient_id": "P1", "modality": "OM", "path": "P1_om.png", "disease": "MN"}]
    tsv = _write_tsv(rows, tmp_path / "mine" / "manifest.tsv")
    frame = build_manifest(manifest_tsv=tsv, rules=OM_ONLY)
    assert _ids_and_paths(frame) == {"P1_om": str(link)}
    assert frame.loc[0, "sha256"] == _sha256(target)


def test_broken_link_is_named_as_such(tmp_path: Path) -> None:
    targets = {"P1": _rgb(tmp_path / "store" / "a.png"), "P2": tmp_path / "store" / "gone.png"}
    root = _linked_cohort(tmp_path / "cohort", targets, "om.png", "OM")
    message = _error(cohort_root=root, rules=OM_ONLY)
    assert "image files not found (1)" in message
    assert f"{root / 'P2' / 'om.png'} (patient 'P2', row 3)" in message
    assert f"a broken symbolic link to {targets['P2']}" in message


# --------------------------------------------------------------------------- one content twice


def test_real_slide_linked_for_two_patients_is_an_error(tmp_path: Path) -> None:
    slide = _real("wsi", "CMU-1-Small-Region.svs")
    root = _linked_cohort(tmp_path / "cohort", {"P1": slide, "P2": slide}, "wsi.svs", "WSI")
    message = _error(cohort_root=root, rules=WSI_ONLY)
    assert "images.tsv: the same image content on several rows (1)" in message
    assert f"sha256 {_sha256(slide)[:12]}... in 2 patients ['P1', 'P2']" in message
    assert "one image in two partitions" in message
    assert f"row 2 {root / 'P1' / 'wsi.svs'} (patient 'P1', image_id 'P1/wsi')" in message
    assert f"row 3 {root / 'P2' / 'wsi.svs'} (patient 'P2', image_id 'P2/wsi')" in message


def test_copied_image_under_another_patient_is_an_error(cohort: Path) -> None:
    shutil.copyfile(cohort / "om" / "p1_om.jpg", cohort / "om" / "p2_copy.jpg")
    extra = {"patient_id": "P2", "modality": "OM", "path": "om/p2_copy.jpg"}
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, pd.DataFrame([extra])]))
    message = _error(cohort_root=cohort)
    assert "the same image content on several rows (1)" in message
    assert "in 2 patients ['P1', 'P2']" in message
    assert "p1_om.jpg (patient 'P1', image_id 'om/p1_om')" in message
    assert "row 10 " in message and "p2_copy.jpg (patient 'P2', image_id 'om/p2_copy')" in message


def test_one_image_twice_in_one_patient_is_an_error(cohort: Path) -> None:
    """A link to a listed file and a copy of it: both caught, as the digest is of the content."""
    _link(cohort / "tem" / "p2_tem_link.tif", cohort / "tem" / "p2_tem_a.tif")
    shutil.copyfile(cohort / "im" / "p1_im.png", cohort / "im" / "p1_im_copy.png")
    extra = [
        {"patient_id": "P2", "modality": "TEM", "path": "tem/p2_tem_link.tif"},
        {"patient_id": "P1", "modality": "IM", "path": "im/p1_im_copy.png"},
    ]
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, pd.DataFrame(extra)]))
    message = _error(cohort_root=cohort)
    assert "the same image content on several rows (2)" in message
    assert "2 times in patient 'P2': one image counted twice" in message
    assert "2 times in patient 'P1': one image counted twice" in message
    assert "image_id 'tem/p2_tem_a'" in message and "image_id 'tem/p2_tem_link'" in message
    assert "image_id 'im/p1_im'" in message and "image_id 'im/p1_im_copy'" in message


# --------------------------------------------------------------------------- stray columns


def _manifest_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mmdiag.data.manifest"]


def test_valid_cohort_logs_no_column_warning(cohort: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mmdiag.data.manifest"):
        build_manifest(cohort_root=cohort, rules=RULES)
    assert _manifest_warnings(caplog) == []


def test_unknown_columns_are_warned_per_file(cohort: Path, caplog) -> None:
    _edit_tsv(cohort / "clinical.tsv", lambda t: t.assign(dissease="MN", mpp="0.5"))
    _edit_tsv(cohort / "images.tsv", lambda t: t.assign(notes="", disease="MN"))
    with caplog.at_level(logging.WARNING, logger="mmdiag.data.manifest"):
        frame = build_manifest(cohort_root=cohort, rules=RULES)  # valid: the columns are ignored
    assert frame.drop_duplicates("patient_id")["disease"].tolist() == ["IgAN", "MN"]
    clinical, images = _manifest_warnings(caplog)
    assert str(cohort / "clinical.tsv") in clinical and "['dissease', 'mpp']" in clinical
    assert "'dissease' -> 'disease'?" in clinical
    assert str(cohort / "images.tsv") in images and "['notes', 'disease']" in images


def test_declared_task_columns_are_not_warned(cohort: Path, caplog) -> None:
    rules = ManifestRules.from_config(
        {
            "classes": list(RULES.classes),
            "stages": list(RULES.stages),
            "required_modalities": list(RULES.required_modalities),
            "min_image_px": dict(RULES.min_image_px),
            "tasks": {"grade": {"classes": ["G1", "G2"]}},
        }
    )
    _edit_tsv(cohort / "clinical.tsv", lambda t: t.assign(grade=["G1", "G2"], grdae="G1"))
    with caplog.at_level(logging.WARNING, logger="mmdiag.data.manifest"):
        frame = build_manifest(cohort_root=cohort, rules=rules)
    assert "grade" in frame.columns
    (warning,) = _manifest_warnings(caplog)
    assert "['grdae']" in warning and "'grdae' -> 'grade'?" in warning


def test_user_manifest_unknown_columns(cohort: Path, caplog) -> None:
    images = pd.read_csv(cohort / "images.tsv", sep="\t", dtype=str, keep_default_na=False)
    user = images.merge(pd.DataFrame(CLINICAL), on="patient_id").assign(image_id="", survival="")
    tsv = _write_tsv(user.to_dict("records"), cohort / "user.tsv")
    with caplog.at_level(logging.WARNING, logger="mmdiag.data.manifest"):
        build_manifest(manifest_tsv=tsv, rules=RULES)
    (warning,) = _manifest_warnings(caplog)
    assert str(tsv) in warning and "['image_id', 'survival']" in warning


# --------------------------------------------------------------------------- MR


def _with_mr(cohort: Path, patients: tuple[str, ...]) -> None:
    extra = []
    for pid in patients:
        _nifti(cohort / "mr" / f"{pid.lower()}_t2.nii.gz")
        extra.append({"patient_id": pid, "modality": "mr", "path": f"mr/{pid.lower()}_t2.nii.gz"})
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, pd.DataFrame(extra)]))


def test_mr_as_a_required_modality(cohort: Path) -> None:
    _with_mr(cohort, ("P1", "P2"))
    rules = ManifestRules(
        classes=RULES.classes, stages=RULES.stages, required_modalities=("OM", "mr")
    )
    assert rules.required_modalities == ("OM", "MR")
    frame = build_manifest(cohort_root=cohort, rules=rules)
    mr = frame[frame["modality"] == "MR"]
    assert mr["image_id"].tolist() == ["mr/p1_t2", "mr/p2_t2"]
    assert mr[["width_px", "height_px"]].values.tolist() == [[20, 24], [20, 24]]


def test_mr_missing_for_a_patient(cohort: Path) -> None:
    _with_mr(cohort, ("P1",))
    rules = ManifestRules.from_config(
        {"classes": list(RULES.classes), "stages": list(RULES.stages), "tasks": {}}
        | {"required_modalities": ["TEM", "MR"], "min_image_px": {"MR": 16}}
    )
    message = _error(cohort_root=cohort, rules=rules)
    assert "missing a required modality (1)" in message
    assert "patient 'P2' has no image of required modality MR" in message


def test_unknown_required_modality_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"required_modalities \['MRI'\] are not among"):
        ManifestRules(classes=RULES.classes, required_modalities=("OM", "MRI"))


def test_schema_accepts_mr_wherever_a_modality_is_named() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    manifest = schema["properties"]["manifest"]["properties"]
    assert "MR" in manifest["required_modalities"]["items"]["enum"]
    assert "MR" in manifest["min_image_px"]["propertyNames"]["enum"]
    cohort_rules = schema["properties"]["cohorts"]["additionalProperties"]["properties"]
    overrides = cohort_rules["manifest_rules"]["properties"]
    assert "MR" in overrides["required_modalities"]["items"]["enum"]


def test_path_column_is_absolute_not_resolved(cohort: Path) -> None:
    """The manifest's paths are the written ones: equal to ``abspath``, links kept."""
    _link(cohort / "om" / "p2_link.png", _rgb(cohort.parent / "outside" / "p2.png"))
    extra = {"patient_id": "P2", "modality": "OM", "path": "./om/../om/p2_link.png"}
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, pd.DataFrame([extra])]))
    frame = build_manifest(cohort_root=cohort, rules=RULES)
    row = frame[frame["image_id"] == "om/p2_link"].iloc[0]
    assert row["path"] == os.path.abspath(cohort / "om" / "p2_link.png")
    assert Path(row["path"]).is_symlink()
