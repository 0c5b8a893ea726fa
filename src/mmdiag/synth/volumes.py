"""Synthetic CT volumes (Hounsfield-like int16) written as NIfTI.

A volume holds an elliptic body cylinder (soft tissue about 40 HU under a thin fat
layer, air -1000 HU outside), a kidney-like organ and one enhancing lesion (brighter
than the surrounding tissue). Shapes are drawn in millimetres, so the lesion stays
round whatever the voxel spacing.

Two renderers share the anatomy:

- :func:`render_ct` plants the disease signal of the demo cohort: the lesion radius
  depends on the disease (:data:`LESION_RADIUS_MM`) and the lesion is a flat 130 HU.
- :func:`render_ct_lesion` plants an ordinal class signal (a grade ``0 .. n_grades-1``)
  in the lesion radius, enhancement and texture, scaled by ``signal_strength`` so a
  benchmark can dial the class information from none (0) to full (1).

Axis convention: every array here is indexed ``[x, y, z]`` and :func:`write_nifti`
writes it with a diagonal affine, so array index ``k`` along the last axis is slice
``k`` of the written volume (z increases with ``k``).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
ORGAN_HU = 30
LESION_HU = 130
LESION_RADIUS_MM = {"IgAN": 6.0, "MN": 9.0, "LN": 12.0}

# Ordinal lesion appearance, (lowest grade, highest grade) at signal strength 1.
GRADE_RADIUS_FRACTION = (0.12, 0.32)  # of the body's short semi-axis
GRADE_ENHANCEMENT_HU = (80.0, 200.0)
GRADE_TEXTURE_HU = (4.0, 30.0)  # standard deviation of the smooth intra-lesion pattern
SIGNAL_FEATURES = ("radius", "enhancement", "texture")
_TEXTURE_SCALE_MM = 2.0
_LESION_RADIUS_CAP = 0.25  # render_ct: radius at most this fraction of the body's short axis


def _check_geometry(shape_vox: Sequence[int], spacing_mm: Sequence[float]) -> None:
    """Raise ``ValueError`` unless shape and spacing have three entries each."""
    if len(shape_vox) != 3 or len(spacing_mm) != 3:
        raise ValueError(f"shape_vox and spacing_mm need 3 entries, got {shape_vox}, {spacing_mm}")


def millimetre_grid(
    shape_vox: Sequence[int], spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(xx, yy, zz)``, the millimetre coordinates of every voxel.

    Coordinates are relative to the volume centre and indexed ``[x, y, z]`` (float32),
    so shapes drawn on them keep their size in millimetres whatever the spacing.
    """
    axes = [
        (np.arange(int(n), dtype=np.float32) - (int(n) - 1) / 2) * float(s)
        for n, s in zip(shape_vox, spacing_mm, strict=True)
    ]
    xx, yy, zz = np.meshgrid(*axes, indexing="ij")
    return xx, yy, zz


def _draw_anatomy(rng, shape_vox, spacing_mm, grid):
    """Draw body and organ; return ``(hu, inner, organ_centre, organ_axes, body_a, body_b)``.

    ``hu`` is float32 with air, fat, soft tissue and the organ; ``inner`` marks the soft
    tissue inside the fat layer. The random draws come first in every CT renderer.
    """
    nx, ny, nz = (int(n) for n in shape_vox)
    sx, sy, sz = (float(s) for s in spacing_mm)
    xx, yy, zz = grid
    half_x, half_y = nx * sx / 2, ny * sy / 2
    body_a = half_x * rng.uniform(0.78, 0.88)
    body_b = half_y * rng.uniform(0.62, 0.75)
    body = (xx / body_a) ** 2 + (yy / body_b) ** 2
    hu = np.full(xx.shape, float(AIR_HU), np.float32)
    hu[body <= 1.0] = FAT_HU
    inner = body <= 0.82
    hu[inner] = SOFT_TISSUE_HU

    organ_centre = np.array([rng.uniform(-0.3, 0.3) * body_a, rng.uniform(-0.2, 0.2) * body_b])
    organ_axes = np.array([0.35 * body_a, 0.4 * body_b, max(nz * sz * 0.35, 2 * sz)])
    organ = (
        ((xx - organ_centre[0]) / organ_axes[0]) ** 2
        + ((yy - organ_centre[1]) / organ_axes[1]) ** 2
        + (zz / organ_axes[2]) ** 2
    ) <= 1.0
    hu[organ & inner] = ORGAN_HU
    return hu, inner, organ_centre, organ_axes, body_a, body_b


def _sphere(grid, centre_xyz, radius_mm: float) -> np.ndarray:
    """Boolean mask of the voxels within ``radius_mm`` of ``centre_xyz`` (millimetres)."""
    xx, yy, zz = grid
    cx, cy, cz = centre_xyz
    return ((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) <= radius_mm**2


def _add_noise(rng: np.random.Generator, hu: np.ndarray) -> np.ndarray:
    """Add scanner noise (weaker in air), round and clip to the 12-bit CT range, as int16."""
    noise = rng.normal(0.0, 8.0, hu.shape).astype(np.float32)
    hu = np.where(hu > AIR_HU, hu + noise, hu + 0.2 * noise)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def render_ct(
    rng: np.random.Generator,
    shape_vox: Sequence[int],
    spacing_mm: Sequence[float],
    *,
    disease: str = "IgAN",
) -> tuple[np.ndarray, np.ndarray]:
    """Render a CT volume indexed ``[x, y, z]``; return ``(hu int16, lesion mask bool)``."""
    if disease not in LESION_RADIUS_MM:
        raise ValueError(f"disease must be one of {tuple(LESION_RADIUS_MM)}, got {disease!r}")
    _check_geometry(shape_vox, spacing_mm)
    grid = millimetre_grid(shape_vox, spacing_mm)
    hu, inner, organ_centre, organ_axes, body_a, body_b = _draw_anatomy(
        rng, shape_vox, spacing_mm, grid
    )
    nz, sz = int(shape_vox[2]), float(spacing_mm[2])
    radius_mm = LESION_RADIUS_MM[disease] * rng.uniform(0.85, 1.15)
    radius_mm = min(radius_mm, _LESION_RADIUS_CAP * min(body_a, body_b))
    lesion_centre = organ_centre + rng.uniform(-0.4, 0.4, 2) * organ_axes[:2]
    lesion_z = rng.uniform(-0.25, 0.25) * nz * sz
    lesion = _sphere(grid, (*lesion_centre, lesion_z), radius_mm) & inner
    hu[lesion] = LESION_HU
    return _add_noise(rng, hu), lesion


def ordinal_level(grade: int, n_grades: int, signal_strength: float) -> float:
    """Return where ``grade`` sits on the lesion-appearance scale, in ``[0, 1]``.

    The level is ``0.5 + signal_strength * (grade / (n_grades - 1) - 0.5)``: it rises
    linearly with the grade at strength 1, and is 0.5 for every grade at strength 0, so
    the appearance then carries no class information. A single grade sits at 0.5.

    >>> ordinal_level(0, 3, 1.0), ordinal_level(2, 3, 1.0), ordinal_level(2, 3, 0.0)
    (0.0, 1.0, 0.5)
    """
    if n_grades < 1 or not 0 <= grade < n_grades:
        raise ValueError(f"need 0 <= grade < n_grades, got grade={grade}, n_grades={n_grades}")
    if not 0.0 <= signal_strength <= 1.0:
        raise ValueError(f"signal_strength must be in [0, 1], got {signal_strength}")
    fraction = grade / (n_grades - 1) if n_grades > 1 else 0.5
    return 0.5 + float(signal_strength) * (fraction - 0.5)


def feature_levels(
    grade: int, n_grades: int, signal_strength: float, signal: Sequence[str]
) -> dict[str, float]:
    """Return the level of each lesion feature: :func:`ordinal_level` for the features
    named in ``signal`` (a subset of :data:`SIGNAL_FEATURES`), 0.5 for the others."""
    unknown = set(signal) - set(SIGNAL_FEATURES)
    if unknown:
        raise ValueError(f"signal features must be among {SIGNAL_FEATURES}, got {sorted(unknown)}")
    level = ordinal_level(grade, n_grades, signal_strength)
    return {name: level if name in signal else 0.5 for name in SIGNAL_FEATURES}


def lerp(bounds: tuple[float, float], level: float) -> float:
    """Linear interpolation between ``bounds[0]`` (level 0) and ``bounds[1]`` (level 1)."""
    return bounds[0] + (bounds[1] - bounds[0]) * level


def smooth_noise_3d(
    rng: np.random.Generator, shape_vox: Sequence[int], sigma_vox: Sequence[float]
) -> np.ndarray:
    """Return smooth zero-mean, unit-variance float32 noise of ``shape_vox``.

    White noise blurred by a Gaussian of ``sigma_vox`` voxels per axis; used for lesion
    texture and intensity inhomogeneity.
    """
    white = rng.standard_normal(tuple(int(n) for n in shape_vox)).astype(np.float32)
    field = ndimage.gaussian_filter(white, [float(s) for s in sigma_vox], mode="reflect")
    field -= field.mean()
    return field / (field.std() + 1e-6)


def lesion_z_range(mask: np.ndarray) -> tuple[int, int]:
    """Return ``(first, last)`` slice indices (inclusive, along axis 2) the mask occupies.

    Raises ``ValueError`` for an empty mask.
    """
    slices = np.flatnonzero(np.asarray(mask).any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("the lesion mask is empty")
    return int(slices[0]), int(slices[-1])


def render_ct_lesion(
    rng: np.random.Generator,
    shape_vox: Sequence[int],
    spacing_mm: Sequence[float],
    *,
    grade: int,
    n_grades: int,
    signal_strength: float = 1.0,
    signal: Sequence[str] = SIGNAL_FEATURES,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Render a CT volume whose lesion appearance encodes an ordinal class.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random draw; the number of draws does not depend on the grade,
        so at ``signal_strength=0`` the same generator state gives the same volume for
        every grade.
    shape_vox, spacing_mm : sequence of 3
        Volume shape (voxels) and voxel size (mm), both ordered ``(x, y, z)``.
    grade : int, keyword-only
        Ordinal class index, ``0 <= grade < n_grades``.
    n_grades : int, keyword-only
        Number of ordinal classes.
    signal_strength : float, keyword-only
        How much of the class reaches the image, in ``[0, 1]`` (see :func:`ordinal_level`):
        1 spreads the grades over the full ranges below, 0 makes the lesion
        class-independent.
    signal : sequence of str, keyword-only
        Which features carry the grade, among ``"radius"`` (:data:`GRADE_RADIUS_FRACTION`),
        ``"enhancement"`` (mean lesion HU, :data:`GRADE_ENHANCEMENT_HU`) and ``"texture"``
        (intra-lesion heterogeneity, :data:`GRADE_TEXTURE_HU`); the others stay at the
        middle of their range. All three rise with the grade.

    Returns
    -------
    hu : numpy.ndarray
        int16 Hounsfield units indexed ``[x, y, z]``.
    mask : numpy.ndarray
        bool lesion mask, same shape.
    z_range : tuple of int
        ``(first, last)`` slice index (inclusive) the lesion occupies, along the last
        axis, i.e. in the slice order :func:`write_nifti` writes.

    Notes
    -----
    The lesion radius is a fraction of the body's short semi-axis (jittered by ±10 % per
    volume) rather than a fixed length in millimetres, so the radius signal keeps its
    full range in any field of view instead of saturating in small volumes. Raises
    ``ValueError`` for an invalid grade, strength or feature name, or if the lesion misses
    every voxel (only possible for grids of a few voxels).
    """
    _check_geometry(shape_vox, spacing_mm)
    levels = feature_levels(grade, n_grades, signal_strength, signal)
    grid = millimetre_grid(shape_vox, spacing_mm)
    hu, inner, organ_centre, organ_axes, body_a, body_b = _draw_anatomy(
        rng, shape_vox, spacing_mm, grid
    )
    nz, sz = int(shape_vox[2]), float(spacing_mm[2])
    radius_fraction = lerp(GRADE_RADIUS_FRACTION, levels["radius"]) * rng.uniform(0.9, 1.1)
    radius_mm = radius_fraction * min(body_a, body_b)
    lesion_centre = organ_centre + rng.uniform(-0.4, 0.4, 2) * organ_axes[:2]
    lesion_z = rng.uniform(-0.25, 0.25) * nz * sz
    enhancement_hu = lerp(GRADE_ENHANCEMENT_HU, levels["enhancement"]) + rng.normal(0.0, 4.0)
    sigma_vox = [_TEXTURE_SCALE_MM / float(s) for s in spacing_mm]
    texture = smooth_noise_3d(rng, shape_vox, sigma_vox)

    lesion = _sphere(grid, (*lesion_centre, lesion_z), radius_mm) & inner
    texture_hu = lerp(GRADE_TEXTURE_HU, levels["texture"])
    hu[lesion] = enhancement_hu + texture_hu * texture[lesion]
    z_range = lesion_z_range(lesion)
    return _add_noise(rng, hu), lesion, z_range


def write_nifti(path: str | os.PathLike, volume: np.ndarray, spacing_mm: Sequence[float]) -> Path:
    """Write ``volume`` (indexed ``[x, y, z]``) as NIfTI-1 with voxel size ``spacing_mm``.

    ``.nii.gz`` paths are gzip-compressed with a zero timestamp and no file name in the
    gzip header, so the same volume always gives the same bytes.

    Side effects: writes ``path`` (not atomically; callers build in a temporary folder).
    """
    path = Path(path)
    affine = np.diag([*(float(s) for s in spacing_mm), 1.0])
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path


def write_ct_case(
    folder: str | os.PathLike,
    name: str,
    volume: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
) -> dict[str, Path | int]:
    """Write a CT volume and its lesion mask as NIfTI; return paths and lesion z-range.

    Parameters
    ----------
    folder : path
        Existing folder to write into.
    name : str
        File stem: writes ``<name>.nii.gz`` (``volume`` as given, e.g. int16 HU) and
        ``<name>_mask.nii.gz`` (uint8, 1 inside the lesion), both on the same grid.
    volume, mask : numpy.ndarray
        Arrays indexed ``[x, y, z]`` of the same shape (as :func:`render_ct_lesion`
        returns them).
    spacing_mm : sequence of 3
        Voxel size (mm) along ``(x, y, z)``.

    Returns
    -------
    dict
        ``image`` and ``mask`` (Paths), and ``lesion_z_first`` / ``lesion_z_last``: the
        inclusive slice range of the lesion in the written slice order, computed from
        the mask. The dict is meant to become one row of a caller's TSV (paths made
        relative there); no sidecar file is written.

    Notes
    -----
    Side effects: writes two files (not atomically). Same inputs give the same bytes.
    """
    if volume.shape != mask.shape:
        raise ValueError(f"volume {volume.shape} and mask {mask.shape} differ in shape")
    folder = Path(folder)
    first, last = lesion_z_range(mask)
    image = write_nifti(folder / f"{name}.nii.gz", volume, spacing_mm)
    mask_path = write_nifti(
        folder / f"{name}_mask.nii.gz", np.asarray(mask).astype(np.uint8), spacing_mm
    )
    return {"image": image, "mask": mask_path, "lesion_z_first": first, "lesion_z_last": last}
