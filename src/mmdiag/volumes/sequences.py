"""Cut CT volumes into labelled slice sequences, as in MHD-Net.

MHD-Net drops the first 20 % and the last 30 % of the slices of each CT volume and cuts the
rest into consecutive, non-overlapping sequences of 24 slices, each resized to 224 x 224
in-plane. :func:`cut_sequences` does exactly that, with every number configurable:

- kept slices: ``[floor(head_fraction * n), n - floor(tail_fraction * n))`` in the volume's
  z order (for volumes from :func:`~mmdiag.volumes.reader.read_volume` index 0 is the most
  inferior axial slice; flip the volume first if "first" should mean the superior end);
- sequences: consecutive blocks of ``depth`` kept slices from the first kept slice on; a last
  partial block is dropped, so every sequence has exactly ``depth`` real slices;
- fewer kept slices than ``depth``: :class:`~mmdiag.volumes.reader.VolumeError` (padding would
  invent slices);
- in-plane resize: the cell-aligned linear resampling of
  :func:`~mmdiag.volumes.transforms.resize_array`; intensities are not windowed here (apply
  :func:`~mmdiag.volumes.transforms.hu_window` first if wanted);
- label: ``"tumour"`` when at least ``max(1, ceil(min_lesion_fraction * depth))`` of the
  sequence's slices hold lesion, else ``"other"``; ``None`` without lesion information. A
  slice holds lesion when a lesion mask has any true voxel in it, or when it lies in the
  inclusive lesion z-range.

Each :class:`CtSequence` keeps the original slice indices ``[start, stop)`` for tracing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mmdiag.volumes.reader import Volume, VolumeError
from mmdiag.volumes.transforms import resize_array

__all__ = [
    "OTHER",
    "TUMOUR",
    "CtSequence",
    "cut_sequences",
    "kept_slice_range",
    "sequence_bounds",
]

TUMOUR = "tumour"
OTHER = "other"
#: Guards ``floor(fraction * n)`` against products such as ``0.29 * 100 = 28.999...``.
_ROUNDING_GUARD = 1e-9


@dataclass(frozen=True, eq=False)
class CtSequence:
    """A block of consecutive CT slices, resized in-plane.

    Parameters
    ----------
    start, stop
        Original slice indices ``[start, stop)`` in the source volume's z order.
    voxels
        ``(depth, size, size)`` ``float32`` intensities.
    label
        ``"tumour"``, ``"other"``, or ``None`` when no lesion information was given.
    """

    start: int
    stop: int
    voxels: np.ndarray
    label: str | None


def kept_slice_range(n_slices: int, head_fraction: float, tail_fraction: float) -> range:
    """Slices left after dropping ``floor(head * n)`` first and ``floor(tail * n)`` last ones.

    Examples
    --------
    >>> kept_slice_range(100, 0.2, 0.3)
    range(20, 70)
    """
    if not (0 <= head_fraction < 1 and 0 <= tail_fraction < 1):
        raise VolumeError(
            f"head and tail fractions must lie in [0, 1), got {head_fraction}, {tail_fraction}"
        )
    head = math.floor(head_fraction * n_slices + _ROUNDING_GUARD)
    tail = math.floor(tail_fraction * n_slices + _ROUNDING_GUARD)
    return range(head, max(head, n_slices - tail))


def sequence_bounds(
    n_slices: int, depth: int = 24, head_fraction: float = 0.2, tail_fraction: float = 0.3
) -> list[tuple[int, int]]:
    """``[start, stop)`` of every full block of ``depth`` kept slices (may be empty).

    Examples
    --------
    >>> sequence_bounds(100)
    [(20, 44), (44, 68)]
    """
    if depth < 1:
        raise VolumeError(f"depth must be at least 1, got {depth}")
    kept = kept_slice_range(n_slices, head_fraction, tail_fraction)
    starts = range(kept.start, kept.stop - depth + 1, depth)
    return [(start, start + depth) for start in starts]


def cut_sequences(
    volume: Volume,
    *,
    depth: int = 24,
    size: int = 224,
    head_fraction: float = 0.2,
    tail_fraction: float = 0.3,
    lesion_mask: np.ndarray | None = None,
    lesion_z_range: tuple[int, int] | None = None,
    min_lesion_fraction: float = 0.0,
) -> list[CtSequence]:
    """Cut ``volume`` into MHD-Net sequences; see the module docstring for the exact rules.

    Parameters
    ----------
    volume
        A CT volume, axes (z, y, x).
    depth, size
        Slices per sequence and in-plane output size (square).
    head_fraction, tail_fraction
        Fractions of the slices dropped at the start and at the end of the z axis.
    lesion_mask
        Boolean array of the volume's shape marking lesion voxels.
    lesion_z_range
        ``(first, last)`` lesion slice indices, inclusive, in the volume's z order. Give
        at most one of ``lesion_mask`` and ``lesion_z_range``.
    min_lesion_fraction
        Fraction of a sequence's slices that must hold lesion for the label ``"tumour"``;
        0 means any lesion slice.

    Returns
    -------
    list of CtSequence
        In increasing ``start`` order.
    """
    if size < 1:
        raise VolumeError(f"size must be at least 1, got {size}")
    lesion_slices = _lesion_slices(volume, lesion_mask, lesion_z_range)
    needed = _min_lesion_slices(min_lesion_fraction, depth)
    bounds = sequence_bounds(volume.shape[0], depth, head_fraction, tail_fraction)
    if not bounds:
        kept = kept_slice_range(volume.shape[0], head_fraction, tail_fraction)
        raise VolumeError(
            f"{volume.source or 'volume'}: {len(kept)} slices kept of {volume.shape[0]}, "
            f"fewer than one sequence of {depth}"
        )
    first, last = bounds[0][0], bounds[-1][1]
    resized = resize_array(volume.voxels[first:last], (last - first, size, size))
    return [
        CtSequence(
            start=start,
            stop=stop,
            voxels=resized[start - first : stop - first],
            label=_label(lesion_slices, start, stop, needed),
        )
        for start, stop in bounds
    ]


def _lesion_slices(
    volume: Volume, mask: np.ndarray | None, z_range: tuple[int, int] | None
) -> np.ndarray | None:
    """Boolean per-slice lesion flags, or ``None`` without lesion information."""
    n = volume.shape[0]
    if mask is not None and z_range is not None:
        raise VolumeError("give lesion_mask or lesion_z_range, not both")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != volume.shape:
            raise VolumeError(f"lesion mask shape {mask.shape} differs from {volume.shape}")
        return mask.any(axis=(1, 2))
    if z_range is not None:
        first, last = (int(z) for z in z_range)
        if not 0 <= first <= last < n:
            raise VolumeError(f"lesion z-range {z_range} outside 0..{n - 1} or reversed")
        flags = np.zeros(n, dtype=bool)
        flags[first : last + 1] = True
        return flags
    return None


def _min_lesion_slices(fraction: float, depth: int) -> int:
    """Lesion slices a sequence needs to be labelled tumour."""
    if not 0 <= fraction <= 1:
        raise VolumeError(f"min_lesion_fraction must lie in [0, 1], got {fraction}")
    return max(1, math.ceil(fraction * depth - _ROUNDING_GUARD))


def _label(lesion_slices: np.ndarray | None, start: int, stop: int, needed: int) -> str | None:
    """``"tumour"``/``"other"`` for the slices ``[start, stop)``; ``None`` without lesions."""
    if lesion_slices is None:
        return None
    return TUMOUR if int(lesion_slices[start:stop].sum()) >= needed else OTHER
