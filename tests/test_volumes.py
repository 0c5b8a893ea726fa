"""Reading NIfTI and DICOM volumes: real files, modified copies and synthetic series."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mmdiag.volumes import Volume, VolumeError, read_volume

REAL = Path("/work/shared/data/real/radiology")
SERIES = REAL / "ct_series_siemens_biograph40"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _real(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real fixture {path} is absent")
    return path


def _series_files() -> list[Path]:
    return sorted(_real(SERIES).iterdir())


def _by_position(files: list[Path]) -> list[tuple[float, Path]]:
    """(position along the normal, file) of each real slice, lowest first."""
    pairs = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        pairs.append((float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal), path))
    return sorted(pairs)


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def series_volume() -> Volume:
    return read_volume(_real(SERIES))


def _copy_series(dest: Path, files: list[Path], names: list[str] | None = None) -> Path:
    dest.mkdir()
    for i, path in enumerate(files):
        shutil.copyfile(path, dest / (names[i] if names else path.name))
    return dest


# -- the real CT series ----------------------------------------------------------------------
def test_series_geometry_from_tags(series_volume):
    files = _series_files()
    ordered = _by_position(files)
    first = pydicom.dcmread(ordered[0][1], stop_before_pixels=True)
    steps = np.diff([p for p, _ in ordered])
    assert np.allclose(steps, steps[0]) and steps[0] > 0
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    assert series_volume.shape == (len(files), int(first.Rows), int(first.Columns))
    assert series_volume.spacing_mm == (float(steps[0]), row_mm, col_mm)
    assert series_volume.spacing_mm == (2.0, 0.9765625, 0.9765625)
    assert float(first.SliceThickness) == 3.0  # the spacing is the step, not the thickness
    assert series_volume.modality == "CT"
    assert series_volume.voxels.dtype == np.float32


def test_series_orders_slices_by_position(series_volume):
    ordered = _by_position(_series_files())
    np.testing.assert_array_equal(series_volume.voxels[0], _hu(ordered[0][1]))
    np.testing.assert_array_equal(series_volume.voxels[-1], _hu(ordered[-1][1]))
    for k, (_, path) in enumerate(ordered):
        ipp = np.asarray(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient)
        np.testing.assert_allclose(series_volume.index_to_world([0, 0, k]), ipp * LPS_TO_RAS)
    normal_ras = series_volume.affine[:3, 2]
    along = [series_volume.index_to_world([0, 0, k]) @ normal_ras for k in range(len(ordered))]
    assert np.all(np.diff(along) > 0)


def test_series_hu_range_and_affine(series_volume):
    assert series_volume.voxels.min() == -1024.0
    assert series_volume.voxels.max() == 1839.0
    first = pydicom.dcmread(_by_position(_series_files())[0][1], stop_before_pixels=True)
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    expected = np.eye(4)
    expected[:3, 0] = iop[:3] * col_mm * LPS_TO_RAS
    expected[:3, 1] = iop[3:] * row_mm * LPS_TO_RAS
    expected[:3, 2] = np.cross(iop[:3], iop[3:]) * 2.0 * LPS_TO_RAS
    expected[:3, 3] = np.asarray(first.ImagePositionPatient, dtype=float) * LPS_TO_RAS
    np.testing.assert_allclose(series_volume.affine, expected)


def test_series_ignores_file_names_and_listing_order(series_volume, tmp_path):
    files = _series_files()
    rng = np.random.default_rng(7)
    names = [f"{rng.integers(16**12):012x}" for _ in files]
    by_name = [files[i] for i in np.argsort(names)]
    assert by_name != files
    assert by_name != [p for _, p in _by_position(files)]
    order = rng.permutation(len(files))
    copied = _copy_series(tmp_path / "shuffled", [files[i] for i in order], names)
    volume = read_volume(copied)
    np.testing.assert_array_equal(volume.voxels, series_volume.voxels)
    assert volume.spacing_mm == series_volume.spacing_mm
    np.testing.assert_array_equal(volume.affine, series_volume.affine)


def test_series_skips_files_that_hold_no_image(series_volume, tmp_path):
    files = _series_files()
    folder = _copy_series(tmp_path / "with_dir", files)
    index = pydicom.dcmread(files[0])
    del index.PixelData, index.Rows, index.Columns
    index.save_as(folder / "DICOMDIR")
    np.testing.assert_array_equal(read_volume(folder).voxels, series_volume.voxels)


def test_a_slice_cut_inside_its_pixel_data_is_named(tmp_path):
    """pydicom reads a cut file as one without pixel data; the series must not just lose it."""
    files = _series_files()
    folder = _copy_series(tmp_path / "cut", files)
    first, last = sorted(folder.iterdir())[0], sorted(folder.iterdir())[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 200])  # encapsulated (JPEG 2000) pixels: nothing read
    with pytest.raises(VolumeError, match="truncated file") as error:
        read_volume(folder)
    assert last.name in str(error.value)
    last.write_bytes(data)

    plain = pydicom.dcmread(first)
    plain.decompress()  # native pixels: a cut file is read with short pixel data
    plain.save_as(first)
    native = first.read_bytes()
    first.write_bytes(native[: len(native) - 200])
    with pytest.raises(VolumeError, match="does not fit the image attributes") as error:
        read_volume(folder)
    assert first.name in str(error.value) and "plugin" not in str(error.value)

    del plain.PixelData  # cut right before its pixel data: the image attributes alone
    plain.save_as(first)
    with pytest.raises(VolumeError, match="an image slice without pixel data") as error:
        read_volume(folder)
    assert first.name in str(error.value)


def test_series_unreadable_file_is_named(tmp_path):
    folder = _copy_series(tmp_path / "junk", _series_files())
    (folder / "notes.txt").write_text("not a DICOM file\n")
    with pytest.raises(VolumeError, match="notes.txt"):
        read_volume(folder)


def test_two_series_error_names_uids_and_folder(tmp_path):
    files = _series_files()
    folder = _copy_series(tmp_path / "mixed", files)
    uids = ("1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202")
    for i, path in enumerate(files):
        ds = pydicom.dcmread(folder / path.name)
        ds.SeriesInstanceUID = uids[i % 2]
        ds.save_as(folder / path.name)
    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    message = str(info.value)
    assert str(folder) in message and uids[0] in message and uids[1] in message


def test_empty_and_set_uid_are_two_series(tmp_path):
    files = _series_files()
    folder = _copy_series(tmp_path / "half", files)
    ds = pydicom.dcmread(folder / files[0].name)
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.303"
    ds.save_as(folder / files[0].name)
    with pytest.raises(VolumeError, match=r"<empty> \(19 files\)"):
        read_volume(folder)


def test_missing_middle_slice_is_uneven_spacing(tmp_path):
    ordered = [p for _, p in _by_position(_series_files())]
    folder = _copy_series(tmp_path / "gap", ordered[:9] + ordered[10:])
    with pytest.raises(
        VolumeError, match=r"uneven slice spacing.*steps found \(mm\): 2, 4"
    ) as info:
        read_volume(folder)
    assert str(folder) in str(info.value)


def test_duplicate_position_is_an_error(tmp_path):
    files = _series_files()
    folder = _copy_series(tmp_path / "dup", files)
    shutil.copyfile(files[5], folder / "extra_copy")
    with pytest.raises(VolumeError, match="duplicate"):
        read_volume(folder)


def test_decoder_failure_names_file_and_syntax(tmp_path, monkeypatch):
    path = _series_files()[0]

    def fail(self):
        raise RuntimeError("no decoder")

    monkeypatch.setattr(Dataset, "pixel_array", property(fail))
    with pytest.raises(
        VolumeError, match=r"JPEG 2000.*1\.2\.840\.10008\.1\.2\.4\.90.*Pillow"
    ) as info:
        read_volume(path)
    assert path.name in str(info.value)


def test_missing_path(tmp_path):
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")


def test_non_dicom_file(tmp_path):
    path = tmp_path / "scan.dat"
    path.write_bytes(b"\x00" * 300)
    with pytest.raises(VolumeError, match="cannot read as DICOM"):
        read_volume(path)


# -- NIfTI -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "codes"), [("example_ct_sm", "RAS"), ("example_mr_sm", "LPS")])
def test_nifti_matches_canonical_nibabel(name, codes):
    path = _real(REAL / f"{name}.nii.gz")
    image = nib.load(path)
    assert "".join(nib.aff2axcodes(image.affine)) == codes
    canonical = nib.as_closest_canonical(image)
    volume = read_volume(path)
    assert volume.shape == canonical.shape[::-1]
    assert volume.spacing_mm == tuple(float(z) for z in canonical.header.get_zooms()[::-1])
    np.testing.assert_array_equal(volume.voxels, canonical.get_fdata().transpose(2, 1, 0))
    np.testing.assert_array_equal(volume.affine, canonical.affine)
    assert volume.modality is None


def test_nifti_lps_is_flipped_to_ras():
    path = _real(REAL / "example_mr_sm.nii.gz")
    on_disk = nib.load(path).get_fdata().transpose(2, 1, 0)
    np.testing.assert_array_equal(read_volume(path).voxels, on_disk[:, ::-1, ::-1])


def test_nifti_4d_needs_volume_index():
    path = _real(REAL / "nibabel_example4d.nii.gz")
    with pytest.raises(VolumeError, match="volume_index"):
        read_volume(path)
    with pytest.raises(VolumeError, match="outside"):
        read_volume(path, volume_index=2)
    canonical = nib.as_closest_canonical(nib.load(path))
    volume = read_volume(path, volume_index=1)
    assert volume.shape == (24, 96, 128)
    np.testing.assert_array_equal(volume.voxels, canonical.get_fdata()[..., 1].transpose(2, 1, 0))
    np.testing.assert_array_equal(volume.affine, canonical.affine)


def test_volume_index_rejected_for_3d():
    with pytest.raises(VolumeError, match="one volume"):
        read_volume(_real(REAL / "example_ct_sm.nii.gz"), volume_index=1)


# -- single DICOM files ----------------------------------------------------------------------
def test_multiframe_without_pixel_spacing(caplog):
    path = _real(REAL / "MR-MONO2-8-16x-heart.dcm")
    with caplog.at_level(logging.WARNING, logger="mmdiag.volumes"):
        volume = read_volume(path)
    assert volume.shape == (16, 256, 256)
    assert volume.spacing_mm == (10.0, 1.0, 1.0)
    assert "PixelSpacing" in caplog.text
    np.testing.assert_array_equal(volume.voxels, pydicom.dcmread(path).pixel_array)


def test_single_slice_ct_hu():
    path = _real(REAL / "CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.shape == (1, 128, 128)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    np.testing.assert_array_equal(volume.voxels[0], expected)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    assert volume.spacing_mm == (float(ds.SliceThickness), row_mm, col_mm)
    np.testing.assert_allclose(
        volume.index_to_world([0, 0, 0]), np.asarray(ds.ImagePositionPatient) * LPS_TO_RAS
    )


# -- synthetic series with a tilted orientation ----------------------------------------------
def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    a, b = np.radians(z_deg), np.radians(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


def _ds(values) -> list[str]:
    return [f"{v:.6f}" for v in values]


def _write_slice(path: Path, pixels: np.ndarray, series_uid: str, **tags) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


ROWS, COLS, ROW_MM, COL_MM, STEP_MM = 6, 4, 0.7, 0.8, 1.5


def _tilted_geometry(n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rotation = _rotation(30.0, 20.0)
    iop = np.asarray(_ds(np.concatenate([rotation[:, 0], rotation[:, 1]])), dtype=float)
    origin = np.array([-12.5, 30.25, 101.0])
    positions = [
        np.asarray(_ds(origin + k * STEP_MM * rotation[:, 2]), dtype=float) for k in range(n)
    ]
    return iop, positions


def _slice_pixels(k: int) -> np.ndarray:
    return (np.arange(ROWS * COLS).reshape(ROWS, COLS) + 100 * k).astype(np.int16)


def test_synthetic_tilted_series_affine(tmp_path):
    n = 5
    iop, positions = _tilted_geometry(n)
    folder = tmp_path / "tilted"
    folder.mkdir()
    uid = generate_uid()
    for rank, k in enumerate([3, 0, 4, 1, 2]):
        _write_slice(
            folder / f"slice{rank:02d}.dcm",
            _slice_pixels(k),
            uid,
            ImageOrientationPatient=_ds(iop),
            ImagePositionPatient=_ds(positions[k]),
            PixelSpacing=[str(ROW_MM), str(COL_MM)],
            SliceThickness="3",
            RescaleSlope="2",
            RescaleIntercept="-100",
            InstanceNumber=rank + 1,
        )
    volume = read_volume(folder)
    assert volume.shape == (n, ROWS, COLS)
    assert volume.spacing_mm == pytest.approx((STEP_MM, ROW_MM, COL_MM), abs=1e-5)
    for k in range(n):
        np.testing.assert_array_equal(volume.voxels[k], _slice_pixels(k) * 2.0 - 100.0)
    k, j, i = np.meshgrid(range(n), range(ROWS), range(COLS), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    written = (
        np.stack([positions[kk] for kk in ijk[:, 2]])
        + ijk[:, :1] * COL_MM * iop[:3]
        + ijk[:, 1:2] * ROW_MM * iop[3:]
    )
    np.testing.assert_allclose(volume.index_to_world(ijk), written * LPS_TO_RAS, atol=1e-5)


def test_synthetic_multiframe_ordered_by_frame_positions(tmp_path):
    n = 4
    iop, positions = _tilted_geometry(n)
    stored = [2, 0, 3, 1]
    per_frame = []
    for k in stored:
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = _ds(positions[k])
        group.PlanePositionSequence = [position]
        per_frame.append(group)
    orientation, measures, shared = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = _ds(iop)
    measures.PixelSpacing = [str(ROW_MM), str(COL_MM)]
    measures.SliceThickness = "1.5"
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    path = tmp_path / "enhanced.dcm"
    _write_slice(
        path,
        np.stack([_slice_pixels(k) for k in stored]),
        generate_uid(),
        NumberOfFrames=n,
        PerFrameFunctionalGroupsSequence=per_frame,
        SharedFunctionalGroupsSequence=[shared],
    )
    volume = read_volume(path)
    assert volume.shape == (n, ROWS, COLS)
    for k in range(n):
        np.testing.assert_array_equal(volume.voxels[k], _slice_pixels(k))
        np.testing.assert_allclose(
            volume.index_to_world([0, 0, k]), positions[k] * LPS_TO_RAS, atol=1e-5
        )
    assert volume.spacing_mm == pytest.approx((STEP_MM, ROW_MM, COL_MM), abs=1e-5)


def test_volume_validates_its_fields():
    with pytest.raises(VolumeError, match="3D"):
        Volume(np.zeros((2, 2)), (1.0, 1.0, 1.0), np.eye(4))
    with pytest.raises(VolumeError, match="positive"):
        Volume(np.zeros((1, 2, 2)), (0.0, 1.0, 1.0), np.eye(4))
    volume = Volume(np.zeros((1, 2, 2), dtype=np.int16), (1, 1, 1), np.eye(4))
    assert volume.voxels.dtype == np.float32 and volume.spacing_mm == (1.0, 1.0, 1.0)
