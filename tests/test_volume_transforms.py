"""Known-answer tests of volume intensity and grid transforms and of the sequence cutter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmdiag.volumes import (
    OTHER,
    TUMOUR,
    Volume,
    VolumeError,
    clip_and_scale,
    cut_sequences,
    hu_window,
    kept_slice_range,
    read_volume,
    resample_to_spacing,
    resize_array,
    resize_to_shape,
    sequence_bounds,
    zscore,
)

REAL_CT = Path("/work/shared/data/real/radiology/example_ct_sm.nii.gz")


def _tilted_affine(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    angle = np.radians(25.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing_zyx[::-1])
    affine[:3, 3] = [-40.0, 12.5, 300.0]
    return affine


def _linear_world_volume(shape=(8, 6, 4), spacing=(1.0, 1.0, 1.0)) -> tuple[Volume, np.ndarray]:
    """A volume whose intensity is a linear function of world position."""
    affine = _tilted_affine(spacing)
    weights = np.array([0.5, -2.0, 3.0])
    k, j, i = np.meshgrid(*(range(n) for n in shape), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return Volume(world @ weights + 7.0, spacing, affine), weights


def _expected_from_world(volume: Volume, weights: np.ndarray) -> np.ndarray:
    k, j, i = np.meshgrid(*(range(n) for n in volume.shape), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    return volume.index_to_world(ijk) @ weights + 7.0


# -- intensity -------------------------------------------------------------------------------
def test_hu_window_of_a_ramp():
    ramp = np.linspace(-1000.0, 1000.0, 201)
    windowed = hu_window(ramp, level=40.0, width=400.0)
    np.testing.assert_allclose(windowed, np.clip((ramp + 160.0) / 400.0, 0.0, 1.0), atol=1e-7)
    assert windowed.dtype == np.float32
    np.testing.assert_array_equal(windowed, clip_and_scale(ramp, -160.0, 240.0))


def test_hu_window_keeps_volume_geometry():
    volume = Volume(np.full((2, 3, 3), 40.0), (2.0, 1.0, 1.0), _tilted_affine((2.0, 1.0, 1.0)))
    windowed = hu_window(volume, 40.0, 400.0)
    assert isinstance(windowed, Volume)
    np.testing.assert_array_equal(windowed.voxels, 0.5)
    np.testing.assert_array_equal(windowed.affine, volume.affine)
    assert windowed.spacing_mm == volume.spacing_mm
    np.testing.assert_array_equal(volume.voxels, 40.0)


def test_window_needs_positive_width():
    with pytest.raises(VolumeError, match="high > low"):
        clip_and_scale(np.zeros(3), 10.0, 10.0)


def test_zscore_mean_zero_std_one():
    data = np.random.default_rng(0).normal(3.0, 5.0, size=(6, 10, 10))
    scored = zscore(data)
    assert abs(float(scored.mean(dtype=np.float64))) < 1e-5
    assert float(scored.std(dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)


def test_zscore_with_mask_uses_masked_statistics():
    data = np.random.default_rng(1).normal(0.0, 1.0, size=(4, 8, 8))
    mask = np.zeros(data.shape, dtype=bool)
    mask[:, 2:6, 2:6] = True
    data[~mask] = -1000.0
    volume = zscore(Volume(data, (1.0, 1.0, 1.0), np.eye(4)), mask=mask)
    inside = volume.voxels[mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-5
    assert inside.std() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(VolumeError, match="no voxels"):
        zscore(data, mask=np.zeros(data.shape, dtype=bool))


def test_zscore_of_constant_is_zero():
    np.testing.assert_array_equal(zscore(np.full((2, 2, 2), 5.0)), 0.0)


# -- grids -----------------------------------------------------------------------------------
def test_resample_halves_shape_and_doubles_spacing():
    volume, weights = _linear_world_volume()
    coarse = resample_to_spacing(volume, 2.0)
    assert coarse.shape == (4, 3, 2)
    assert coarse.spacing_mm == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(coarse.index_to_world([0, 0, 0]), volume.index_to_world([0.5] * 3))
    np.testing.assert_allclose(coarse.affine[:3, :3], volume.affine[:3, :3] * 2.0)
    np.testing.assert_allclose(coarse.voxels, _expected_from_world(coarse, weights), atol=1e-3)


def test_resample_ramp_averages_pairs():
    ramp = np.broadcast_to(np.arange(8.0)[:, None, None], (8, 2, 2))
    coarse = resample_to_spacing(Volume(ramp, (1.0, 1.0, 1.0), np.eye(4)), (2.0, 1.0, 1.0))
    np.testing.assert_allclose(coarse.voxels[:, 0, 0], [0.5, 2.5, 4.5, 6.5])


def test_resample_anisotropic_and_interior_values():
    volume, weights = _linear_world_volume(shape=(6, 8, 8), spacing=(3.0, 1.0, 1.0))
    fine = resample_to_spacing(volume, (1.5, 2.0, 2.0))
    assert fine.shape == (12, 4, 4)
    assert fine.spacing_mm == (1.5, 2.0, 2.0)
    # z samples (c + 0.5) / 2 - 0.5 stay inside the grid for c = 1 .. 10
    np.testing.assert_allclose(
        fine.voxels[1:-1], _expected_from_world(fine, weights)[1:-1], atol=1e-3
    )


def test_resize_to_shape_updates_spacing():
    volume, weights = _linear_world_volume()
    resized = resize_to_shape(volume, (4, 3, 2))
    coarse = resample_to_spacing(volume, 2.0)
    np.testing.assert_allclose(resized.voxels, coarse.voxels)
    np.testing.assert_allclose(resized.affine, coarse.affine)
    odd = resize_to_shape(volume, (5, 6, 4))
    assert odd.shape == (5, 6, 4)
    assert odd.spacing_mm == pytest.approx((8 / 5, 1.0, 1.0))
    assert odd.voxels.dtype == np.float32


def test_nearest_resize_keeps_labels():
    labels = np.random.default_rng(2).integers(0, 3, size=(4, 6, 6)).astype(np.float32)
    resized = resize_array(labels, (8, 9, 3), order=0)
    assert set(np.unique(resized)) <= {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(resize_array(labels, labels.shape), labels)


def test_grid_arguments_are_checked():
    volume, _ = _linear_world_volume()
    with pytest.raises(VolumeError, match="positive"):
        resample_to_spacing(volume, (1.0, 0.0, 1.0))
    with pytest.raises(VolumeError, match="shape"):
        resize_to_shape(volume, (4, 3))
    with pytest.raises(VolumeError, match="order"):
        resize_to_shape(volume, (4, 3, 2), order=7)


# -- sequences -------------------------------------------------------------------------------
def _z_ramp(n: int, size: int = 8) -> Volume:
    voxels = np.broadcast_to(np.arange(float(n))[:, None, None], (n, size, size))
    return Volume(voxels, (2.0, 1.0, 1.0), np.eye(4), source="ramp.nii.gz")


def test_kept_range_and_bounds():
    assert kept_slice_range(100, 0.2, 0.3) == range(20, 70)
    assert kept_slice_range(101, 0.2, 0.3) == range(20, 71)
    assert kept_slice_range(100, 0.29, 0.0) == range(29, 100)
    assert sequence_bounds(100) == [(20, 44), (44, 68)]
    assert sequence_bounds(30) == []


def test_cut_sequences_of_100_slices():
    sequences = cut_sequences(_z_ramp(100), size=4)
    assert [(s.start, s.stop) for s in sequences] == [(20, 44), (44, 68)]
    for seq in sequences:
        assert seq.voxels.shape == (24, 4, 4) and seq.voxels.dtype == np.float32
        assert seq.label is None
        np.testing.assert_allclose(seq.voxels[:, 0, 0], np.arange(seq.start, seq.stop))


def test_labels_from_lesion_mask():
    volume = _z_ramp(100)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[30, 3, 3] = True
    assert [s.label for s in cut_sequences(volume, size=4, lesion_mask=mask)] == [TUMOUR, OTHER]
    mask[:] = False
    mask[69, 1, 1] = True  # kept, but in the dropped partial block
    mask[5, 1, 1] = True  # in the dropped head
    assert [s.label for s in cut_sequences(volume, size=4, lesion_mask=mask)] == [OTHER, OTHER]
    with pytest.raises(VolumeError, match="mask shape"):
        cut_sequences(volume, lesion_mask=mask[:, :4])


def test_labels_from_z_range():
    volume = _z_ramp(100)
    labels = [s.label for s in cut_sequences(volume, size=4, lesion_z_range=(40, 50))]
    assert labels == [TUMOUR, TUMOUR]
    half = {"size": 4, "min_lesion_fraction": 0.5}
    assert [s.label for s in cut_sequences(volume, lesion_z_range=(40, 50), **half)] == [
        OTHER,
        OTHER,
    ]
    assert [s.label for s in cut_sequences(volume, lesion_z_range=(30, 60), **half)] == [
        TUMOUR,
        TUMOUR,
    ]
    with pytest.raises(VolumeError, match="z-range"):
        cut_sequences(volume, lesion_z_range=(50, 40))
    with pytest.raises(VolumeError, match="not both"):
        cut_sequences(volume, lesion_z_range=(1, 2), lesion_mask=np.zeros(volume.shape, bool))


def test_too_few_slices_names_the_volume():
    with pytest.raises(VolumeError, match=r"ramp\.nii\.gz: 15 slices kept of 30"):
        cut_sequences(_z_ramp(30))


def test_configurable_cutter_on_real_ct():
    if not REAL_CT.is_file():
        pytest.skip(f"real fixture {REAL_CT} is absent")
    volume = hu_window(read_volume(REAL_CT), level=40.0, width=400.0)
    sequences = cut_sequences(volume, depth=8, size=32, head_fraction=0.1, tail_fraction=0.1)
    assert [(s.start, s.stop) for s in sequences] == [(3, 11), (11, 19), (19, 27)]
    assert all(s.voxels.shape == (8, 32, 32) for s in sequences)
    assert all(0.0 <= s.voxels.min() and s.voxels.max() <= 1.0 for s in sequences)
