"""The synthetic RadPath-like cohort: a valid MR + WSI manifest, balanced classes, four MR
sequences per patient on one grid, the planted signal measured from the files (strong on the
slides, weak on the MR, absent at the knobs' no-signal values), and byte-identical files for
one seed."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from mmdiag.config import load_config, validate_config
from mmdiag.data import ManifestRules, build_manifest
from mmdiag.synth import radpath, write_configured_cohort
from mmdiag.synth.mr import SEQUENCES
from mmdiag.synth.radpath import CLASSES, RadPathSettings, write_radpath_cohort
from mmdiag.volumes import read_volume

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = RadPathSettings()
TINY = {"n_patients": 3, "slide_px": 256}
NO_SIGNAL = 1.0 / len(CLASSES)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The default demo cohort (60 patients)."""
    return write_radpath_cohort(tmp_path_factory.mktemp("radpath") / "cohort", DEFAULT)


@pytest.fixture(scope="module")
def provenance(cohort) -> dict:
    return json.loads((cohort / "cohort.json").read_text())


@pytest.fixture(scope="module")
def features(cohort, provenance) -> pd.DataFrame:
    """Per patient: class, shown patterns, slide nuclear fraction and MR lesion features."""
    rows = []
    for patient in provenance["patients"]:
        pid = patient["patient_id"]
        row = {key: patient[key] for key in ("disease", "wsi_pattern", "mr_pattern")}
        row["nuclear_fraction"] = _nuclear_fraction(cohort / "wsi" / f"{pid}.svs")
        row.update(_mr_features(cohort, pid))
        rows.append(row)
    return pd.DataFrame(rows)


def _table(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, sep="\t", dtype={"patient_id": str})


def _nuclear_fraction(path: Path) -> float:
    """Fraction of tissue pixels (not white glass) that are dark-purple nuclei, at level 0."""
    return _pixel_nuclear_fraction(tifffile.TiffFile(path).pages[0].asarray())


def _pixel_nuclear_fraction(pixels: np.ndarray) -> float:
    pixels = pixels.astype(np.float32)
    tissue = pixels.mean(axis=-1) < 235
    return float((tissue & (pixels[..., 0] < 170)).sum() / tissue.sum())


def _mr_features(root: Path, pid: str) -> dict[str, float]:
    """Lesion mean T1ce, the same relative to the brain's, and the lesion volume (voxels)."""
    t1ce = read_volume(root / "mr" / f"{pid}_t1ce.nii.gz").voxels
    mask = read_volume(root / "mr" / f"{pid}_mask.nii.gz").voxels > 0
    return _lesion_features(t1ce, mask)


def _lesion_features(t1ce: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    lesion = float(t1ce[mask].mean())
    brain = (t1ce > 0.35 * np.percentile(t1ce, 99)) & ~mask
    return {
        "lesion_t1ce": lesion,
        "t1ce_ratio": lesion / float(t1ce[brain].mean()),
        "lesion_vox": float(mask.sum()),
    }


def _ncm_balanced_accuracy(x, labels) -> float:
    """Leave-one-out nearest-class-mean balanced accuracy of features ``x`` (n, d) or (n,)."""
    x = np.asarray(x, float).reshape(len(labels), -1)
    labels = np.asarray(labels)
    predicted = []
    for i in range(len(labels)):
        rest = np.arange(len(labels)) != i
        means = {c: x[rest & (labels == c)].mean(axis=0) for c in CLASSES}
        predicted.append(min(means, key=lambda c: float(np.sum((x[i] - means[c]) ** 2))))
    predicted = np.asarray(predicted)
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in CLASSES]))


def _standardised(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    values = frame[columns].to_numpy(float)
    return (values - values.mean(axis=0)) / values.std(axis=0)


def test_layout_passes_the_manifest(cohort):
    images = _table(cohort, "images.tsv")
    clinical = _table(cohort, "clinical.tsv")
    pids = [f"RP{i:03d}" for i in range(1, 61)]
    assert list(clinical.columns) == ["patient_id", "disease"]
    assert clinical["patient_id"].tolist() == pids
    assert Counter(images["modality"]) == {"MR": 240, "WSI": 60}
    expected = {f"mr/{pid}_{name}.nii.gz" for pid in pids for name in SEQUENCES}
    assert set(images.loc[images["modality"] == "MR", "path"]) == expected
    assert set(images.loc[images["modality"] == "WSI", "path"]) == {f"wsi/{p}.svs" for p in pids}
    assert not images["path"].str.contains("mask").any()
    assert all((cohort / "mr" / f"{pid}_mask.nii.gz").is_file() for pid in pids)
    on_disk = {p.relative_to(cohort).as_posix() for p in cohort.rglob("*") if p.is_file()}
    assert set(images["path"]) <= on_disk

    manifest = build_manifest(cohort_root=cohort, rules=radpath.manifest_rules())
    assert len(manifest) == 300 and set(manifest["disease"]) == set(CLASSES)
    rules = ManifestRules.from_config(
        {
            "classes": list(CLASSES),
            "stages": [],
            "required_modalities": ["MR", "WSI"],
            "min_image_px": {"MR": 32, "WSI": 1024},
        }
    )
    assert len(build_manifest(cohort_root=cohort, rules=rules)) == 300


def test_classes_are_balanced_round_robin(cohort):
    assert Counter(_table(cohort, "clinical.tsv")["disease"]) == dict.fromkeys(CLASSES, 20)
    counts = Counter(radpath.plan_classes(RadPathSettings(n_patients=61)))
    assert set(counts) == set(CLASSES) and max(counts.values()) - min(counts.values()) == 1
    assert radpath.plan_classes(RadPathSettings(seed=1)) != radpath.plan_classes(
        RadPathSettings(seed=2)
    )


def test_mr_reads_back_as_four_sequences_on_one_grid(cohort):
    images = _table(cohort, "images.tsv").query("modality == 'MR'")
    shape = tuple(reversed(DEFAULT.mr_shape_vox))  # read_volume gives (z, y, x)
    spacing = tuple(reversed(DEFAULT.mr_spacing_mm))
    for pid, rows in images.groupby("patient_id"):
        suffixes = sorted(Path(p).name.removeprefix(f"{pid}_") for p in rows["path"])
        assert suffixes == sorted(f"{name}.nii.gz" for name in SEQUENCES)
        volumes = {name: read_volume(cohort / "mr" / f"{pid}_{name}.nii.gz") for name in SEQUENCES}
        mask = read_volume(cohort / "mr" / f"{pid}_mask.nii.gz")
        for volume in (*volumes.values(), mask):
            assert volume.voxels.shape == shape
            assert volume.spacing_mm == pytest.approx(spacing)
            np.testing.assert_allclose(volume.affine, mask.affine)
        lesion = mask.voxels > 0
        assert lesion.sum() >= 4
        # lesion dark on T1, enhancing on T1ce, bright on FLAIR
        t1, t1ce, flair = (volumes[n].voxels for n in ("t1", "t1ce", "flair"))
        assert t1ce[lesion].mean() > 1.5 * t1[lesion].mean()
        assert flair[lesion].mean() > np.median(flair[flair > 100])


def test_provenance_records_the_patterns_the_images_show(cohort, provenance, features):
    clinical = _table(cohort, "clinical.tsv")
    assert provenance["classes"] == list(CLASSES)
    assert provenance["settings"] == json.loads(json.dumps(dataclasses.asdict(DEFAULT)))
    assert set(provenance["planted_signal"]["description"]) == {"MR", "WSI"}
    assert [p["patient_id"] for p in provenance["patients"]] == clinical["patient_id"].tolist()
    assert features["disease"].tolist() == clinical["disease"].tolist()
    wsi_agree = (features["wsi_pattern"] == features["disease"]).mean()
    mr_agree = (features["mr_pattern"] == features["disease"]).mean()
    assert 0.8 <= wsi_agree <= 1.0 and 0.45 <= mr_agree <= 0.75, (wsi_agree, mr_agree)
    # the images follow the recorded patterns, not the class
    log_fraction = np.log(features["nuclear_fraction"])
    assert _ncm_balanced_accuracy(log_fraction, features["wsi_pattern"]) > 0.95
    mr = _standardised(features, ["t1ce_ratio", "lesion_vox"])
    assert _ncm_balanced_accuracy(mr, features["mr_pattern"]) > 0.85


def test_slides_show_the_class_strongly_and_the_mr_weakly(features):
    """Balanced accuracy of leave-one-out nearest class means against the patient's class."""
    wsi = _ncm_balanced_accuracy(np.log(features["nuclear_fraction"]), features["disease"])
    mr_simple = _ncm_balanced_accuracy(features["lesion_t1ce"], features["disease"])
    mr_normalised = _ncm_balanced_accuracy(
        _standardised(features, ["t1ce_ratio", "lesion_vox"]), features["disease"]
    )
    assert wsi >= 0.8, wsi
    assert mr_simple <= 0.7, mr_simple
    assert 0.45 <= mr_normalised <= 0.75, mr_normalised
    assert wsi > mr_normalised + 0.15
    # each slide class pattern has its own nuclear fraction, in a fixed order
    means = features.groupby("wsi_pattern")["nuclear_fraction"].mean()
    assert means["astrocytoma"] < means["oligodendroglioma"] < means["glioblastoma"]
    assert means["oligodendroglioma"] > 1.5 * means["astrocytoma"]


def _in_memory_mr(settings: RadPathSettings) -> pd.DataFrame:
    classes = radpath.plan_classes(settings)
    rows = []
    for index, (disease, shown) in enumerate(
        zip(classes, radpath.plan_patterns(settings, classes), strict=True)
    ):
        sequences, mask = radpath.render_patient_mr(settings, index, shown["MR"])
        row = _lesion_features(sequences["t1ce"].astype(np.float32), mask)
        rows.append({"disease": disease, "mr_pattern": shown["MR"], **row})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("changes", "low", "high"),
    [
        ({}, 0.45, 0.75),  # the default: weak
        ({"mr_reliability": 1.0}, 0.85, 1.0),  # the lesion itself reads well
        ({"mr_reliability": NO_SIGNAL}, 0.0, 0.45),
        ({"mr_signal_strength": 0.0}, 0.0, 0.45),
    ],
)
def test_mr_signal_follows_its_knobs(changes, low, high):
    frame = _in_memory_mr(dataclasses.replace(DEFAULT, n_patients=150, seed=5, **changes))
    accuracy = _ncm_balanced_accuracy(
        _standardised(frame, ["t1ce_ratio", "lesion_vox"]), frame["disease"]
    )
    assert low <= accuracy <= high, accuracy


def test_mr_is_identical_for_every_pattern_at_strength_zero():
    flat = dataclasses.replace(DEFAULT, mr_signal_strength=0.0)
    (low, low_mask), (high, high_mask) = (
        radpath.render_patient_mr(flat, 4, c) for c in ("oligodendroglioma", "glioblastoma")
    )
    np.testing.assert_array_equal(low_mask, high_mask)
    for name in SEQUENCES:
        np.testing.assert_array_equal(low[name], high[name])
    (low, low_mask), (high, high_mask) = (
        radpath.render_patient_mr(DEFAULT, 4, c) for c in ("oligodendroglioma", "glioblastoma")
    )
    assert high["t1ce"][high_mask].mean() > low["t1ce"][low_mask].mean() + 80
    assert high_mask.sum() > low_mask.sum()


def test_slides_carry_no_class_at_chance_reliability():
    settings = dataclasses.replace(
        DEFAULT, n_patients=90, seed=11, slide_px=256, wsi_reliability=NO_SIGNAL
    )
    classes = radpath.plan_classes(settings)
    shown = [p["WSI"] for p in radpath.plan_patterns(settings, classes)]
    fractions = np.log(
        [
            _pixel_nuclear_fraction(radpath.render_patient_slide(settings, index, pattern))
            for index, pattern in enumerate(shown)
        ]
    )
    assert _ncm_balanced_accuracy(fractions, classes) < 0.5
    assert _ncm_balanced_accuracy(fractions, shown) > 0.9


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_bytes_another_seed_differs(tmp_path):
    first = _file_bytes(write_radpath_cohort(tmp_path / "a", RadPathSettings(seed=7, **TINY)))
    again = _file_bytes(write_radpath_cohort(tmp_path / "b", RadPathSettings(seed=7, **TINY)))
    other = _file_bytes(write_radpath_cohort(tmp_path / "c", RadPathSettings(seed=8, **TINY)))
    assert first == again
    assert {"clinical.tsv", "images.tsv", "cohort.json", "mr/RP001_t1ce.nii.gz"} <= set(first)
    assert len(first) == 3 + 3 * 6  # tables + per patient 4 sequences, mask and slide
    changed = [name for name in first if first[name] != other.get(name)]
    assert {"mr/RP001_t1.nii.gz", "mr/RP001_mask.nii.gz", "wsi/RP001.svs"} <= set(changed)


def test_failed_write_leaves_the_old_cohort_in_place(tmp_path, monkeypatch):
    root = write_radpath_cohort(tmp_path / "cohort", RadPathSettings(**TINY))
    before = _file_bytes(root)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(radpath.wsi, "write_svs", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_radpath_cohort(root, RadPathSettings(seed=9, **TINY))
    assert _file_bytes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_config_defaults_match_the_settings_and_dispatch_writes_the_cohort(tmp_path):
    config = load_config([ROOT / "config/config.yaml"])
    config["cohorts"]["glioma"] = {"synthetic": True, "generator": "radpath"}
    cohort = validate_config(config)["cohorts"]["glioma"]
    filled = cohort["radpath"]
    assert filled == json.loads(json.dumps(dataclasses.asdict(DEFAULT)))

    settings = {**filled, **TINY, "seed": 4}
    write_configured_cohort(tmp_path / "out", {}, {"generator": "radpath", "radpath": settings})
    written = json.loads((tmp_path / "out" / "cohort.json").read_text())
    assert written["settings"] == settings
    assert _file_bytes(tmp_path / "out") == _file_bytes(
        write_radpath_cohort(tmp_path / "direct", RadPathSettings(seed=4, **TINY))
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_patients": 2}, "n_patients"),
        ({"wsi_reliability": 1.5}, "wsi_reliability"),
        ({"mr_reliability": -0.1}, "mr_reliability"),
        ({"mr_signal_strength": 2.0}, "mr_signal_strength"),
        ({"mr_shape_vox": (32, 32)}, "mr_shape_vox"),
        ({"mr_spacing_mm": (1.0, 0.0, 1.0)}, "mr_spacing_mm"),
        ({"slide_px": 32}, "slide_px"),
    ],
)
def test_invalid_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        RadPathSettings(**changes)
