"""Synthetic multi-sequence brain MR (T1, T1ce, T2, FLAIR) of one patient, as NIfTI.

A head is an ellipsoid with scalp, skull, a thin rim of cerebrospinal fluid (CSF), grey
matter, white matter with a noise-roughened boundary, two lateral ventricles and one
lesion in a hemisphere. Each sequence looks up its own intensity per tissue
(:data:`TISSUE_INTENSITY`), with the physically familiar contrasts: CSF dark on T1 and
FLAIR but bright on T2; white matter brighter than grey on T1, darker on T2; the lesion
dark on T1, enhancing (bright) on T1ce and bright on T2 and FLAIR. All four sequences
share one grid, one lesion and one smooth receive-coil bias field; Rician noise is drawn
per sequence.

As in :func:`mmdiag.synth.volumes.render_ct_lesion`, an optional ordinal grade can rise
with the lesion's radius, its T1ce enhancement and its heterogeneity, scaled by
``signal_strength``. Arrays are indexed ``[x, y, z]`` and written with
:func:`mmdiag.synth.volumes.write_nifti`, so all files share the same affine and the
same gzip determinism.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmdiag.synth.volumes import (
    SIGNAL_FEATURES,
    feature_levels,
    lerp,
    lesion_z_range,
    millimetre_grid,
    smooth_noise_3d,
    write_nifti,
)

SEQUENCES = ("t1", "t1ce", "t2", "flair")
TISSUES = ("background", "scalp", "skull", "csf", "grey", "white", "lesion")
# Relative signal per tissue and sequence (t1, t1ce, t2, flair); the lesion's T1ce value
# comes from GRADE_ENHANCEMENT instead.
TISSUE_INTENSITY = {
    "background": (0.0, 0.0, 0.0, 0.0),
    "scalp": (0.85, 0.85, 0.55, 0.60),
    "skull": (0.08, 0.08, 0.06, 0.06),
    "csf": (0.18, 0.18, 1.00, 0.08),
    "grey": (0.45, 0.47, 0.65, 0.55),
    "white": (0.65, 0.66, 0.45, 0.42),
    "lesion": (0.30, 0.95, 0.85, 0.85),
}
# Ordinal lesion appearance, (lowest grade, highest grade) at signal strength 1.
GRADE_RADIUS_FRACTION = (0.08, 0.20)  # of the head's shortest semi-axis
GRADE_ENHANCEMENT = (0.75, 1.15)  # lesion signal on T1ce
GRADE_HETEROGENEITY = (0.02, 0.12)  # relative standard deviation of the lesion texture
INTENSITY_SCALE = 1000.0  # stored int16 value of relative signal 1
NOISE_SIGMA = 0.02  # Rician noise, relative signal
_LABEL = {name: index for index, name in enumerate(TISSUES)}


def _head_radius(grid, semi_axes) -> np.ndarray:
    """Normalised ellipsoidal radius of every voxel (1 on the head surface)."""
    xx, yy, zz = grid
    a, b, c = semi_axes
    return np.sqrt((xx / a) ** 2 + (yy / b) ** 2 + (zz / c) ** 2)


def _ventricles(grid, semi_axes) -> np.ndarray:
    """Two small lateral ventricles either side of the midline."""
    xx, yy, zz = grid
    a, b, c = semi_axes
    left = ((xx + 0.1 * a) / (0.05 * a)) ** 2 + (yy / (0.22 * b)) ** 2 + (zz / (0.1 * c)) ** 2
    right = ((xx - 0.1 * a) / (0.05 * a)) ** 2 + (yy / (0.22 * b)) ** 2 + (zz / (0.1 * c)) ** 2
    return (left <= 1.0) | (right <= 1.0)


def _draw_labels(rng, shape_vox, spacing_mm, grid):
    """Draw the head; return ``(labels uint8, semi_axes)`` with :data:`TISSUES` indices."""
    half = np.array([int(n) * float(s) / 2 for n, s in zip(shape_vox, spacing_mm, strict=True)])
    semi_axes = half * rng.uniform([0.82, 0.86, 0.8], [0.9, 0.92, 0.88])
    radius = _head_radius(grid, semi_axes)
    sigma_vox = [4.0 / float(s) for s in spacing_mm]
    white_edge = 0.72 + 0.04 * smooth_noise_3d(rng, shape_vox, sigma_vox)

    labels = np.zeros(radius.shape, np.uint8)
    for name, outer in (("scalp", 1.0), ("skull", 0.93), ("csf", 0.86), ("grey", 0.84)):
        labels[radius <= outer] = _LABEL[name]
    labels[radius <= np.minimum(white_edge, 0.8)] = _LABEL["white"]
    labels[_ventricles(grid, semi_axes)] = _LABEL["csf"]
    return labels, semi_axes


def _draw_lesion(rng, grid, semi_axes, radius_fraction: float) -> np.ndarray:
    """A spherical lesion in one hemisphere, lateral to the ventricles, inside the brain."""
    a, b, c = semi_axes
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    centre = (
        side * rng.uniform(0.4, 0.5) * a,
        rng.uniform(-0.25, 0.25) * b,
        rng.uniform(-0.2, 0.2) * c,
    )
    radius_mm = radius_fraction * rng.uniform(0.9, 1.1) * min(semi_axes)
    xx, yy, zz = grid
    distance2 = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2
    return (distance2 <= radius_mm**2) & (_head_radius(grid, semi_axes) <= 0.84)


def _rician(rng: np.random.Generator, signal: np.ndarray) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (MR magnitude images)."""
    real = signal + rng.normal(0.0, NOISE_SIGMA, signal.shape).astype(np.float32)
    imaginary = rng.normal(0.0, NOISE_SIGMA, signal.shape).astype(np.float32)
    return np.sqrt(real**2 + imaginary**2)


def render_mr(
    rng: np.random.Generator,
    shape_vox: Sequence[int],
    spacing_mm: Sequence[float],
    *,
    grade: int = 0,
    n_grades: int = 1,
    signal_strength: float = 1.0,
    signal: Sequence[str] = SIGNAL_FEATURES,
) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int]]:
    """Render co-registered T1, T1ce, T2 and FLAIR volumes of one synthetic brain.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random draw; the number of draws does not depend on the grade,
        so at ``signal_strength=0`` every grade gives the same volumes.
    shape_vox, spacing_mm : sequence of 3
        Grid shape (voxels) and voxel size (mm), ordered ``(x, y, z)``.
    grade, n_grades : int, keyword-only
        Ordinal class of the lesion, ``0 <= grade < n_grades``; the default single grade
        carries no class signal.
    signal_strength : float, keyword-only
        In ``[0, 1]``; see :func:`mmdiag.synth.volumes.ordinal_level`.
    signal : sequence of str, keyword-only
        Which lesion features rise with the grade: ``"radius"``
        (:data:`GRADE_RADIUS_FRACTION`), ``"enhancement"`` (T1ce signal,
        :data:`GRADE_ENHANCEMENT`) and ``"texture"`` (:data:`GRADE_HETEROGENEITY`).

    Returns
    -------
    sequences : dict of str to numpy.ndarray
        int16 volumes keyed by :data:`SEQUENCES`, indexed ``[x, y, z]``, relative signal
        times :data:`INTENSITY_SCALE`.
    mask : numpy.ndarray
        bool lesion mask on the same grid.
    z_range : tuple of int
        ``(first, last)`` slice index (inclusive, last axis) the lesion occupies.
    """
    if len(shape_vox) != 3 or len(spacing_mm) != 3:
        raise ValueError(f"shape_vox and spacing_mm need 3 entries, got {shape_vox}, {spacing_mm}")
    levels = feature_levels(grade, n_grades, signal_strength, signal)
    grid = millimetre_grid(shape_vox, spacing_mm)
    labels, semi_axes = _draw_labels(rng, shape_vox, spacing_mm, grid)
    lesion = _draw_lesion(rng, grid, semi_axes, lerp(GRADE_RADIUS_FRACTION, levels["radius"]))
    labels[lesion] = _LABEL["lesion"]
    texture = smooth_noise_3d(rng, shape_vox, [2.0 / float(s) for s in spacing_mm])
    bias = 1.0 + 0.06 * smooth_noise_3d(rng, shape_vox, [30.0 / float(s) for s in spacing_mm])
    heterogeneity = 1.0 + lerp(GRADE_HETEROGENEITY, levels["texture"]) * texture[lesion]

    sequences = {}
    for index, name in enumerate(SEQUENCES):
        table = np.array([TISSUE_INTENSITY[t][index] for t in TISSUES], np.float32)
        if name == "t1ce":
            table[_LABEL["lesion"]] = lerp(GRADE_ENHANCEMENT, levels["enhancement"])
        signal_map = table[labels]
        signal_map[lesion] *= heterogeneity
        magnitude = _rician(rng, signal_map * bias)
        sequences[name] = np.clip(np.rint(magnitude * INTENSITY_SCALE), 0, 32767).astype(np.int16)
    return sequences, lesion, lesion_z_range(lesion)


def write_mr_case(
    folder: str | os.PathLike,
    patient_id: str,
    sequences: dict[str, np.ndarray],
    mask: np.ndarray,
    spacing_mm: Sequence[float],
) -> dict[str, Path]:
    """Write the four sequences and the lesion mask of one patient as NIfTI.

    Writes ``<patient_id>_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair`` and
    ``<patient_id>_mask.nii.gz`` (uint8) into ``folder``, all with the affine
    ``diag(spacing_mm, 1)``. Returns the paths keyed ``t1``, ``t1ce``, ``t2``, ``flair``,
    ``mask``.

    Side effects: writes five files (not atomically). Same inputs give the same bytes.
    """
    missing = set(SEQUENCES) - set(sequences)
    if missing:
        raise ValueError(f"sequences lacks {sorted(missing)}")
    shapes = {np.shape(sequences[name]) for name in SEQUENCES} | {np.shape(mask)}
    if len(shapes) > 1:
        raise ValueError(f"sequences and mask must share one grid, got shapes {sorted(shapes)}")
    folder = Path(folder)
    paths = {
        name: write_nifti(folder / f"{patient_id}_{name}.nii.gz", sequences[name], spacing_mm)
        for name in SEQUENCES
    }
    mask_u8 = np.asarray(mask).astype(np.uint8)
    paths["mask"] = write_nifti(folder / f"{patient_id}_mask.nii.gz", mask_u8, spacing_mm)
    return paths
