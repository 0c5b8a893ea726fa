"""Tests for the synthetic CT, DICOM, multi-sequence MR and multi-slide WSI writers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from scipy import ndimage

from mmdiag.synth import dicom, mr, volumes, wsi

CT_SHAPE, CT_SPACING = (64, 60, 20), (0.8, 0.9, 2.5)
MR_SHAPE, MR_SPACING = (56, 64, 40), (1.2, 1.2, 1.5)
N_GRADES = 4
SEEDS = range(5)


def _ct(seed: int, grade: int, strength: float = 1.0, **kwargs):
    rng = np.random.default_rng([11, seed])
    return volumes.render_ct_lesion(
        rng,
        CT_SHAPE,
        CT_SPACING,
        grade=grade,
        n_grades=N_GRADES,
        signal_strength=strength,
        **kwargs,
    )


def _ct_stats(strength: float, seeds=SEEDS) -> np.ndarray:
    """Lesion (voxel count, mean HU, HU spread), shape (grade, seed, 3)."""
    stats = np.empty((N_GRADES, len(seeds), 3))
    for grade in range(N_GRADES):
        for index, seed in enumerate(seeds):
            hu, mask, _ = _ct(seed, grade, strength)
            lesion = hu[mask].astype(float)
            stats[grade, index] = mask.sum(), lesion.mean(), lesion.std()
    return stats


def _ring(mask: np.ndarray, width: int = 2) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=width) & ~mask


def _bytes(paths) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


# --- ordinal CT lesion ------------------------------------------------------------------


def test_ordinal_level_range_and_validation():
    assert [volumes.ordinal_level(g, 4, 1.0) for g in range(4)] == pytest.approx(
        [0, 1 / 3, 2 / 3, 1]
    )
    assert {volumes.ordinal_level(g, 4, 0.0) for g in range(4)} == {0.5}
    assert volumes.ordinal_level(0, 1, 1.0) == 0.5
    with pytest.raises(ValueError, match="grade"):
        volumes.ordinal_level(4, 4, 1.0)
    with pytest.raises(ValueError, match="signal_strength"):
        volumes.ordinal_level(0, 4, 1.5)
    with pytest.raises(ValueError, match="signal features"):
        volumes.feature_levels(0, 4, 1.0, ("size",))


def test_ct_lesion_appearance_rises_with_grade_at_full_strength():
    means = _ct_stats(1.0).mean(axis=1)  # (grade, feature)
    assert np.all(np.diff(means, axis=0) > 0), means  # size, enhancement and texture


def test_ct_lesion_is_class_independent_at_zero_strength():
    for seed in SEEDS:  # same draws for every grade: identical volumes
        first = _ct(seed, 0, 0.0)
        for grade in range(1, N_GRADES):
            hu, mask, z_range = _ct(seed, grade, 0.0)
            assert np.array_equal(hu, first[0]) and np.array_equal(mask, first[1])
            assert z_range == first[2]
    # Lowest vs highest grade over disjoint seeds (Welch t per feature): no difference
    # beyond sampling noise at strength 0, a clear separation at strength 1.
    t_values = {}
    for strength in (0.0, 1.0):
        low = _ct_stats(strength, seeds=range(0, 8))[0]
        high = _ct_stats(strength, seeds=range(8, 16))[-1]
        standard_error = np.sqrt((low.var(axis=0, ddof=1) + high.var(axis=0, ddof=1)) / 8)
        t_values[strength] = (high.mean(axis=0) - low.mean(axis=0)) / standard_error
    assert np.all(np.abs(t_values[0.0]) < 2.5), t_values
    assert np.all(t_values[1.0] > 4.0), t_values


def test_ct_signal_strength_scales_the_grade_gap():
    gaps = {s: np.ptp(_ct_stats(s, seeds=range(3)).mean(axis=1), axis=0) for s in (0.5, 1.0)}
    assert np.all(gaps[0.5] < gaps[1.0]) and np.all(gaps[0.5] > 0)


def test_ct_signal_features_can_be_chosen():
    low = _ct(0, 0, signal=("enhancement",))
    high = _ct(0, N_GRADES - 1, signal=("enhancement",))
    assert np.array_equal(low[1], high[1])  # the radius carries no grade
    assert high[0][high[1]].mean() > low[0][low[1]].mean() + 50


def test_ct_mask_matches_lesion_voxels_and_z_range():
    for grade in range(N_GRADES):
        hu, mask, (first, last) = _ct(1, grade)
        assert hu.dtype == np.int16 and mask.dtype == bool and mask.shape == hu.shape
        occupied = np.flatnonzero(mask.any(axis=(0, 1)))
        assert (first, last) == (occupied[0], occupied[-1])
        assert np.all(mask[:, :, first : last + 1].any(axis=(0, 1)))
        ring = _ring(mask)
        assert np.mean(hu[mask] > 55) > 0.97  # enhancing inside the mask
        assert np.median(hu[ring]) < 45  # soft tissue right outside it
        assert hu[mask].mean() > hu[ring].mean() + 30


def test_write_ct_case_files_z_range_and_reproducibility(tmp_path):
    hu, mask, z_range = _ct(2, 2)
    results = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        results.append(volumes.write_ct_case(tmp_path / name, "P001", hu, mask, CT_SPACING))
    row = results[0]
    assert row["image"].name == "P001.nii.gz" and row["mask"].name == "P001_mask.nii.gz"
    assert (row["lesion_z_first"], row["lesion_z_last"]) == z_range
    image, mask_image = nib.load(row["image"]), nib.load(row["mask"])
    assert np.array_equal(image.affine, mask_image.affine)
    assert image.header.get_zooms() == pytest.approx(CT_SPACING)
    assert np.array_equal(np.asanyarray(image.dataobj), hu)
    stored_mask = np.asanyarray(mask_image.dataobj)
    assert stored_mask.dtype == np.uint8 and np.array_equal(stored_mask, mask)
    assert volumes.lesion_z_range(stored_mask) == z_range
    assert _bytes([row["image"], row["mask"]]) == _bytes([results[1]["image"], results[1]["mask"]])
    regenerated = _ct(2, 2)
    assert np.array_equal(regenerated[0], hu)  # same seed, same voxels


# --- DICOM series -----------------------------------------------------------------------


def _read_series(folder: Path):
    """Read a series back the way a reader must: sort slices by position along the normal."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    normal = np.cross(
        np.array(datasets[0].ImageOrientationPatient[:3], float),
        np.array(datasets[0].ImageOrientationPatient[3:], float),
    )
    order = np.argsort(
        [np.dot(np.array(ds.ImagePositionPatient, float), normal) for ds in datasets]
    )
    ordered = [datasets[i] for i in order]
    slices = [
        ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        for ds in ordered
    ]
    names = [p.name for p in sorted(folder.iterdir())]
    return np.stack(slices).transpose(2, 1, 0), ordered, [names[i] for i in order]


def test_dicom_round_trip_is_exact_and_tags_are_real(tmp_path):
    hu, _, _ = _ct(3, 1)
    paths = dicom.write_dicom_series(tmp_path / "s", hu, CT_SPACING, rng=5, patient_id="P007")
    assert len(paths) == hu.shape[2]
    volume, ordered, names_in_slice_order = _read_series(tmp_path / "s")
    assert volume.shape == hu.shape and np.array_equal(volume, hu)
    assert names_in_slice_order == [p.name for p in paths]
    assert names_in_slice_order != sorted(names_in_slice_order)  # listing order is shuffled

    first = ordered[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (
        first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == first.file_meta.MediaStorageSOPClassUID
    )
    assert first.Modality == "CT" and first.PatientID == "P007"
    assert (first.Rows, first.Columns) == (hu.shape[1], hu.shape[0])
    assert [float(v) for v in first.PixelSpacing] == [CT_SPACING[1], CT_SPACING[0]]
    assert float(first.SliceThickness) == CT_SPACING[2]
    assert (first.BitsAllocated, first.BitsStored, first.HighBit) == (16, 16, 15)
    assert (first.PixelRepresentation, first.SamplesPerPixel) == (0, 1)
    assert first.PhotometricInterpretation == "MONOCHROME2"
    assert (float(first.RescaleIntercept), float(first.RescaleSlope)) == (-1024, 1)
    assert first.RescaleType == "HU"
    assert [ds.InstanceNumber for ds in ordered] == list(range(1, len(ordered) + 1))
    assert len({ds.SOPInstanceUID for ds in ordered}) == len(ordered)
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in ordered}) == 1
    assert all(ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in ordered)
    raw = pydicom.dcmread(paths[0]).PixelData
    assert np.array_equal(
        np.frombuffer(raw, "<u2").reshape(first.Rows, first.Columns), hu[:, :, 0].T + 1024
    )


def test_dicom_bytes_reproducible_and_seed_dependent(tmp_path):
    hu, _, _ = _ct(4, 0)
    first = dicom.write_dicom_series(tmp_path / "a", hu, CT_SPACING, rng=9, patient_id="P1")
    again = dicom.write_dicom_series(
        tmp_path / "b", hu, CT_SPACING, rng=np.random.default_rng(9), patient_id="P1"
    )
    assert [p.name for p in first] == [p.name for p in again]
    assert _bytes(first) == _bytes(again)
    other = dicom.write_dicom_series(tmp_path / "c", hu, CT_SPACING, rng=10, patient_id="P1")
    uid = pydicom.dcmread(first[0]).SeriesInstanceUID
    assert pydicom.dcmread(other[0]).SeriesInstanceUID != uid


def test_dicom_orientation_origin_and_options(tmp_path):
    hu, _, _ = _ct(5, 3)
    orientation = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # normal points to -z
    paths = dicom.write_dicom_series(
        tmp_path / "o",
        hu,
        CT_SPACING,
        rng=1,
        patient_id="P2",
        orientation=orientation,
        origin_mm=(-20.0, 10.0, 5.0),
        shuffle_names=False,
        bits_stored=12,
        study_uid="1.2.3.4",
    )
    assert [p.name for p in paths] == [f"slice_{k:04d}.dcm" for k in range(1, hu.shape[2] + 1)]
    volume, ordered, _ = _read_series(tmp_path / "o")
    assert np.array_equal(volume, hu)
    assert [float(v) for v in ordered[0].ImagePositionPatient] == [-20.0, 10.0, 5.0]
    assert float(ordered[-1].ImagePositionPatient[2]) == pytest.approx(
        5.0 - 2.5 * (hu.shape[2] - 1)
    )
    assert (ordered[0].BitsStored, ordered[0].HighBit, ordered[0].StudyInstanceUID) == (
        12,
        11,
        "1.2.3.4",
    )
    with pytest.raises(ValueError, match="stored bits"):
        dicom.write_dicom_series(
            tmp_path / "x", hu + 4000, CT_SPACING, rng=1, patient_id="P2", bits_stored=12
        )
    with pytest.raises(ValueError, match="orthonormal"):
        dicom.write_dicom_series(
            tmp_path / "y", hu, CT_SPACING, rng=1, patient_id="P2", orientation=(1, 0, 0, 1, 0, 0)
        )


# --- multi-sequence MR ------------------------------------------------------------------


def _mr(seed: int, grade: int = 0, strength: float = 1.0):
    rng = np.random.default_rng([23, seed])
    return mr.render_mr(
        rng, MR_SHAPE, MR_SPACING, grade=grade, n_grades=N_GRADES, signal_strength=strength
    )


def test_mr_lesion_contrast_per_sequence():
    for seed in range(3):
        sequences, mask, (first, last) = _mr(seed, grade=seed)
        ring = _ring(mask)
        assert set(sequences) == set(mr.SEQUENCES)
        assert all(v.dtype == np.int16 and v.shape == mask.shape for v in sequences.values())
        occupied = np.flatnonzero(mask.any(axis=(0, 1)))
        assert (first, last) == (occupied[0], occupied[-1])
        lesion = {k: v[mask].mean() for k, v in sequences.items()}
        around = {k: np.median(v[ring]) for k, v in sequences.items()}
        assert lesion["t1"] < 0.8 * around["t1"]  # hypointense on T1
        assert lesion["t1ce"] > 1.1 * around["t1ce"]  # enhancing
        assert lesion["t1ce"] > 2 * lesion["t1"]
        assert lesion["t2"] > 1.3 * around["t2"] and lesion["flair"] > 1.3 * around["flair"]


def test_mr_tissue_contrasts_are_plausible():
    sequences, mask, _ = _mr(0)
    t1, t2, flair = (sequences[k].astype(float) for k in ("t1", "t2", "flair"))
    assert t1[0, 0, 0] < 100 and t2[0, 0, 0] < 100  # air
    csf = (t2 > 880) & ~mask  # only fluid is this bright on T2
    white = (t1 > 580) & (t1 < 720) & (t2 < 520)
    assert csf.sum() > 20 and white.sum() > 1000
    assert flair[csf].mean() < 0.5 * flair[white].mean()  # fluid suppressed on FLAIR
    assert t1[csf].mean() < 0.5 * t1[white].mean()


def test_mr_ordinal_signal_and_zero_strength():
    sizes = [np.mean([_mr(s, g)[1].sum() for s in range(3)]) for g in range(N_GRADES)]
    enhancement = [
        np.mean([(lambda r: r[0]["t1ce"][r[1]].mean())(_mr(s, g)) for s in range(3)])
        for g in range(N_GRADES)
    ]
    assert np.all(np.diff(sizes) > 0) and np.all(np.diff(enhancement) > 0)
    base, mask, _ = _mr(1, 0, 0.0)
    other, other_mask, _ = _mr(1, N_GRADES - 1, 0.0)
    assert np.array_equal(mask, other_mask)
    assert all(np.array_equal(base[k], other[k]) for k in mr.SEQUENCES)


def test_write_mr_case_shares_affine_and_is_reproducible(tmp_path):
    sequences, mask, _ = _mr(2, 1)
    written = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        written.append(mr.write_mr_case(tmp_path / name, "P003", sequences, mask, MR_SPACING))
    paths = written[0]
    assert [paths[k].name for k in (*mr.SEQUENCES, "mask")] == [
        "P003_t1.nii.gz",
        "P003_t1ce.nii.gz",
        "P003_t2.nii.gz",
        "P003_flair.nii.gz",
        "P003_mask.nii.gz",
    ]
    images = {k: nib.load(p) for k, p in paths.items()}
    for key, image in images.items():
        assert np.array_equal(image.affine, images["t1"].affine) and image.shape == MR_SHAPE
        expected = mask if key == "mask" else sequences[key]
        assert np.array_equal(np.asanyarray(image.dataobj), expected)
    assert images["mask"].get_data_dtype() == np.uint8
    assert _bytes(paths.values()) == _bytes(written[1].values())
    regenerated, regenerated_mask, _ = _mr(2, 1)
    assert np.array_equal(regenerated_mask, mask)
    assert all(np.array_equal(regenerated[k], sequences[k]) for k in mr.SEQUENCES)


# --- several slides per patient ---------------------------------------------------------

SLIDE = {"width_px": 512, "height_px": 384, "mpp": 2.0, "tile_px": 128, "n_levels": 2}


def test_patient_slides_distinct_openable_and_reproducible(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    written = []
    for folder in folders:
        folder.mkdir()
        rng = np.random.default_rng([31, 4])
        written.append(wsi.write_patient_slides(folder, "P004", 3, rng, disease="LN", **SLIDE))
    paths = written[0]
    assert [p.name for p in paths] == ["P004_s1.svs", "P004_s2.svs", "P004_s3.svs"]
    pixels = []
    for path in paths:
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_dimensions[0] == (512, 384) and slide.level_count == 2
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(2.0)
        with tifffile.TiffFile(path) as tif:
            pixels.append(tif.pages[0].asarray().astype(float))
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(pixels[i] - pixels[j]).mean() > 5  # different sections
    assert _bytes(paths) == _bytes(written[1])
    with pytest.raises(ValueError, match="n_slides"):
        wsi.write_patient_slides(tmp_path, "P004", 0, np.random.default_rng(0), **SLIDE)
