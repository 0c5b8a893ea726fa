"""Write a synthetic CT volume as a DICOM series, one CT Image Storage file per slice.

The files look like a scanner export: Explicit VR Little Endian with a proper file meta
header, stored pixel values ``HU + 1024`` as unsigned 16-bit words with
``RescaleIntercept -1024`` / ``RescaleSlope 1``, and (by default) random hexadecimal file
names, so a reader must order slices by ``ImagePositionPatient`` rather than by file
name. Every UID, name and date is derived from the seed or fixed, never from the clock,
so the same inputs always give the same bytes.

Geometry: the volume is indexed ``[x, y, z]`` as in :mod:`mmdiag.synth.volumes`. Array
axis 0 runs along the row direction cosine (``ImageOrientationPatient[:3]``, the
DICOM column index), axis 1 along the column direction cosine (the DICOM row index) and
axis 2 along their cross product, slice ``k`` sitting at
``origin_mm + k * spacing_mm[2] * normal``. Coordinates are DICOM patient coordinates
(LPS); with the identity orientation a NIfTI (RAS) converter flips the first two axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RESCALE_INTERCEPT = -1024
IDENTITY_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["mmdiag.synth.dicom"])
IMPLEMENTATION_VERSION_NAME = "MMDIAG_SYNTH_1"
_NAME_SPACE = 16**12  # random file names are 12 hexadecimal digits


def _ds(value: float) -> str:
    """Format a Decimal String value reproducibly (at most 16 characters, no ``-0``)."""
    return f"{float(value) + 0.0:.10g}"


def _orientation_axes(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(row_cosine, column_cosine, slice_normal)``; require an orthonormal pair."""
    cosines = np.asarray(orientation, dtype=np.float64)
    if cosines.shape != (6,):
        raise ValueError(f"orientation needs 6 direction cosines, got {orientation}")
    row, column = cosines[:3], cosines[3:]
    orthonormal = (
        abs(np.linalg.norm(row) - 1) < 1e-6
        and abs(np.linalg.norm(column) - 1) < 1e-6
        and abs(row @ column) < 1e-6
    )
    if not orthonormal:
        raise ValueError(f"orientation cosines must be two orthonormal vectors, got {orientation}")
    return row, column, np.cross(row, column)


def _stored_slices(hu_xyz: np.ndarray, bits_stored: int) -> np.ndarray:
    """Return stored values ``HU + 1024`` as uint16, indexed ``[z, row, column]``.

    Raises ``ValueError`` when a value does not fit in ``bits_stored`` unsigned bits.
    """
    stored = np.asarray(hu_xyz).astype(np.int64) - RESCALE_INTERCEPT
    if stored.min() < 0 or stored.max() > 2**bits_stored - 1:
        raise ValueError(
            f"HU range [{stored.min() + RESCALE_INTERCEPT}, {stored.max() + RESCALE_INTERCEPT}] "
            f"does not fit {bits_stored} stored bits with intercept {RESCALE_INTERCEPT}"
        )
    return np.ascontiguousarray(stored.transpose(2, 1, 0)).astype("<u2")


def _file_names(rng: np.random.Generator, n_slices: int, shuffle: bool) -> list[str]:
    """File name of each slice: random hex names whose sorted order is not slice order
    (for two or more slices), or ``slice_0001.dcm``... when ``shuffle`` is false."""
    if not shuffle:
        return [f"slice_{k + 1:04d}.dcm" for k in range(n_slices)]
    codes = rng.choice(_NAME_SPACE, size=n_slices, replace=False)
    if n_slices > 1 and np.all(np.diff(codes) > 0):
        codes[[0, 1]] = codes[[1, 0]]  # listing order must not reveal slice order
    return [f"{int(code):012x}.dcm" for code in codes]


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    """File meta information of one CT slice, Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _series_dataset(
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    series_description: str,
    study_date: str,
    study_time: str,
    shape_rc: tuple[int, int],
    spacing_mm: Sequence[float],
    orientation: np.ndarray,
    bits_stored: int,
) -> Dataset:
    """The attributes every slice of the series shares (patient, study, series, image)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "mmdiag synthetic"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = series_description
    ds.PatientName = f"SYNTH^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(spacing_mm[1]), _ds(spacing_mm[0])]  # row, column spacing
    ds.SliceThickness = _ds(spacing_mm[2])
    ds.SpacingBetweenSlices = _ds(spacing_mm[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape_rc
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def series_uids(rng: np.random.Generator, patient_id: str, series_number: int) -> dict[str, str]:
    """Deterministic study, series and frame-of-reference UIDs drawn from ``rng``.

    One 128-bit token from ``rng`` plus the patient and series number feed
    :func:`pydicom.uid.generate_uid`, so the UIDs are unique per seed yet reproducible.
    """
    token = rng.bytes(16).hex()
    base = ["mmdiag.synth.dicom", token, str(patient_id)]
    return {
        "study": generate_uid(entropy_srcs=[*base, "study"]),
        "series": generate_uid(entropy_srcs=[*base, "series", str(series_number)]),
        "frame": generate_uid(entropy_srcs=[*base, "frame", str(series_number)]),
    }


def write_dicom_series(
    folder: str | os.PathLike,
    hu_xyz: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    rng: np.random.Generator | int,
    patient_id: str,
    series_number: int = 1,
    study_uid: str | None = None,
    series_uid: str | None = None,
    orientation: Sequence[float] = IDENTITY_ORIENTATION,
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    shuffle_names: bool = True,
    bits_stored: int = 16,
    study_date: str = "20000101",
    study_time: str = "120000",
    series_description: str = "synthetic CT",
) -> list[Path]:
    """Write ``hu_xyz`` as a CT DICOM series, one file per slice, into ``folder``.

    Parameters
    ----------
    folder : path
        Folder to write into (created if missing); should hold only this series, as the
        manifest reads a DICOM folder as one series.
    hu_xyz : numpy.ndarray
        Integer Hounsfield units indexed ``[x, y, z]`` (see the module notes for how the
        axes map onto patient space); values must lie in ``[-1024, 2**bits_stored - 1025]``.
    spacing_mm : sequence of 3
        Voxel size (mm) along ``(x, y, z)``; ``spacing_mm[2]`` is the slice thickness and
        the distance between slice positions.
    rng : numpy.random.Generator or int, keyword-only
        Seeded source of the UIDs (unless given) and the file names.
    patient_id : str, keyword-only
        ``PatientID`` (``PatientName`` becomes ``SYNTH^<patient_id>``).
    series_number : int, keyword-only
        ``SeriesNumber``; also enters the derived series UID.
    study_uid, series_uid : str, optional, keyword-only
        Override the derived UIDs, e.g. to put several series in one study.
    orientation : sequence of 6 float, keyword-only
        ``ImageOrientationPatient`` (row then column direction cosines, orthonormal).
    origin_mm : sequence of 3 float, keyword-only
        ``ImagePositionPatient`` of the first slice's first voxel.
    shuffle_names : bool, keyword-only
        Random 12-digit hexadecimal file names whose sorted order differs from the slice
        order; otherwise ``slice_0001.dcm``, ``slice_0002.dcm``...
    bits_stored : int, keyword-only
        16 or 12 (``HighBit`` is ``bits_stored - 1``; ``BitsAllocated`` is always 16).
    study_date, study_time, series_description : str, keyword-only
        Fixed ``StudyDate``/``SeriesDate``/``ContentDate``, the matching times, and
        ``SeriesDescription``.

    Returns
    -------
    list of Path
        The written files in slice order (``InstanceNumber`` 1, 2, ...).

    Notes
    -----
    Side effects: writes one file per slice (not atomically). Same inputs and generator
    state give the same bytes.
    """
    hu_xyz = np.asarray(hu_xyz)
    if hu_xyz.ndim != 3 or len(spacing_mm) != 3 or len(origin_mm) != 3:
        raise ValueError("hu_xyz must be 3-D and spacing_mm, origin_mm need 3 entries each")
    if bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, got {bits_stored}")
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    row, column, normal = _orientation_axes(orientation)
    stored = _stored_slices(hu_xyz, bits_stored)
    uids = series_uids(rng, patient_id, series_number)
    names = _file_names(rng, stored.shape[0], shuffle_names)
    series_uid = series_uid or uids["series"]
    shared = _series_dataset(
        patient_id=patient_id,
        study_uid=study_uid or uids["study"],
        series_uid=series_uid,
        frame_uid=uids["frame"],
        series_number=series_number,
        series_description=series_description,
        study_date=study_date,
        study_time=study_time,
        shape_rc=stored.shape[1:],
        spacing_mm=spacing_mm,
        orientation=np.concatenate([row, column]),
        bits_stored=bits_stored,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    origin = np.asarray(origin_mm, dtype=np.float64)
    paths = []
    for k, (pixels, name) in enumerate(zip(stored, names, strict=True)):
        position = origin + k * float(spacing_mm[2]) * normal
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
        ds = _slice_dataset(shared, sop_uid, k, position, normal, pixels)
        paths.append(folder / name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _slice_dataset(
    shared: Dataset,
    sop_uid: str,
    k: int,
    position: np.ndarray,
    normal: np.ndarray,
    pixels: np.ndarray,
) -> Dataset:
    """One slice: the shared attributes plus instance UID, number, position and pixels."""
    ds = Dataset()
    ds.update(shared)
    ds.file_meta = _file_meta(sop_uid)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(position @ normal)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds
