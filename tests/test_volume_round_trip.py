"""The synthetic writers and the volume reader agree: a CT written as a shuffled DICOM series
or as NIfTI reads back to the same voxels, spacing and lesion slices, and the MHD-Net sequence
cutter labels the sequences holding the written lesion."""

from __future__ import annotations

import numpy as np
import pytest

from mmdiag.synth.dicom import write_dicom_series
from mmdiag.synth.volumes import render_ct_lesion, write_ct_case
from mmdiag.volumes import TUMOUR, cut_sequences, read_volume

SHAPE_XYZ = (40, 36, 60)
SPACING_XYZ = (0.8, 0.9, 2.0)


@pytest.fixture(scope="module")
def ct():
    rng = np.random.default_rng(3)
    return render_ct_lesion(rng, SHAPE_XYZ, SPACING_XYZ, grade=2, n_grades=3)


def test_shuffled_dicom_series_reads_back_as_written(tmp_path, ct) -> None:
    hu, _, _ = ct
    paths = write_dicom_series(tmp_path / "series", hu, SPACING_XYZ, rng=5, patient_id="P1")
    assert [p.name for p in paths] != sorted(p.name for p in paths)  # names are not the order
    volume = read_volume(tmp_path / "series")
    assert volume.voxels.shape == (SHAPE_XYZ[2], SHAPE_XYZ[1], SHAPE_XYZ[0])
    assert volume.spacing_mm == pytest.approx(SPACING_XYZ[::-1])
    # voxels (z, y, x) are the written [x, y, z] HU, slice by slice in position order
    np.testing.assert_array_equal(volume.voxels, np.transpose(hu, (2, 1, 0)).astype(np.float32))


def test_nifti_case_reads_back_with_its_lesion_slices(tmp_path, ct) -> None:
    hu, mask, (first, last) = ct
    case = write_ct_case(tmp_path, "P1", hu, mask, SPACING_XYZ)
    volume = read_volume(case["image"])
    lesion = read_volume(case["mask"]).voxels > 0
    np.testing.assert_array_equal(volume.voxels, np.transpose(hu, (2, 1, 0)).astype(np.float32))
    occupied = np.flatnonzero(lesion.any(axis=(1, 2)))
    assert (occupied[0], occupied[-1]) == (first, last)
    assert (case["lesion_z_first"], case["lesion_z_last"]) == (first, last)

    sequences = cut_sequences(volume, depth=8, size=32, lesion_mask=lesion)
    by_range = cut_sequences(volume, depth=8, size=32, lesion_z_range=(first, last))
    assert [s.label for s in sequences] == [s.label for s in by_range]
    for sequence in sequences:
        holds_lesion = sequence.start <= last and first < sequence.stop
        assert (sequence.label == TUMOUR) == holds_lesion
        assert sequence.voxels.shape == (8, 32, 32)
    assert any(s.label == TUMOUR for s in sequences)
