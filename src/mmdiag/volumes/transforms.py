"""Intensity and grid transforms of volumes; every function returns new data.

Intensity transforms (:func:`clip_and_scale`, :func:`hu_window`, :func:`zscore`) accept a
:class:`~mmdiag.volumes.reader.Volume` (and return one with the same geometry) or a plain
array (and return a ``float32`` array). Grid transforms (:func:`resample_to_spacing`,
:func:`resize_to_shape`) need a volume, because they update its spacing and affine;
:func:`resize_array` is their array-only counterpart.

Grid convention: voxels are cells, and a resampled grid covers the same field of view as the
original. Along an axis with zoom factor ``f = new_spacing / old_spacing``, output voxel ``c``
is sampled at the original continuous index ``(c + 0.5) * f - 0.5``, so cell edges line up at
both ends of the axis when the size divides evenly. The affine is updated to match: its
columns are scaled by ``f`` and its origin moves to the world position of original index
``(f - 1) / 2``; hence the new affine maps every output voxel to the world point it was
sampled at. Samples beyond the outermost voxel centres take the edge value (``mode="nearest"``);
there is no smoothing before downsampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from scipy import ndimage

from mmdiag.volumes.reader import Volume, VolumeError

__all__ = [
    "clip_and_scale",
    "hu_window",
    "resample_to_spacing",
    "resize_array",
    "resize_to_shape",
    "zscore",
]

Data = TypeVar("Data", np.ndarray, Volume)


def clip_and_scale(data: Data, low: float, high: float) -> Data:
    """Clip intensities to ``[low, high]`` and map that range linearly onto ``[0, 1]``.

    Parameters
    ----------
    data
        A volume or an array.
    low, high
        The intensities sent to 0 and 1 (``high > low``).
    """
    if not high > low:
        raise VolumeError(f"window needs high > low, got low={low}, high={high}")
    return _map_voxels(data, lambda v: (np.clip(v, low, high) - low) / (high - low))


def hu_window(data: Data, level: float, width: float) -> Data:
    """Apply a CT display window: clip to ``level +- width / 2`` and scale to ``[0, 1]``.

    Examples
    --------
    >>> hu_window(np.array([-1000.0, 40.0, 140.0, 1000.0]), level=40, width=400).tolist()
    [0.0, 0.5, 0.75, 1.0]
    """
    return clip_and_scale(data, level - width / 2, level + width / 2)


def zscore(data: Data, mask: np.ndarray | None = None, eps: float = 1e-6) -> Data:
    """Standardise intensities to mean 0 and standard deviation 1.

    Parameters
    ----------
    data
        A volume or an array.
    mask
        Optional boolean array of the same shape; the mean and standard deviation are taken
        over its true voxels only (e.g. the body), but every voxel is transformed.
    eps
        Lower bound on the standard deviation, so a constant input gives zeros, not NaNs.
    """
    values = data.voxels if isinstance(data, Volume) else np.asarray(data)
    selected = values if mask is None else values[_check_mask(mask, values.shape)]
    if selected.size == 0:
        raise VolumeError("zscore mask selects no voxels")
    mean = float(np.mean(selected, dtype=np.float64))
    std = max(float(np.std(selected, dtype=np.float64)), eps)
    return _map_voxels(data, lambda v: (v - mean) / std)


def resample_to_spacing(
    volume: Volume, spacing_mm: float | Sequence[float], order: int = 1
) -> Volume:
    """Resample ``volume`` to a new voxel size, keeping its field of view.

    Parameters
    ----------
    volume
        The volume to resample.
    spacing_mm
        New (z, y, x) voxel size in millimetres, or one number for isotropic voxels.
    order
        Spline order of the interpolation: 0 nearest, 1 linear, 3 cubic.

    Returns
    -------
    Volume
        Shape ``round(n * old_spacing / new_spacing)`` per axis (at least 1), spacing exactly
        ``spacing_mm``, affine updated as described in the module docstring.
    """
    new_spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    if not np.all(new_spacing > 0):
        raise VolumeError(f"spacing_mm must be positive, got {spacing_mm}")
    factors = new_spacing / np.asarray(volume.spacing_mm)
    shape = tuple(max(1, round(n / f)) for n, f in zip(volume.shape, factors, strict=True))
    return _regrid(volume, factors, shape, order)


def resize_to_shape(volume: Volume, shape: Sequence[int], order: int = 1) -> Volume:
    """Resample ``volume`` onto a grid of ``shape`` (z, y, x), keeping its field of view.

    The spacing grows by ``old_shape / new_shape`` per axis and the affine follows it.
    """
    shape = _check_shape(shape, 3)
    factors = np.asarray(volume.shape, dtype=np.float64) / np.asarray(shape)
    return _regrid(volume, factors, shape, order)


def resize_array(array: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """Resample an N-D array onto ``shape`` with the cell-aligned grid of this module."""
    array = np.asarray(array, dtype=np.float32)
    shape = _check_shape(shape, array.ndim)
    factors = np.asarray(array.shape, dtype=np.float64) / np.asarray(shape)
    return _sample(array, factors, shape, order)


def _regrid(volume: Volume, factors: np.ndarray, shape: tuple[int, ...], order: int) -> Volume:
    """Sample ``volume`` with per-axis zoom ``factors`` (z, y, x); update spacing and affine."""
    voxels = _sample(volume.voxels, factors, shape, order)
    factors_xyz = factors[::-1]
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_world((factors_xyz - 1) / 2)
    affine[:3, :3] = volume.affine[:3, :3] * factors_xyz
    spacing = tuple(float(s * f) for s, f in zip(volume.spacing_mm, factors, strict=True))
    return dataclasses.replace(volume, voxels=voxels, spacing_mm=spacing, affine=affine)


def _sample(array: np.ndarray, factors: np.ndarray, shape: tuple[int, ...], order: int):
    """Output index ``c`` samples input index ``(c + 0.5) * factor - 0.5`` on every axis."""
    if order not in range(6):
        raise VolumeError(f"interpolation order must be 0..5, got {order}")
    return ndimage.affine_transform(
        np.asarray(array, dtype=np.float32),
        factors,
        offset=(factors - 1) / 2,
        output_shape=shape,
        order=order,
        mode="nearest",
        prefilter=order > 1,
    )


def _check_shape(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """``shape`` as a tuple of ``ndim`` positive ints."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim or min(shape) < 1:
        raise VolumeError(f"shape must be {ndim} positive sizes, got {shape}")
    return shape


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` as a boolean array of ``shape``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise VolumeError(f"mask shape {mask.shape} differs from the data shape {shape}")
    return mask


def _map_voxels(data: Data, function) -> Data:
    """Apply ``function`` to the intensities, keeping a volume's geometry."""
    if isinstance(data, Volume):
        return dataclasses.replace(data, voxels=function(data.voxels.astype(np.float32)))
    return np.asarray(function(np.asarray(data, dtype=np.float32)), dtype=np.float32)
