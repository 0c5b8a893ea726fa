"""Otsu's threshold, for float maps and for 8-bit images alike.

The glomerulus detector thresholds a float map (:mod:`mmdiag.segment.glomerulus`) and tissue
detection the uint8 saturation of a slide thumbnail (:mod:`mmdiag.patching.tissue`); both
use :func:`otsu_threshold`. Only the histogram differs: equal bins between the extremes of a
float map, one bin per grey level of an 8-bit image.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OTSU_BINS", "otsu_threshold"]

#: Default number of histogram bins: the grey levels of an 8-bit image.
OTSU_BINS = 256


def otsu_threshold(
    values: np.ndarray, *, bins: int = OTSU_BINS, integer_levels: bool | None = None
) -> float:
    """Return the Otsu threshold of ``values``: the cut maximising between-class variance.

    Parameters
    ----------
    values
        Any numeric array; non-finite values are ignored.
    bins
        Number of histogram bins, at least 2.
    integer_levels
        If True, ``values`` are grey levels, integers in ``0 .. bins - 1`` (an 8-bit image
        with the default ``bins``): bin k holds level k, the histogram covers all levels
        whatever the data, and the threshold is a level. If False, ``bins`` equal bins span
        the smallest to the largest finite value. ``None`` (default): True for ``uint8``
        input, False otherwise.

    Returns
    -------
    float
        Threshold ``t``; the foreground class is ``values > t``. With integer levels, ``t`` is
        the highest level of the lower class, and 0 when no cut separates two non-empty
        classes (no values, or a single level). Otherwise ``t`` is the upper edge of the
        lower class's last bin, and the common value when all values are equal.

    Raises
    ------
    ValueError
        If ``bins < 2``; with integer levels, if a value is not an integer in
        ``0 .. bins - 1``; otherwise, if ``values`` holds no finite number.

    Notes
    -----
    With class weights :math:`\\omega_0(t), \\omega_1(t)` and means :math:`\\mu_0(t),
    \\mu_1(t)` from the histogram (each bin at its centre), :math:`t^* = \\arg\\max_t
    \\omega_0\\omega_1 (\\mu_0 - \\mu_1)^2`, the first cut on ties.

    References
    ----------
    N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. Syst.
    Man Cybern. 9(1), 1979.

    Examples
    --------
    >>> t = otsu_threshold(np.array([1.0, 1.1, 0.9, 5.0, 5.2, 4.8]))
    >>> bool(1.1 < t < 4.8)
    True
    >>> otsu_threshold(np.array([10, 12, 11, 200, 190], dtype=np.uint8))
    12.0
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins!r}")
    array = np.asarray(values)
    if integer_levels is None:
        integer_levels = array.dtype == np.uint8
    if integer_levels:
        counts = _level_counts(array, bins)
        return float(_best_cut(counts, np.arange(bins, dtype=np.float64)))
    finite = np.asarray(array, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("values holds no finite number")
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        return low
    counts, edges = np.histogram(finite, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    return float(edges[1:][_best_cut(counts, centres)])


def _level_counts(array: np.ndarray, bins: int) -> np.ndarray:
    """Histogram of grey levels ``0 .. bins - 1``, one bin per level."""
    if array.dtype == np.uint8:
        levels = array.ravel()
    else:
        finite = np.asarray(array, dtype=np.float64).ravel()
        finite = finite[np.isfinite(finite)]
        bad = (finite != np.round(finite)) | (finite < 0)
        if bad.any():
            raise ValueError(
                f"values must be integer levels 0..{bins - 1}, got {float(finite[bad][0])}"
            )
        levels = finite.astype(np.intp)
    if levels.size and int(levels.max()) > bins - 1:
        raise ValueError(f"values must be integer levels 0..{bins - 1}, got {int(levels.max())}")
    return np.bincount(levels, minlength=bins)


def _best_cut(counts: np.ndarray, centres: np.ndarray) -> int:
    """Index k of the cut maximising between-class variance, class 0 being bins ``0 .. k``.

    Only cuts that leave the last bin in class 1 are tried; weights are float64 so that their
    product cannot overflow.
    """
    weight = np.cumsum(counts, dtype=np.float64)
    mass = np.cumsum(counts * centres)
    weight_low, mass_low = weight[:-1], mass[:-1]
    weight_high = weight[-1] - weight_low
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between))
