"""Tests of the cohort manifest: a valid tiny cohort, every kind of bad input, real formats."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from mmdiag.data import (
    MANIFEST_COLUMNS,
    ImageReadError,
    ManifestError,
    ManifestRules,
    build_manifest,
    image_stem,
    read_image_size,
    read_manifest,
    write_manifest,
)

REAL_DATA = Path("/work/shared/data/real")
RULES = ManifestRules(
    classes=("IgAN", "MN", "LN"),
    stages=("I", "II", "III"),
    required_modalities=("OM", "IM", "TEM"),
    min_image_px={"OM": 32, "IM": 32, "TEM": 32, "CT": 16},
)
CLINICAL = [
    {
        "patient_id": "P2",
        "disease": "MN",
        "mn_stage": "II",
        "survival_months": "12.5",
        "event": "1",
    },
    {"patient_id": "P1", "disease": "IgAN", "mn_stage": "", "survival_months": "30", "event": "0"},
]


# --------------------------------------------------------------------------- cohort builders


def _write_tsv(rows: list[dict], path: Path, columns: list[str] | None = None) -> Path:
    pd.DataFrame(rows, columns=columns).to_csv(path, sep="\t", index=False)
    return path


def _seed(path: Path) -> int:
    """A seed from the file's folder and name: distinct, reproducible content per file.

    Two rows with the same content are an error, so no two test images may be identical.
    """
    return zlib.crc32(f"{path.parent.name}/{path.name}".encode())


def _rgb(path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(_seed(path))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _gray_tiff(path: Path, size: tuple[int, int] = (64, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(_seed(path))
    tifffile.imwrite(path, rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8))
    return path


def _nifti(path: Path, shape: tuple[int, int, int] = (20, 24, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    voxels = np.random.default_rng(_seed(path)).integers(-1000, 1000, shape, dtype=np.int16)
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), path)
    return path


def make_cohort(root: Path) -> Path:
    """Two patients; P1 has OM (jpg), IM (png), TEM (tif), CT (nii.gz); P2 has OM, IM, 2 TEM."""
    images = [
        {"patient_id": "P1", "modality": "OM", "path": str(_rgb(root / "om" / "p1_om.jpg"))},
        {"patient_id": "P1", "modality": "IM", "path": "im/p1_im.png"},
        {"patient_id": "P1", "modality": "TEM", "path": "tem/p1_tem.tif"},
        {"patient_id": "P1", "modality": "CT", "path": "ct/p1_ct.nii.gz"},
        {"patient_id": "P2", "modality": "OM", "path": "om/p2_om.tiff"},
        {"patient_id": "P2", "modality": "IM", "path": "im/p2_im.png"},
        {"patient_id": "P2", "modality": "TEM", "path": "tem/p2_tem_b.tif"},
        {"patient_id": "P2", "modality": "tem", "path": "tem/p2_tem_a.tif"},
    ]
    _rgb(root / "im" / "p1_im.png", (40, 36))
    _gray_tiff(root / "tem" / "p1_tem.tif")
    _nifti(root / "ct" / "p1_ct.nii.gz")
    _rgb(root / "om" / "p2_om.tiff", (50, 60))
    _rgb(root / "im" / "p2_im.png")
    _gray_tiff(root / "tem" / "p2_tem_b.tif", (33, 80))
    _gray_tiff(root / "tem" / "p2_tem_a.tif")
    _write_tsv(CLINICAL, root / "clinical.tsv")
    _write_tsv(images, root / "images.tsv")
    return root


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    return make_cohort(tmp_path / "cohort")


def _edit_tsv(path: Path, edit) -> None:
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    _write_tsv(edit(table).to_dict("records"), path, columns=None)


def _error(**kwargs) -> str:
    kwargs.setdefault("rules", RULES)
    with pytest.raises(ManifestError) as info:
        build_manifest(**kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- valid cohort


def test_valid_cohort_columns_rows_and_checksums(cohort: Path) -> None:
    frame = build_manifest(cohort_root=cohort, rules=RULES)
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    assert len(frame) == 8
    assert list(zip(frame["patient_id"], frame["modality"], strict=True)) == [
        ("P1", "CT"),
        ("P1", "IM"),
        ("P1", "OM"),
        ("P1", "TEM"),
        ("P2", "IM"),
        ("P2", "OM"),
        ("P2", "TEM"),
        ("P2", "TEM"),
    ]
    p2_tem = frame[(frame["patient_id"] == "P2") & (frame["modality"] == "TEM")]
    assert list(p2_tem["image_id"]) == ["tem/p2_tem_a", "tem/p2_tem_b"]  # sorted by path
    assert frame.loc[frame["modality"] == "CT", "image_id"].item() == "ct/p1_ct"
    for row in frame.itertuples():
        assert Path(row.path).is_absolute()
        assert row.path == os.path.abspath(row.path)  # normalised (links are not followed)
        assert row.sha256 == hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
    sizes = {row.image_id: (row.width_px, row.height_px) for row in frame.itertuples()}
    assert sizes["om/p1_om"] == (48, 40)
    assert sizes["im/p1_im"] == (40, 36)
    assert sizes["tem/p1_tem"] == (64, 50)
    assert sizes["ct/p1_ct"] == (20, 24)
    assert sizes["om/p2_om"] == (50, 60)
    assert sizes["tem/p2_tem_b"] == (33, 80)
    p1 = frame[frame["patient_id"] == "P1"].iloc[0]
    assert (p1["disease"], p1["mn_stage"], p1["survival_months"], p1["event"]) == (
        "IgAN",
        "",
        30.0,
        0,
    )
    p2 = frame[frame["patient_id"] == "P2"].iloc[0]
    assert (p2["disease"], p2["mn_stage"], p2["survival_months"], p2["event"]) == (
        "MN",
        "II",
        12.5,
        1,
    )


def test_write_and_read_round_trip_keeps_dtypes(cohort: Path, tmp_path: Path) -> None:
    frame = build_manifest(cohort_root=cohort, rules=RULES, progress=True)
    out = write_manifest(frame, tmp_path / "out" / "manifest.tsv")
    assert out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name != "manifest.tsv"]  # no temp left
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, frame)
    assert back["mn_stage"].tolist().count("") == 4
    assert back["event"].dtype == "Int64" and back["width_px"].dtype == "int64"


def test_optional_clinical_columns_may_be_absent(cohort: Path) -> None:
    _edit_tsv(cohort / "clinical.tsv", lambda t: t[["patient_id", "disease"]])
    frame = build_manifest(cohort_root=cohort, rules=RULES)
    assert set(frame["mn_stage"]) == {""}
    assert frame["survival_months"].isna().all() and frame["event"].isna().all()


def test_user_manifest_equals_cohort_folder(cohort: Path, tmp_path: Path) -> None:
    images = pd.read_csv(cohort / "images.tsv", sep="\t", dtype=str, keep_default_na=False)
    clinical = pd.read_csv(cohort / "clinical.tsv", sep="\t", dtype=str, keep_default_na=False)
    user = images.merge(clinical, on="patient_id")
    # relative paths are relative to the manifest's folder, which here is the cohort root
    manifest_tsv = _write_tsv(user.to_dict("records"), cohort / "my_manifest.tsv")
    from_user = build_manifest(manifest_tsv=manifest_tsv, rules=RULES)
    from_folder = build_manifest(cohort_root=cohort, rules=RULES)
    pd.testing.assert_frame_equal(from_user, from_folder)


def test_exactly_one_source_is_required(cohort: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_manifest(rules=RULES)
    with pytest.raises(ValueError, match="exactly one"):
        build_manifest(cohort_root=cohort, manifest_tsv=cohort / "images.tsv", rules=RULES)


# --------------------------------------------------------------------------- bad tables


@pytest.mark.parametrize("name", ["clinical.tsv", "images.tsv"])
def test_missing_table(cohort: Path, name: str) -> None:
    (cohort / name).unlink()
    message = _error(cohort_root=cohort)
    assert name in message and "not found" in message


def test_missing_user_manifest(tmp_path: Path) -> None:
    message = _error(manifest_tsv=tmp_path / "nope.tsv")
    assert "nope.tsv" in message and "not found" in message


def test_unreadable_table(cohort: Path) -> None:
    (cohort / "images.tsv").write_bytes(b"patient_id\tmodality\tpath\n\xff\xfe\x00bad\t\t\n")
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "cannot be read" in message


def test_table_lacking_columns_names_missing_and_present(cohort: Path) -> None:
    _edit_tsv(cohort / "images.tsv", lambda t: t.rename(columns={"path": "file"}))
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "lacks required columns ['path']" in message
    assert "present columns: ['patient_id', 'modality', 'file']" in message


def test_user_manifest_lacking_columns(cohort: Path, tmp_path: Path) -> None:
    tsv = _write_tsv([{"patient_id": "P1", "path": "x.png"}], tmp_path / "user.tsv")
    message = _error(manifest_tsv=tsv)
    assert "user.tsv" in message and "'modality'" in message and "'disease'" in message


# --------------------------------------------------------------------------- bad content


def test_missing_image_files_are_all_listed(cohort: Path) -> None:
    (cohort / "im" / "p1_im.png").unlink()
    (cohort / "tem" / "p2_tem_a.tif").unlink()
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "not found (2)" in message
    assert "p1_im.png (patient 'P1'" in message and "p2_tem_a.tif (patient 'P2'" in message


def test_undecodable_image_names_path_and_patient(cohort: Path) -> None:
    (cohort / "im" / "p2_im.png").write_bytes(b"not a png at all")
    data = (cohort / "om" / "p1_om.jpg").read_bytes()
    (cohort / "om" / "p1_om.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "cannot be decoded (2)" in message
    assert "patient 'P2'" in message and "p2_im.png" in message
    assert "patient 'P1'" in message and "p1_om.jpg" in message


def test_patient_missing_required_modality(cohort: Path) -> None:
    _edit_tsv(cohort / "images.tsv", lambda t: t[~t["modality"].str.upper().eq("TEM")])
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "missing a required modality" in message
    assert "patient 'P1' has no image of required modality TEM" in message
    assert "patient 'P2' has no image of required modality TEM" in message


def test_duplicate_patient_ids_in_clinical(cohort: Path) -> None:
    _write_tsv([*CLINICAL, CLINICAL[0]], cohort / "clinical.tsv")
    message = _error(cohort_root=cohort)
    assert "clinical.tsv" in message and "duplicate patient ids" in message
    assert "'P2' on rows [2, 4]" in message


def test_duplicate_image_paths(cohort: Path) -> None:
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, t.iloc[[1]]]))
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "duplicate image paths" in message
    assert "p1_im.png on rows [3, 10]" in message


def test_image_ids_keep_the_folder_below_the_root(cohort: Path) -> None:
    _rgb(cohort / "other" / "p1_im.png")
    extra = {"patient_id": "P2", "modality": "IM", "path": "other/p1_im.png"}
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, pd.DataFrame([extra])]))
    frame = build_manifest(cohort_root=cohort, rules=RULES)
    assert {"im/p1_im", "other/p1_im"} <= set(frame["image_id"])


def test_duplicate_image_ids(cohort: Path) -> None:
    # ids are paths below the cohort folder, so only a file outside it can clash by stem
    for folder in ("elsewhere", "elsewhere_too"):
        _rgb(cohort.parent / folder / "p1_im.png")
    extra = [
        {"patient_id": "P2", "modality": "IM", "path": str(cohort.parent / folder / "p1_im.png")}
        for folder in ("elsewhere", "elsewhere_too")
    ]
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, pd.DataFrame(extra)]))
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "duplicate image ids" in message
    assert "p1_im on rows [10, 11] (patients ['P2'])" in message


def test_inconsistent_labels_in_user_manifest(cohort: Path, tmp_path: Path) -> None:
    images = pd.read_csv(cohort / "images.tsv", sep="\t", dtype=str, keep_default_na=False)
    user = images.merge(pd.DataFrame(CLINICAL), on="patient_id")
    user.loc[user.index[user["patient_id"] == "P2"][0], "mn_stage"] = "III"
    tsv = _write_tsv(user.to_dict("records"), cohort / "user.tsv")
    message = _error(manifest_tsv=tsv)
    assert "user.tsv" in message and "inconsistent labels" in message
    assert "patient 'P2': mn_stage takes values ['II', 'III']" in message


def test_disease_outside_classes(cohort: Path) -> None:
    _write_tsv([CLINICAL[0], {**CLINICAL[1], "disease": "FSGS"}], cohort / "clinical.tsv")
    message = _error(cohort_root=cohort)
    assert "clinical.tsv" in message and "'FSGS'" in message and "patient 'P1'" in message
    assert "allowed classes ['IgAN', 'MN', 'LN']" in message


def test_stage_outside_stages(cohort: Path) -> None:
    _write_tsv([{**CLINICAL[0], "mn_stage": "IV"}, CLINICAL[1]], cohort / "clinical.tsv")
    message = _error(cohort_root=cohort)
    assert "clinical.tsv" in message and "mn_stage 'IV'" in message and "patient 'P2'" in message
    assert "allowed stages ['I', 'II', 'III']" in message


def test_malformed_survival_values(cohort: Path) -> None:
    _write_tsv([{**CLINICAL[0], "event": "yes"}, CLINICAL[1]], cohort / "clinical.tsv")
    message = _error(cohort_root=cohort)
    assert "clinical.tsv" in message and "event 'yes' is not 0 or 1" in message


def test_images_of_unknown_patients(cohort: Path) -> None:
    extra = {"patient_id": "P9", "modality": "OM", "path": "om/p1_om.jpg"}
    _edit_tsv(cohort / "images.tsv", lambda t: pd.concat([t, pd.DataFrame([extra])]))
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "not in the clinical table" in message
    assert "patient 'P9' (rows [10])" in message


def test_unknown_modality(cohort: Path) -> None:
    _edit_tsv(cohort / "images.tsv", lambda t: t.replace({"modality": {"IM": "XRAY"}}))
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "modality 'XRAY'" in message


def test_images_smaller_than_minimum(cohort: Path) -> None:
    rules = ManifestRules(
        classes=RULES.classes,
        stages=RULES.stages,
        required_modalities=RULES.required_modalities,
        min_image_px={"TEM": 40, "CT": 21},
    )
    message = _error(cohort_root=cohort, rules=rules)
    assert "images.tsv" in message and "smaller than the minimum" in message
    assert "p2_tem_b.tif" in message and "33x80 px" in message and "minimum 40 px" in message
    assert "p1_ct.nii.gz" in message and "20x24 px" in message and "minimum 21 px" in message
    assert "p1_tem.tif" not in message


def test_error_lists_at_most_twenty(cohort: Path) -> None:
    rows = [{"patient_id": "P1", "modality": "OM", "path": f"gone/{i}.png"} for i in range(25)]
    _write_tsv(rows, cohort / "images.tsv")
    message = _error(cohort_root=cohort, rules=ManifestRules(classes=RULES.classes, stages=("II",)))
    assert "not found (25)" in message and "... and 5 more" in message
    assert message.count("gone/") == 20


# --------------------------------------------------------------------------- image readers


def test_image_stem() -> None:
    assert image_stem("/a/b/ct_01.nii.gz") == "ct_01"
    assert image_stem("/a/b/x.ome.tif") == "x"
    assert image_stem("/a/b/slide.svs") == "slide"
    assert image_stem("/a/series_folder") == "series_folder"


def test_read_image_size_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_image_size(tmp_path / "missing.png")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="bad.nii.gz"):
        read_image_size(bad, modality="CT")


def _real(*parts: str) -> Path:
    path = REAL_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample data not available at {path}")
    return path


def test_real_dicom_size() -> None:
    assert read_image_size(_real("radiology", "CT_small.dcm"), modality="CT") == (128, 128)


def test_real_dicom_series_folder_size() -> None:
    folder = _real("radiology", "ct_series_siemens_biograph40")
    import pydicom

    first = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    assert read_image_size(folder, modality="CT") == (first.Columns, first.Rows)


def test_real_nifti_size() -> None:
    path = _real("radiology", "example_ct_sm.nii.gz")
    assert read_image_size(path, modality="CT") == (122, 101)  # shape (122, 101, 30)


def test_real_svs_size() -> None:
    path = _real("wsi", "CMU-1-Small-Region.svs")
    assert read_image_size(path, modality="WSI") == (2220, 2967)


def test_real_files_in_a_user_manifest(tmp_path: Path) -> None:
    """Absolute paths to the real files, checksummed in place (never copied)."""
    dcm = _real("radiology", "CT_small.dcm")
    svs = _real("wsi", "CMU-1-Small-Region.svs")
    rows = [
        {"patient_id": "R1", "modality": "CT", "path": str(dcm), "disease": "MN"},
        {"patient_id": "R1", "modality": "WSI", "path": str(svs), "disease": "MN"},
    ]
    tsv = _write_tsv(rows, tmp_path / "real.tsv")
    rules = ManifestRules(classes=("MN",), min_image_px={"WSI": 2000, "CT": 64})
    frame = build_manifest(manifest_tsv=tsv, rules=rules)
    assert frame["modality"].tolist() == ["CT", "WSI"]
    assert frame["image_id"].tolist() == ["CT_small", "CMU-1-Small-Region"]
    assert frame[["width_px", "height_px"]].values.tolist() == [[128, 128], [2220, 2967]]
    assert frame["sha256"].tolist() == [
        hashlib.sha256(dcm.read_bytes()).hexdigest(),
        hashlib.sha256(svs.read_bytes()).hexdigest(),
    ]


def test_optional_mpp_column_is_carried_and_checked(cohort: Path) -> None:
    _edit_tsv(cohort / "images.tsv", lambda t: t.assign(mpp=["0.25"] + [""] * (len(t) - 1)))
    frame = build_manifest(cohort_root=cohort, rules=RULES)
    assert frame["mpp"].notna().sum() == 1 and frame["mpp"].max() == 0.25
    _edit_tsv(cohort / "images.tsv", lambda t: t.assign(mpp=["-1"] + [""] * (len(t) - 1)))
    message = _error(cohort_root=cohort)
    assert "images.tsv" in message and "mpp '-1' is not a positive number" in message
