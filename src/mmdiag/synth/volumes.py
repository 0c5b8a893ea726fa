"""Synthetic CT volumes (Hounsfield-like int16) written as NIfTI.

A volume holds an elliptic body cylinder (soft tissue about 40 HU under a thin fat
layer, air -1000 HU outside), a kidney-like organ and one enhancing lesion (about
130 HU, brighter than the surrounding tissue). Shapes are drawn in millimetres, so
the lesion stays round whatever the voxel spacing. The planted signal is the lesion
radius, which depends on the disease (:data:`LESION_RADIUS_MM`).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
ORGAN_HU = 30
LESION_HU = 130
LESION_RADIUS_MM = {"IgAN": 6.0, "MN": 9.0, "LN": 12.0}


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
    if len(shape_vox) != 3 or len(spacing_mm) != 3:
        raise ValueError(f"shape_vox and spacing_mm need 3 entries, got {shape_vox}, {spacing_mm}")
    nx, ny, nz = (int(n) for n in shape_vox)
    sx, sy, sz = (float(s) for s in spacing_mm)
    # Millimetre coordinates relative to the volume centre.
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy
    z = (np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz
    xx, yy, zz = np.meshgrid(x, y, z, indexing="ij")

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

    radius_mm = LESION_RADIUS_MM[disease] * rng.uniform(0.85, 1.15)
    radius_mm = min(radius_mm, 0.25 * min(body_a, body_b))
    lesion_centre = organ_centre + rng.uniform(-0.4, 0.4, 2) * organ_axes[:2]
    lesion_z = rng.uniform(-0.25, 0.25) * nz * sz
    lesion = (
        (xx - lesion_centre[0]) ** 2 + (yy - lesion_centre[1]) ** 2 + (zz - lesion_z) ** 2
    ) <= radius_mm**2
    lesion &= inner
    hu[lesion] = LESION_HU

    noise = rng.normal(0.0, 8.0, hu.shape).astype(np.float32)
    hu = np.where(hu > AIR_HU, hu + noise, hu + 0.2 * noise)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), lesion


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
