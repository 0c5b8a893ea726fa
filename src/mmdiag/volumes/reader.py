"""Read CT and MR volumes (NIfTI or DICOM) into one in-memory form, :class:`Volume`.

Conventions shared by every reader:

- ``Volume.voxels`` is a C-contiguous ``float32`` array with axes **(z, y, x)**: slice, row,
  column. ``voxels[k, j, i]`` is the voxel in slice ``k``, row ``j``, column ``i``.
- ``Volume.spacing_mm`` is the voxel size in millimetres in the same **(z, y, x)** order.
- ``Volume.affine`` is a 4x4 matrix mapping the voxel index column ``(i, j, k, 1)`` (note the
  **(x, y, z)** order, as in nibabel) to world coordinates in millimetres in the **RAS+**
  frame (+x = patient Right, +y = Anterior, +z = Superior). NIfTI affines are already RAS+;
  DICOM patient coordinates are LPS+, so the DICOM readers negate the first two world axes.

With these conventions a NIfTI file and a DICOM series of the same scan give the same
``affine`` and the same voxel order. For axial scans ``voxels[0]`` is the most inferior slice
(NIfTI after :func:`nibabel.as_closest_canonical`; DICOM after ordering slices by increasing
position along the slice normal).

:func:`read_volume` dispatches on the path: a folder is a DICOM series, ``.nii``/``.nii.gz``
is NIfTI, anything else is tried as a single DICOM file. Every failure is raised as
:class:`VolumeError`, whose message names the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NIFTI_SUFFIXES", "Volume", "VolumeError", "read_nifti", "read_volume"]

#: File-name endings read with nibabel; every other file is tried as DICOM.
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A volume is missing, unreadable, inconsistent, or cannot be processed as asked."""


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan with its voxel grid placed in world (RAS+, mm) coordinates.

    Parameters
    ----------
    voxels
        Intensities with axes (z, y, x); stored as C-contiguous ``float32``. CT values are
        Hounsfield units (rescale slope and intercept already applied).
    spacing_mm
        Voxel size in millimetres, (z, y, x) order.
    affine
        4x4 matrix mapping voxel indices ``(i=x, j=y, k=z, 1)`` to RAS+ millimetres.
    source
        The path the volume was read from (empty for volumes built in memory).
    modality
        DICOM modality (``"CT"``, ``"MR"``, ...) when known, else ``None``.
    """

    voxels: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    source: str = ""
    modality: str | None = None

    def __post_init__(self) -> None:
        voxels = np.ascontiguousarray(self.voxels, dtype=np.float32)
        if voxels.ndim != 3:
            raise VolumeError(f"voxels must be 3D (z, y, x), got shape {voxels.shape}")
        spacing = tuple(float(s) for s in self.spacing_mm)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise VolumeError(f"spacing_mm must be 3 positive numbers, got {self.spacing_mm}")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise VolumeError(f"affine must be 4x4, got shape {affine.shape}")
        object.__setattr__(self, "voxels", voxels)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "source", str(self.source))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid size in (z, y, x) order."""
        return tuple(int(n) for n in self.voxels.shape)  # type: ignore[return-value]

    def index_to_world(self, ijk: np.ndarray | list[float]) -> np.ndarray:
        """Map voxel indices ``(i=x, j=y, k=z)`` (shape ``(3,)`` or ``(n, 3)``) to RAS+ mm.

        Indices may be fractional; the result has the same leading shape as ``ijk``.
        """
        points = np.asarray(ijk, dtype=np.float64)
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]


def read_volume(path: str | os.PathLike, *, volume_index: int | None = None) -> Volume:
    """Read a NIfTI file, a DICOM series folder, or a single DICOM file as a :class:`Volume`.

    Parameters
    ----------
    path
        A ``.nii``/``.nii.gz`` file, a folder holding exactly one DICOM series, or one DICOM
        file (single-slice or multi-frame).
    volume_index
        Which volume of a 4D NIfTI (e.g. fMRI) to read. 4D inputs with more than one volume
        need it, because silently taking the first volume would hide a wrong input; for 3D
        inputs only ``None`` or ``0`` is accepted.

    Returns
    -------
    Volume
        See the module docstring for the axis order, spacing and affine conventions.

    Raises
    ------
    VolumeError
        The path is missing or unreadable, or its contents break the rules of the reader
        (several DICOM series, uneven slice spacing, duplicate slice positions, ...).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(path, volume_index=volume_index)
    _check_single_volume_index(path, volume_index)
    from mmdiag.volumes import dicom

    if path.is_dir():
        return dicom.read_dicom_series(path)
    return dicom.read_dicom_file(path)


def read_nifti(path: str | os.PathLike, *, volume_index: int | None = None) -> Volume:
    """Read a NIfTI file reoriented to the closest RAS+ axes (nibabel's canonical form).

    Voxels come from ``get_fdata(dtype=float32)``, which applies ``scl_slope``/``scl_inter``;
    they are transposed from nibabel's (x, y, z) to (z, y, x). The spacing is the canonical
    header's zooms reversed and the affine is the canonical affine. Trailing axes of size 1
    (shape ``(x, y, z, 1)``) are dropped; see :func:`read_volume` for ``volume_index``.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.as_closest_canonical(nib.load(path))
    except Exception as exc:  # nibabel raises many types for corrupt or foreign files
        raise VolumeError(f"{path}: cannot read as NIfTI ({exc})") from exc
    image = _select_nifti_volume(image, path, volume_index)
    try:
        data = image.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot decode the NIfTI voxels ({exc})") from exc
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return Volume(
        voxels=data.reshape(data.shape[:3]).transpose(2, 1, 0),
        spacing_mm=zooms[::-1],
        affine=image.affine,
        source=str(path),
    )


def _select_nifti_volume(image, path: Path, volume_index: int | None):
    """Return a 3D image: ``image`` itself, or the volume ``volume_index`` of a 4D image."""
    shape = tuple(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or len(shape) > 4:
        raise VolumeError(f"{path}: expected a 3D or 4D NIfTI, got shape {image.shape}")
    if len(shape) == 3:
        _check_single_volume_index(path, volume_index)
        return image
    if volume_index is None:
        raise VolumeError(
            f"{path}: 4D NIfTI with {shape[3]} volumes (shape {image.shape}); "
            "pass volume_index to choose one"
        )
    if not 0 <= volume_index < shape[3]:
        raise VolumeError(f"{path}: volume_index {volume_index} outside 0..{shape[3] - 1}")
    return image.slicer[:, :, :, volume_index]


def _check_single_volume_index(path: Path, volume_index: int | None) -> None:
    """Reject a ``volume_index`` other than ``None``/``0`` for an input holding one volume."""
    if volume_index not in (None, 0):
        raise VolumeError(
            f"{path}: volume_index {volume_index} given, but the input holds one volume"
        )
