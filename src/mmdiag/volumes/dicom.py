"""Read DICOM series folders and single DICOM files as :class:`~mmdiag.volumes.reader.Volume`.

Rules, chosen so that a wrong input fails loudly instead of giving a silently wrong volume:

- **Series folder.** Every regular, non-hidden file in the folder (not its subfolders) is read.
  A file pydicom cannot parse raises :class:`VolumeError` naming it (a dropped end slice would
  not show as a gap); DICOM files without pixel data (``DICOMDIR``, reports, presentation
  states) are skipped. All files must share one ``SeriesInstanceUID``; an empty or missing UID
  (de-identified data) counts as one series of its own. A folder holding one image file is
  read like that file.
- **Slice order.** Slices are ordered by increasing ``ImagePositionPatient . n``, where the
  slice normal ``n = row cosine x column cosine`` of ``ImageOrientationPatient``; never by file
  name, listing order or ``InstanceNumber``. All slices must share orientation, rows, columns
  and pixel spacing.
- **Slice spacing.** The position steps along the normal must be uniform: a step may differ
  from the median step by at most ``max(SPACING_ATOL_MM, SPACING_RTOL * median)``, and the
  positions must lie on one straight line within the same tolerance. Uneven series raise an
  error listing the steps found; they are not resampled. Steps within ``SPACING_ATOL_MM`` of
  zero are duplicate positions and raise an error naming the files. ``spacing_mm[0]`` is the
  mean step, not ``SliceThickness`` (slices may overlap or have gaps).
- **Intensities.** ``pixel_array * RescaleSlope + RescaleIntercept`` per slice or frame
  (slope 1 and intercept 0 when absent), as ``float32``; CT voxels are Hounsfield units.
  Modality LUT sequences, VOI windows and colour images are not supported.
- **Affine.** Built from the first slice after ordering: the i column is the row cosine times
  the column spacing (``PixelSpacing[1]``), the j column the column cosine times the row
  spacing (``PixelSpacing[0]``), the k column the mean position step vector, the origin its
  ``ImagePositionPatient``; then LPS+ is turned into RAS+ by negating the first two world axes.
  For a tilted-gantry series the k column is not parallel to the normal, so the affine maps
  every voxel to the position written in its file.
- **Single-slice file.** One slice (z = 1) whose z spacing is ``SliceThickness``, else
  ``SpacingBetweenSlices``; the k column is the slice normal times that spacing.
- **Multi-frame file** (``NumberOfFrames > 1``). Frames become slices. When every frame has a
  ``PlanePositionSequence`` in ``PerFrameFunctionalGroupsSequence``, frames are ordered and
  checked like a series; otherwise they keep their stored order and the z spacing is
  ``SpacingBetweenSlices``, else ``SliceThickness``. Orientation, pixel spacing and rescale are
  looked up per frame, then in ``SharedFunctionalGroupsSequence``, then at the top level.
- **Missing geometry.** Without ``PixelSpacing`` (or z spacing) 1.0 mm is used; without
  ``ImageOrientationPatient``/``ImagePositionPatient`` an axial orientation (rows along +x,
  columns along +y in LPS) at the origin is assumed. Each fallback logs a warning. Series with
  several slices must have positions and orientations, since nothing else can order them.
- **Compressed transfer syntaxes.** pydicom decodes them through its plugins (JPEG 2000 via
  Pillow or pylibjpeg). A failure raises :class:`VolumeError` naming the file, the transfer
  syntax and what to install.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from mmdiag.volumes.reader import Volume, VolumeError

__all__ = [
    "DEFAULT_SPACING_MM",
    "LPS_TO_RAS",
    "ORIENTATION_ATOL",
    "SPACING_ATOL_MM",
    "SPACING_RTOL",
    "read_dicom_file",
    "read_dicom_series",
]

log = logging.getLogger(__name__)

#: Turns DICOM patient coordinates (LPS+) into RAS+ (applied on the left of an affine).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Absolute tolerance (mm) for uneven slice steps, straight-line drift and duplicate positions.
SPACING_ATOL_MM = 0.01
#: Relative tolerance (fraction of the median step) for uneven slice steps.
SPACING_RTOL = 0.01
#: Tolerance on direction cosines and pixel spacings when checking slices agree.
ORIENTATION_ATOL = 1e-4
#: Spacing used when the files give none (a warning is logged).
DEFAULT_SPACING_MM = 1.0
#: Orientation assumed when the files give none: rows along +x, columns along +y (LPS).
DEFAULT_ORIENTATION = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
#: Tags of ``FrameIncrementPointer`` meaning the frames are time points, not slices.
TEMPORAL_POINTERS = frozenset({0x00181063, 0x00181065})
FUNCTIONAL_GROUPS = (
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
)


@dataclass(frozen=True, eq=False)
class _Plane:
    """Geometry and rescale of one 2D image: a slice file or one frame of a file."""

    label: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: np.ndarray | None
    slice_thickness: float | None
    spacing_between: float | None
    rows: int
    columns: int
    slope: float
    intercept: float


@dataclass(frozen=True, eq=False)
class _Stack:
    """How planes become slices: order, z spacing, and LPS step, orientation and origin."""

    order: list[int]
    spacing_z: float
    step: np.ndarray
    orientation: np.ndarray
    origin: np.ndarray


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read the one DICOM series held in ``folder``; see the module docstring for the rules."""
    folder = Path(folder)
    images = _read_folder(folder)
    _check_one_series(folder, images)
    if len(images) == 1:
        path, ds = images[0]
        return _volume_from_dataset(ds, path)
    for path, ds in images:
        if _frame_count(ds) > 1:
            raise VolumeError(
                f"{folder}: {path.name} is a multi-frame file inside a series of "
                f"{len(images)} files; read it on its own"
            )
    planes = [_plane(path.name, ds, [ds], [ds]) for path, ds in images]
    _check_consistent(planes, folder)
    stack = _ordered_stack(planes, folder)
    pixels = np.stack([_decode(ds, path) for path, ds in images])
    return _build_volume(planes, pixels, stack, source=folder, modality=_modality(images[0][1]))


def read_dicom_file(path: str | os.PathLike) -> Volume:
    """Read one DICOM file: a single slice, or a multi-frame image whose frames are slices."""
    path = Path(path)
    ds = _read_dataset(path)
    if "PixelData" not in ds:
        raise VolumeError(f"{path}: DICOM file without pixel data")
    return _volume_from_dataset(ds, path)


def _volume_from_dataset(ds: Dataset, path: Path) -> Volume:
    """Build the volume of one image file, single-slice or multi-frame."""
    frames = _frame_count(ds)
    pixels = _decode(ds, path)
    if frames == 1:
        planes = [_plane(path.name, ds, [ds], [ds])]
        pixels = pixels[np.newaxis]
        stack = _unordered_stack(planes, planes[0].position, path, prefer_thickness=True)
        return _build_volume(planes, pixels, stack, source=path, modality=_modality(ds))
    _warn_if_temporal(ds, path)
    planes = [
        _plane(f"{path.name} frame {f + 1}", ds, _frame_positions(ds, f), _frame_sources(ds, f))
        for f in range(frames)
    ]
    _check_consistent(planes, path)
    if all(p.position is not None and p.orientation is not None for p in planes):
        stack = _ordered_stack(planes, path)
    else:
        origin = _vector([ds], "ImagePositionPatient", 3, path.name)
        stack = _unordered_stack(planes, origin, path, prefer_thickness=False)
    return _build_volume(planes, pixels, stack, source=path, modality=_modality(ds))


def _read_folder(folder: Path) -> list[tuple[Path, Dataset]]:
    """Read every non-hidden file of ``folder``; keep those holding pixel data.

    Files that are no image (a DICOMDIR, a report: no ``Rows``) are skipped. An image file
    without pixel data, or a file of which nothing could be read, is an error: pydicom reads a
    file cut inside its pixel data as one without it (or, for encapsulated pixel data, as an
    empty dataset), and skipping it would silently shorten the volume.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = []
    for path in files:
        ds = _read_dataset(path)
        if "PixelData" in ds:
            images.append((path, ds))
        elif "Rows" in ds:
            raise VolumeError(f"{path}: an image slice without pixel data (truncated file?)")
        else:
            log.debug("%s: no image, skipped", path)
    if not images:
        raise VolumeError(f"{folder}: no DICOM files with pixel data")
    return images


def _read_dataset(path: Path) -> Dataset:
    """Parse one DICOM file, turning any pydicom or OS failure into :class:`VolumeError`."""
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for foreign or truncated files
        raise VolumeError(f"{path}: cannot read as DICOM ({type(exc).__name__}: {exc})") from exc
    if len(dataset) == 0:  # what pydicom returns for a file cut inside encapsulated pixels
        raise VolumeError(f"{path}: no DICOM element could be read (truncated file?)")
    return dataset


def _check_one_series(folder: Path, images: list[tuple[Path, Dataset]]) -> None:
    """Raise unless all files share one ``SeriesInstanceUID`` (empty counts as one value)."""
    files_by_uid: dict[str, list[str]] = defaultdict(list)
    for path, ds in images:
        files_by_uid[str(ds.get("SeriesInstanceUID", "") or "")].append(path.name)
    if len(files_by_uid) > 1:
        listing = "; ".join(
            f"{uid_ or '<empty>'} ({len(names)} files)" for uid_, names in files_by_uid.items()
        )
        raise VolumeError(
            f"{folder}: holds {len(files_by_uid)} DICOM series, expected one per folder; "
            f"SeriesInstanceUIDs: {listing}"
        )


def _frame_count(ds: Dataset) -> int:
    """``NumberOfFrames`` (1 when absent or empty)."""
    return int(ds.get("NumberOfFrames") or 1)


def _frame_positions(ds: Dataset, frame: int) -> list[Dataset | None]:
    """Where a frame's own position may be: its per-frame ``PlanePositionSequence`` only."""
    return [_group_item(ds, "PerFrameFunctionalGroupsSequence", frame, "PlanePositionSequence")]


def _frame_sources(ds: Dataset, frame: int) -> list[Dataset | None]:
    """Datasets to search, in order, for a frame's orientation, pixel measures and rescale."""
    per_frame = [
        _group_item(ds, "PerFrameFunctionalGroupsSequence", frame, name)
        for name in FUNCTIONAL_GROUPS
    ]
    shared = [
        _group_item(ds, "SharedFunctionalGroupsSequence", 0, name) for name in FUNCTIONAL_GROUPS
    ]
    return [*per_frame, *shared, ds]


def _group_item(ds: Dataset, groups: str, index: int, name: str) -> Dataset | None:
    """First item of functional group ``name`` in item ``index`` of ``groups``, if any."""
    items = ds.get(groups)
    if not items or index >= len(items):
        return None
    inner = items[index].get(name)
    return inner[0] if inner else None


def _first(sources: list[Dataset | None], keyword: str):
    """The first non-empty value of ``keyword`` among ``sources`` (``None`` if none has it)."""
    for source in sources:
        if source is not None:
            value = source.get(keyword)
            if value is not None and value != "":
                return value
    return None


def _vector(sources: list, keyword: str, size: int, label: str) -> np.ndarray | None:
    """A multi-valued tag as a float array of ``size`` numbers (``None`` when absent)."""
    value = _first(sources, keyword)
    if value is None:
        return None
    array = np.asarray([float(v) for v in value], dtype=np.float64)
    if array.shape != (size,):
        raise VolumeError(f"{label}: {keyword} has {array.size} values, expected {size}")
    return array


def _number(value, default: float | None = None) -> float | None:
    """A single-valued numeric tag as float (``default`` when absent)."""
    return default if value is None else float(value)


def _plane(label: str, ds: Dataset, position_sources: list, sources: list) -> _Plane:
    """Collect the geometry and rescale of one slice or frame."""
    if ds.get("Rows") is None or ds.get("Columns") is None:
        raise VolumeError(f"{label}: Rows or Columns missing")
    return _Plane(
        label=label,
        position=_vector(position_sources, "ImagePositionPatient", 3, label),
        orientation=_vector(sources, "ImageOrientationPatient", 6, label),
        pixel_spacing=_vector(sources, "PixelSpacing", 2, label),
        slice_thickness=_number(_first(sources, "SliceThickness")),
        spacing_between=_number(_first(sources, "SpacingBetweenSlices")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=_number(_first(sources, "RescaleSlope"), 1.0),
        intercept=_number(_first(sources, "RescaleIntercept"), 0.0),
    )


def _check_consistent(planes: list[_Plane], where: Path) -> None:
    """Raise unless all planes share rows, columns, orientation and pixel spacing."""
    ref = planes[0]
    for plane in planes[1:]:
        if (plane.rows, plane.columns) != (ref.rows, ref.columns):
            raise VolumeError(
                f"{where}: {plane.label} is {plane.rows}x{plane.columns} pixels but "
                f"{ref.label} is {ref.rows}x{ref.columns}"
            )
        for name in ("orientation", "pixel_spacing"):
            a, b = getattr(ref, name), getattr(plane, name)
            if (a is None) != (b is None) or (
                a is not None and not np.allclose(a, b, rtol=0, atol=ORIENTATION_ATOL)
            ):
                raise VolumeError(
                    f"{where}: {plane.label} has {name} {_fmt(b)} but {ref.label} has {_fmt(a)}"
                )


def _fmt(values: np.ndarray | None) -> str:
    """Short printable form of a vector for error messages."""
    return "none" if values is None else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _normal(orientation: np.ndarray) -> np.ndarray:
    """Unit slice normal: row cosine x column cosine."""
    normal = np.cross(orientation[:3], orientation[3:])
    length = np.linalg.norm(normal)
    if length < 1e-6:
        raise VolumeError(f"ImageOrientationPatient {_fmt(orientation)} has parallel cosines")
    return normal / length


def _ordered_stack(planes: list[_Plane], where: Path) -> _Stack:
    """Order planes along the slice normal and check they are unique and evenly spaced."""
    missing = [p.label for p in planes if p.position is None or p.orientation is None]
    if missing:
        raise VolumeError(
            f"{where}: cannot order slices without ImagePositionPatient and "
            f"ImageOrientationPatient; missing in {', '.join(missing[:5])}"
        )
    positions = np.stack([p.position for p in planes])
    along = positions @ _normal(planes[0].orientation)
    order = [int(i) for i in np.argsort(along, kind="stable")]
    steps = np.diff(along[order])
    _check_no_duplicates(planes, order, steps, where)
    _check_even_steps(steps, where)
    ordered = positions[order]
    step = (ordered[-1] - ordered[0]) / (len(order) - 1)
    _check_straight_line(ordered, step, where)
    spacing_z = float(along[order[-1]] - along[order[0]]) / (len(order) - 1)
    return _Stack(order, spacing_z, step, planes[0].orientation, ordered[0])


def _check_no_duplicates(planes: list[_Plane], order: list[int], steps, where: Path) -> None:
    """Raise if two slices sit at the same position along the normal."""
    for k in np.flatnonzero(steps <= SPACING_ATOL_MM):
        first, second = planes[order[k]], planes[order[k + 1]]
        raise VolumeError(
            f"{where}: {first.label} and {second.label} share the slice position "
            f"{_fmt(first.position)} mm (duplicate slices)"
        )


def _check_even_steps(steps: np.ndarray, where: Path) -> None:
    """Raise if the steps between consecutive slice positions are not all the same."""
    median = float(np.median(steps))
    tolerance = max(SPACING_ATOL_MM, SPACING_RTOL * median)
    if np.any(np.abs(steps - median) > tolerance):
        found = ", ".join(f"{s:g}" for s in np.unique(np.round(steps, 4)))
        raise VolumeError(
            f"{where}: uneven slice spacing along the slice normal; steps found (mm): "
            f"{found}; expected one step within {tolerance:g} mm (missing slices?). "
            "Uneven series are not resampled."
        )


def _check_straight_line(ordered: np.ndarray, step: np.ndarray, where: Path) -> None:
    """Raise if the slice positions drift off the line ``first + k * step``."""
    expected = ordered[0] + np.arange(len(ordered))[:, np.newaxis] * step
    drift = float(np.max(np.linalg.norm(ordered - expected, axis=1)))
    if drift > max(SPACING_ATOL_MM, SPACING_RTOL * float(np.linalg.norm(step))):
        raise VolumeError(
            f"{where}: slice positions do not lie on one straight line (off by up to {drift:g} mm)"
        )


def _unordered_stack(
    planes: list[_Plane], origin: np.ndarray | None, where: Path, *, prefer_thickness: bool
) -> _Stack:
    """Keep the stored order; take the z spacing from the slice-thickness tags."""
    ref = planes[0]
    candidates = [ref.slice_thickness, ref.spacing_between]
    if not prefer_thickness:
        candidates.reverse()
    spacing = next((c for c in candidates if c is not None and c > 0), None)
    if spacing is None:
        log.warning(
            "%s: no SliceThickness or SpacingBetweenSlices; using %g mm between slices",
            where,
            DEFAULT_SPACING_MM,
        )
        spacing = DEFAULT_SPACING_MM
    orientation = ref.orientation
    if orientation is None:
        log.warning("%s: no ImageOrientationPatient; assuming axial orientation", where)
        orientation = DEFAULT_ORIENTATION
    if origin is None:
        log.warning("%s: no ImagePositionPatient; placing the first voxel at 0 mm", where)
        origin = np.zeros(3)
    step = _normal(orientation) * spacing
    return _Stack(list(range(len(planes))), spacing, step, orientation, origin)


def _pixel_spacing(plane: _Plane, where: Path) -> np.ndarray:
    """The plane's (row, column) spacing, or 1.0 mm with a warning."""
    if plane.pixel_spacing is not None:
        return plane.pixel_spacing
    log.warning("%s: no PixelSpacing; using %g mm pixels", where, DEFAULT_SPACING_MM)
    return np.array([DEFAULT_SPACING_MM, DEFAULT_SPACING_MM])


def _build_volume(
    planes: list[_Plane], pixels: np.ndarray, stack: _Stack, *, source: Path, modality
) -> Volume:
    """Rescale and order the pixels, and place them in RAS+ space."""
    voxels = np.empty((len(stack.order), *pixels.shape[1:]), dtype=np.float32)
    for k, index in enumerate(stack.order):
        plane = planes[index]
        voxels[k] = pixels[index] * np.float64(plane.slope) + np.float64(plane.intercept)
    spacing = _pixel_spacing(planes[stack.order[0]], source)
    affine = _affine(stack.orientation, spacing, stack.origin, stack.step)
    return Volume(
        voxels=voxels,
        spacing_mm=(stack.spacing_z, float(spacing[0]), float(spacing[1])),
        affine=affine,
        source=str(source),
        modality=modality,
    )


def _affine(
    orientation: np.ndarray, pixel_spacing: np.ndarray, origin: np.ndarray, step: np.ndarray
) -> np.ndarray:
    """RAS+ affine of voxel indices (i=column, j=row, k=slice) from DICOM LPS geometry."""
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * pixel_spacing[1]
    lps[:3, 1] = orientation[3:] * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _modality(ds: Dataset) -> str | None:
    """The DICOM ``Modality`` (``None`` when absent or empty)."""
    return str(ds.get("Modality") or "") or None


def _warn_if_temporal(ds: Dataset, path: Path) -> None:
    """Warn when ``FrameIncrementPointer`` says the frames are time points."""
    pointer = ds.get("FrameIncrementPointer")
    tags = list(pointer) if isinstance(pointer, MultiValue) else [pointer]
    if pointer is not None and any(int(t) in TEMPORAL_POINTERS for t in tags):
        log.warning("%s: frames are successive time points; stacking them as slices", path)


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """Decode the pixel data of ``ds``, naming the file and transfer syntax on failure."""
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise VolumeError(f"{path}: {ds.SamplesPerPixel} samples per pixel; only grey images")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoder plugins raise many types
        syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
        name = f"{syntax.name} ({syntax})" if syntax else "unknown"
        raise VolumeError(
            f"{path}: cannot decode pixel data with transfer syntax {name}: {exc}. "
            f"{_decoder_hint(syntax)}"
        ) from exc


def _decoder_hint(syntax: uid.UID | None) -> str:
    """What to install so pydicom can decode ``syntax`` (for uncompressed pixels: what is
    wrong, since no plugin is involved)."""
    if syntax is not None and syntax.is_transfer_syntax and not syntax.is_compressed:
        return "Uncompressed pixel data that does not fit the image attributes: a damaged file."
    if syntax in uid.JPEG2000TransferSyntaxes:
        return "Install Pillow with OpenJPEG support, or pylibjpeg with pylibjpeg-openjpeg."
    if syntax in uid.JPEGLSTransferSyntaxes:
        return "Install pylibjpeg with pylibjpeg-libjpeg, or pyjpegls."
    if syntax in uid.JPEGTransferSyntaxes:
        return "Install pylibjpeg with pylibjpeg-libjpeg (Pillow decodes baseline JPEG only)."
    if syntax in uid.RLETransferSyntaxes:
        return "Install pylibjpeg with pylibjpeg-rle, or check that the file is not truncated."
    return "Install a pydicom pixel-data plugin for it (pylibjpeg or python-gdcm)."
