"""Tests for the synthetic demo cohort (mmdiag.synth)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
from PIL import Image

from mmdiag.io.atomic import sha256_file
from mmdiag.synth import renal, volumes, write_synthetic_cohort

TINY = {
    "seed": 7,
    "n_patients": 9,
    "om_size_px": [96, 64],
    "im_size_px": [80, 72],
    "tem_size_px": 64,
    "tem_legend_px": 6,
    "tem_per_patient": [2, 4],
    "modality_reliability": {"OM": 0.6, "IM": 0.75, "TEM": 0.65},
    "wsi": {
        "n_patients": 2,
        "width_px": 1024,
        "height_px": 768,
        "mpp": 0.5,
        "objective_power": 20,
        "n_levels": 3,
        "downsample": 4,
        "tile_px": 256,
        "jpeg_quality": 85,
    },
    "ct": {"n_patients": 2, "shape_vox": [40, 36, 16], "spacing_mm": [0.8, 0.9, 2.5]},
    "genes": {"n_genes": 30, "tumour_set_size": 5, "microenvironment_set_size": 8},
}


def tiny_settings(**changes) -> dict:
    settings = copy.deepcopy(TINY)
    settings.update(changes)
    return settings


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "cohort"
    assert write_synthetic_cohort(root, tiny_settings(), progress=False) == root
    return root


def _images(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "images.tsv", sep="\t")


def _clinical(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "clinical.tsv", sep="\t", keep_default_na=False)


def _paths(root: Path, modality: str) -> list[Path]:
    images = _images(root)
    return [root / p for p in images.loc[images["modality"] == modality, "path"]]


# --- layout and tables ------------------------------------------------------------------


def test_layout_tables_and_counts(cohort):
    clinical = _clinical(cohort)
    images = _images(cohort)
    assert list(clinical.columns) == [
        "patient_id",
        "disease",
        "mn_stage",
        "survival_months",
        "event",
    ]
    assert list(images.columns) == ["patient_id", "modality", "path"]
    assert list(clinical["patient_id"]) == [f"P{i:03d}" for i in range(1, 10)]
    assert clinical["disease"].value_counts().to_dict() == {"IgAN": 3, "MN": 3, "LN": 3}

    is_mn = clinical["disease"] == "MN"
    assert set(clinical.loc[is_mn, "mn_stage"]) <= {"I", "II", "III"}
    assert (clinical.loc[~is_mn, "mn_stage"] == "").all()
    assert (clinical["survival_months"] > 0).all()
    assert set(clinical["event"]) <= {0, 1}

    assert set(images["patient_id"]) == set(clinical["patient_id"])
    assert all((cohort / p).is_file() for p in images["path"])
    assert not any(Path(p).is_absolute() for p in images["path"])
    per_patient = images.groupby(["patient_id", "modality"]).size().unstack(fill_value=0)
    assert (per_patient["OM"] == 1).all() and (per_patient["IM"] == 1).all()
    assert per_patient["TEM"].between(2, 4).all()
    assert list(per_patient.index[per_patient["WSI"] == 1]) == ["P001", "P002"]
    assert list(per_patient.index[per_patient["CT"] == 1]) == ["P001", "P002"]
    assert per_patient["WSI"].sum() == 2 and per_patient["CT"].sum() == 2
    assert sorted(images.loc[images["modality"] == "TEM", "path"])[0] == "tem/P001_01.tif"


def test_genes_and_provenance(cohort):
    expression = pd.read_csv(cohort / "genes" / "expression.tsv", sep="\t")
    assert expression.columns[0] == "patient_id"
    assert list(expression.columns[1:]) == [f"GENE{i:04d}" for i in range(1, 31)]
    assert list(expression["patient_id"]) == list(_clinical(cohort)["patient_id"])
    assert np.isfinite(expression.iloc[:, 1:].to_numpy(float)).all()

    lines = (cohort / "genes" / "gene_sets.gmt").read_text().splitlines()
    sets = {line.split("\t")[0]: line.split("\t")[2:] for line in lines}
    assert set(sets) == {"tumour", "microenvironment"}
    assert len(sets["tumour"]) == 5 and len(sets["microenvironment"]) == 8
    assert not set(sets["tumour"]) & set(sets["microenvironment"])
    assert set(sets["tumour"]) <= set(expression.columns)

    provenance = json.loads((cohort / "cohort.json").read_text())
    assert provenance["seed"] == 7
    assert provenance["settings"] == TINY
    assert provenance["mmdiag_version"]
    assert {"IM", "TEM", "OM", "reliability"} <= set(provenance["planted_signal"])
    assert len(provenance["patients"]) == 9


# --- formats ----------------------------------------------------------------------------


def test_om_and_im_are_rgb_jpegs_of_configured_size(cohort):
    for modality, size in (("OM", (96, 64)), ("IM", (80, 72))):
        for path in _paths(cohort, modality):
            with Image.open(path) as image:
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == size
    im = np.asarray(Image.open(_paths(cohort, "IM")[0]), dtype=float)
    assert im.mean() < 80  # dark fluorescence background
    assert im[..., 1].max() > 150 and im[..., 1].mean() > im[..., 0].mean()  # green stain


def test_tem_geometry_and_legend(cohort):
    for path in _paths(cohort, "TEM"):
        tem = tifffile.imread(path)
        assert tem.dtype == np.uint8 and tem.shape == (64, 64)
        legend, field = tem[-6:], tem[:-6]
        legend_pure = np.isin(legend, (0, 255)).mean()
        field_pure = np.isin(field, (0, 255)).mean()
        assert legend_pure > 0.95 and field_pure < 0.01
        assert (legend == 255).mean() > 0.5  # white band
        assert (legend == 0).sum() >= 8  # scale bar and marks
    with tifffile.TiffFile(_paths(cohort, "TEM")[0]) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK


def test_tem_legend_rows_follow_setting():
    tem = renal.render_tem(np.random.default_rng(0), "MN", 128, 20, mn_stage="III")
    assert tem.shape == (128, 128)
    assert np.isin(tem[-20:], (0, 255)).mean() > 0.95
    assert np.isin(tem[-21], (0, 255)).mean() < 0.2


def test_svs_opens_in_openslide(cohort):
    path = _paths(cohort, "WSI")[0]
    with openslide.OpenSlide(path) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert slide.level_count == 3
        assert slide.level_dimensions == ((1024, 768), (256, 192), (64, 48))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.5)
        assert float(props["openslide.objective-power"]) == pytest.approx(20)
        low = np.asarray(slide.read_region((0, 0), 2, (64, 48)).convert("RGB"), dtype=float)
        corner = np.asarray(slide.read_region((0, 0), 0, (32, 32)).convert("RGB"), dtype=float)
    assert corner.min() > 225  # white glass at the corner
    tissue = low.mean(axis=-1) < 220
    assert 0.05 < tissue.mean() < 0.9
    assert (low[tissue][:, 0] > low[tissue][:, 1]).mean() > 0.9  # pink/purple, not grey


def test_svs_levels_are_area_averaged(cohort):
    path = _paths(cohort, "WSI")[0]
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].description.startswith("Aperio Image Library")
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1]
        level0, level1 = tif.pages[0].asarray().astype(float), tif.pages[1].asarray()
    averaged = level0.reshape(192, 4, 256, 4, 3).mean(axis=(1, 3))
    assert np.abs(averaged - level1).mean() < 6  # JPEG error only


def test_ct_nifti_spacing_dtype_and_lesion(cohort):
    path = _paths(cohort, "CT")[0]
    image = nib.load(path)
    assert image.header.get_zooms() == pytest.approx((0.8, 0.9, 2.5))
    assert image.shape == (40, 36, 16)
    volume = np.asanyarray(image.dataobj)
    assert volume.dtype == np.int16
    assert volume[0, 0, 0] < -900  # air at the corner
    assert np.median(volume[volume > -500]) == pytest.approx(40, abs=20)


def test_ct_lesion_brighter_than_surrounding_tissue():
    for disease in renal.DISEASES:
        hu, lesion = volumes.render_ct(
            np.random.default_rng(3), (48, 48, 20), (0.8, 0.8, 2.5), disease=disease
        )
        assert hu.dtype == np.int16 and lesion.any()
        tissue = (hu > -50) & ~lesion
        assert hu[lesion].mean() > hu[tissue].mean() + 60


# --- determinism and atomicity --------------------------------------------------------


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_files(cohort, tmp_path):
    again = write_synthetic_cohort(tmp_path / "again", tiny_settings(), progress=False)
    assert _digests(again) == _digests(cohort)


def test_different_seed_gives_different_files(cohort, tmp_path):
    other = write_synthetic_cohort(tmp_path / "other", tiny_settings(seed=8), progress=False)
    first, second = _digests(cohort), _digests(other)
    for relative in ("om/P001.jpg", "im/P001.jpg", "wsi/P001.svs", "ct/P001.nii.gz"):
        assert first[relative] != second[relative]
    assert first["genes/expression.tsv"] != second["genes/expression.tsv"]


def test_failure_midway_leaves_no_cohort(tmp_path, monkeypatch):
    calls = []

    def failing_render_tem(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("renderer crashed")
        return original(*args, **kwargs)

    original = renal.render_tem
    monkeypatch.setattr(renal, "render_tem", failing_render_tem)
    root = tmp_path / "cohort"
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_synthetic_cohort(root, tiny_settings(), progress=False)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_logs_one_line_summary(tmp_path, caplog):
    settings = tiny_settings(n_patients=3, wsi={**TINY["wsi"], "n_patients": 0})
    settings["ct"] = {**TINY["ct"], "n_patients": 0}
    with caplog.at_level(logging.INFO, logger="mmdiag.synth"):
        write_synthetic_cohort(tmp_path / "small", settings, progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("mmdiag.synth")]
    assert len(messages) == 1 and "3 patients" in messages[0]
    assert not list((tmp_path / "small" / "wsi").glob("*.svs"))


# --- the planted class signal -------------------------------------------------------------


def _nearest_centroid_loo_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    features = (features - features.mean(0)) / (features.std(0) + 1e-9)
    hits = 0
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        classes = np.unique(labels[keep])
        centroids = np.array([features[keep & (labels == c)].mean(0) for c in classes])
        hits += classes[np.argmin(((centroids - features[i]) ** 2).sum(1))] == labels[i]
    return hits / len(labels)


def _im_features(path: Path) -> list[float]:
    green = np.asarray(Image.open(path), dtype=float)[..., 1]
    weight = np.clip(green - 90.0, 0, None)
    yy, xx = np.mgrid[: green.shape[0], : green.shape[1]]
    total = weight.sum() + 1e-9
    cy, cx = (weight * yy).sum() / total, (weight * xx).sum() / total
    spread = np.sqrt((weight * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum() / total)
    return [spread / green.shape[0], total / green.size]


def _tem_features(paths: list[Path], legend_px: int) -> list[float]:
    rows, fractions = [], []
    for path in paths:
        field = tifffile.imread(path)[:-legend_px].astype(float)
        dark = field < 55
        fractions.append(dark.mean())
        if dark.any():
            rows.append(np.nonzero(dark)[0].mean() / field.shape[0])
    return [np.mean(rows) if rows else 0.5, np.mean(fractions)]


@pytest.fixture(scope="module")
def reliable_cohort(tmp_path_factory) -> Path:
    settings = tiny_settings(
        seed=11,
        n_patients=30,
        im_size_px=[128, 96],
        tem_size_px=96,
        tem_legend_px=8,
        tem_per_patient=[4, 6],
        modality_reliability={"OM": 1.0, "IM": 1.0, "TEM": 1.0},
        wsi={**TINY["wsi"], "n_patients": 0},
        ct={**TINY["ct"], "n_patients": 0},
    )
    root = tmp_path_factory.mktemp("reliable") / "cohort"
    return write_synthetic_cohort(root, settings, progress=False)


def test_reliability_one_shows_true_patterns(reliable_cohort):
    provenance = json.loads((reliable_cohort / "cohort.json").read_text())
    for patient in provenance["patients"]:
        assert set(patient["shown_pattern"].values()) == {patient["disease"]}


def test_unreliable_modalities_show_other_classes():
    rng = np.random.default_rng(0)
    shown = [renal.draw_shown_pattern(rng, "MN", 0.6) for _ in range(2000)]
    assert np.mean([s == "MN" for s in shown]) == pytest.approx(0.6, abs=0.04)
    assert {"IgAN", "LN"} <= set(shown)


def test_im_signal_separates_classes(reliable_cohort):
    clinical = _clinical(reliable_cohort)
    features = np.array(
        [_im_features(reliable_cohort / "im" / f"{pid}.jpg") for pid in clinical["patient_id"]]
    )
    labels = clinical["disease"].to_numpy()
    spread = {d: features[labels == d, 0].mean() for d in renal.DISEASES}
    assert spread["IgAN"] < spread["LN"] < spread["MN"]  # centre blobs vs capillary rings
    assert _nearest_centroid_loo_accuracy(features, labels) >= 0.75


def test_tem_signal_separates_classes(reliable_cohort):
    images = _images(reliable_cohort)
    clinical = _clinical(reliable_cohort)
    tem = images[images["modality"] == "TEM"]
    features = np.array(
        [
            _tem_features(
                [reliable_cohort / p for p in tem.loc[tem["patient_id"] == pid, "path"]], 8
            )
            for pid in clinical["patient_id"]
        ]
    )
    labels = clinical["disease"].to_numpy()
    row = {d: features[labels == d, 0].mean() for d in renal.DISEASES}
    assert row["MN"] < row["LN"] < row["IgAN"]  # subepithelial (upper) vs mesangial (lower)
    assert _nearest_centroid_loo_accuracy(features, labels) >= 0.75


def test_om_signal_differs_between_classes():
    centre_darkness, magenta = {}, {}
    for pattern in renal.DISEASES:
        dark, pink = [], []
        for seed in range(12):
            # render_om draws its glomerulus first, so the same seed gives the same geometry.
            glom = renal.random_glomerulus(np.random.default_rng(seed), 192, 128)
            om = renal.render_om(np.random.default_rng(seed), pattern, 192, 128).astype(float)
            yy, xx = np.mgrid[:128, :192]
            centre = np.hypot(yy - glom.centre_y, xx - glom.centre_x) < 0.3 * glom.radius_px
            dark.append((om.mean(-1)[centre] < 100).mean())
            pink.append(((om[..., 0] - om[..., 1]) > 80).mean())
        centre_darkness[pattern], magenta[pattern] = np.mean(dark), np.mean(pink)
    assert centre_darkness["IgAN"] > 1.5 * max(centre_darkness["MN"], centre_darkness["LN"])
    assert magenta["LN"] > 2 * max(magenta["IgAN"], magenta["MN"])  # wire loops
