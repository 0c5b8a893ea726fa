"""The synthetic TET cohort: a valid manifest with a ``who_type`` task, CT and WSI signals that
rise with the WHO type (and vanish at strength 0), lesion z-ranges that match the rendered
lesion, and byte-identical files for one seed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.stats import spearmanr

from mmdiag.data import ManifestRules, build_manifest, patient_labels
from mmdiag.synth import tet
from mmdiag.synth.tet import WHO_TYPES, TetSettings, write_tet_cohort
from mmdiag.volumes import read_volume

STRONG = TetSettings(n_patients=16, seed=3, ct_signal_strength=1.0, slide_px=512)
TINY = {"n_patients": 8, "slide_px": 128, "slides_per_patient": 1}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A cohort of two patients per type, with full CT signal."""
    return write_tet_cohort(tmp_path_factory.mktemp("tet") / "cohort", STRONG)


def _table(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, sep="\t", dtype={"patient_id": str})


def _types(root: Path) -> dict[str, str]:
    return _table(root, "clinical.tsv").set_index("patient_id")["who_type"].to_dict()


def _ct(root: Path, pid: str) -> tuple[np.ndarray, np.ndarray]:
    """(HU, lesion mask) as read_volume gives them, axes (z, y, x)."""
    image = read_volume(root / "ct" / f"{pid}.nii.gz").voxels
    return image, read_volume(root / "ct" / f"{pid}_mask.nii.gz").voxels > 0


def _nuclear_fraction(path: Path) -> float:
    """Fraction of tissue pixels (not white glass) that are dark-purple nuclei, at level 0."""
    pixels = tifffile.TiffFile(path).pages[0].asarray().astype(np.float32)
    tissue = pixels.mean(axis=-1) < 235
    return float((tissue & (pixels[..., 0] < 170)).sum() / tissue.sum())


def _per_type_mean(values: dict[str, list[float]]) -> list[float]:
    return [float(np.mean(values[t])) for t in WHO_TYPES]


def test_cohort_passes_the_manifest_with_a_who_type_task(cohort):
    rules = ManifestRules.from_config(
        {
            "classes": ["thymoma", "thymic_carcinoma"],
            "stages": [],
            "required_modalities": ["CT", "WSI"],
            "min_image_px": {"CT": 16, "WSI": 256},
            "tasks": {"who_type": {"classes": list(WHO_TYPES), "ordinal": True, "required": True}},
        }
    )
    manifest = build_manifest(cohort_root=cohort, rules=rules)
    assert Counter(manifest["modality"]) == {"CT": 16, "WSI": 32}
    labels = patient_labels(manifest, rules.tasks)
    assert sorted(labels["who_type"]) == sorted(list(range(8)) * 2)
    carcinoma = manifest.loc[manifest["who_type"] == "TC", "disease"]
    assert set(carcinoma) == {"thymic_carcinoma"}
    assert set(manifest.loc[manifest["who_type"] != "TC", "disease"]) == {"thymoma"}
    assert len(build_manifest(cohort_root=cohort, rules=tet.manifest_rules())) == len(manifest)


def test_types_are_balanced_round_robin():
    counts = Counter(tet.plan_types(TetSettings(n_patients=44)))
    assert set(counts) == set(WHO_TYPES) and max(counts.values()) - min(counts.values()) == 1
    assert tet.plan_types(TetSettings(seed=1)) != tet.plan_types(TetSettings(seed=2))


def test_ct_lesion_hu_rises_with_the_type(cohort):
    types, lesion_hu = [], []
    for pid, who_type in _types(cohort).items():
        image, mask = _ct(cohort, pid)
        types.append(WHO_TYPES.index(who_type))
        lesion_hu.append(float(image[mask].mean()))
    # per-patient texture and jitter (about 10 HU) against 17 HU per type step
    assert spearmanr(types, lesion_hu).statistic > 0.85


def test_ct_lesion_hu_of_one_patient_rises_strictly_with_the_type():
    means = []
    for who_type in WHO_TYPES:
        image, mask = tet.render_patient_ct(STRONG, 2, who_type)
        means.append(float(image[mask].mean()))
    assert np.diff(means) == pytest.approx([120 / 7] * 7, abs=1.0)  # enhancement 80..200 HU


def test_ct_signal_is_absent_at_strength_zero_and_present_otherwise():
    flat = TetSettings(ct_signal_strength=0.0)
    low, high = (tet.render_patient_ct(flat, 5, t)[0] for t in ("A", "TC"))
    np.testing.assert_array_equal(low, high)
    weak = TetSettings(ct_signal_strength=0.3)
    (low, mask), (high, _) = (tet.render_patient_ct(weak, 5, t) for t in ("A", "TC"))
    assert high[mask].mean() - low[mask].mean() == pytest.approx(0.3 * 120, abs=2)


def test_lesion_z_ranges_match_the_rendered_lesion(cohort):
    lesions = _table(cohort, "lesions.tsv").set_index("patient_id")
    assert list(lesions.columns) == ["z_start", "z_stop"]
    for pid, row in lesions.iterrows():
        image, mask = _ct(cohort, pid)
        lesion_slices = np.flatnonzero(mask.any(axis=(1, 2)))
        assert lesion_slices.tolist() == list(range(row.z_start, row.z_stop))
        assert 0 < row.z_start and row.z_stop < image.shape[0]  # "other" slices on both sides
        inside = image[row.z_start : row.z_stop]
        tissue = (image > 0) & (image < 70) & ~mask  # soft tissue and organ, lesion excluded
        assert image[mask].mean() > image[tissue].mean() + 30
        assert inside.max() > image[: row.z_start].max()


def test_wsi_nuclear_fraction_rises_with_the_type(cohort):
    types = _types(cohort)
    fractions: dict[str, list[float]] = {}
    for row in _table(cohort, "images.tsv").query("modality == 'WSI'").itertuples():
        fractions.setdefault(types[row.patient_id], []).append(_nuclear_fraction(cohort / row.path))
    means = _per_type_mean(fractions)
    assert np.all(np.diff(means) > 0), means
    assert means[-1] > 5 * means[0]


def test_wsi_signal_is_absent_at_strength_zero():
    level = tet.volumes.ordinal_level(0, 8, 0.0)
    assert level == tet.volumes.ordinal_level(7, 8, 0.0)
    slides = [
        tet.render_tet_slide(np.random.default_rng(4), 256, mpp=0.5, level=level) for _ in range(2)
    ]
    np.testing.assert_array_equal(*slides)
    sparse, dense = (
        tet.render_tet_slide(np.random.default_rng(4), 256, mpp=0.5, level=x) for x in (0, 1)
    )
    assert (dense[..., 0] < 170).sum() > 3 * (sparse[..., 0] < 170).sum()


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_bytes_another_seed_differs(tmp_path):
    first = _file_bytes(write_tet_cohort(tmp_path / "a", TetSettings(seed=7, **TINY)))
    again = _file_bytes(write_tet_cohort(tmp_path / "b", TetSettings(seed=7, **TINY)))
    other = _file_bytes(write_tet_cohort(tmp_path / "c", TetSettings(seed=8, **TINY)))
    assert first == again
    assert {"clinical.tsv", "lesions.tsv", "cohort.json", "ct/TET001.nii.gz"} <= set(first)
    changed = [name for name in first if first[name] != other.get(name)]
    assert "ct/TET001.nii.gz" in changed and "wsi/TET001_s1.svs" in changed


def test_failed_write_leaves_the_old_cohort_in_place(tmp_path, monkeypatch):
    root = write_tet_cohort(tmp_path / "cohort", TetSettings(**TINY))
    before = _file_bytes(root)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tet.wsi, "write_svs", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tet_cohort(root, TetSettings(seed=9, **TINY))
    assert _file_bytes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_patients": 7}, "n_patients"),
        ({"ct_signal_strength": 1.5}, "ct_signal_strength"),
        ({"wsi_signal_strength": -0.1}, "wsi_signal_strength"),
        ({"slides_per_patient": 0}, "slides_per_patient"),
    ],
)
def test_invalid_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TetSettings(**changes)
