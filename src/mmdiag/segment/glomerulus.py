"""Classical glomerulus detector for PASM-stained optical micrographs (OM).

CMUS-Net (renal-biopsy diagnosis from OM, IM and TEM images) segments the glomerulus of
each OM image semi-automatically with SAM and classifies the glomerulus crop. This module
supplies the *automatic* half of "semi-automatic": a training-free detector whose mask is
used directly when no SAM checkpoint is configured, and whose bounding box (plus centroid)
is the prompt SAM receives when the user gave none (:mod:`mmdiag.segment.sam`).

In a PASM (silver) stain the glomerulus is the largest *compact* structure that differs from
the pale background: Bowman's capsule and the capillary loops are silver-black and densely
packed around white lumina and Bowman's space, whereas the tubular basement membranes of the
interstitium are thin, elongated lines. The mask covers the glomerulus up to and including
Bowman's capsule. The steps are written in
:func:`detect_glomerulus`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mmdiag.segment.threshold import otsu_threshold

__all__ = ["detect_glomerulus", "mask_to_box", "otsu_threshold", "stain_map"]

#: Gaussian blur sigma as a fraction of the image's shorter side: wide enough to merge the
#: capillary loops of a tuft into one blob, narrow enough to keep thin tubule lines faint.
BLUR_SIGMA_FRACTION = 0.02
#: Disc radius of the closing, as a fraction of the shorter side.
MORPH_RADIUS_FRACTION = 0.02
#: Disc radius of the opening, as a fraction of the shorter side: wider than a tubule line
#: blurred, far narrower than a glomerulus (radius about 0.3-0.4 of the side in the demo).
OPEN_RADIUS_FRACTION = 0.08
#: Added before the log in step 3, so a uniform background does not give log(0).
LOG_OFFSET = 1e-3


def stain_map(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel stain strength in [0, 1]: darkness plus saturation of an RGB image.

    Silver (dark) and the saturated pink-magenta of the tuft both count; the pale pink
    background and the near-white Bowman's space and lumina score low.
    """
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    brightest = pixels.max(axis=-1)
    darkness = 1.0 - pixels.mean(axis=-1)
    saturation = (brightest - pixels.min(axis=-1)) / np.maximum(brightest, 1e-6)
    return np.clip(darkness + saturation, 0.0, 1.0)


def _dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Dilation by a Euclidean disc, via the distance transform (fast for large radii)."""
    return ndimage.distance_transform_edt(~mask) <= radius_px


def _erode(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Erosion by a Euclidean disc, via the distance transform."""
    return ndimage.distance_transform_edt(mask) > radius_px


def _perimeter_px(component: np.ndarray) -> int:
    """Number of boundary pixels (4-connected boundary) of a boolean mask."""
    return int(np.count_nonzero(component & ~ndimage.binary_erosion(component)))


def detect_glomerulus(
    rgb: np.ndarray,
    *,
    box: tuple[int, int, int, int] | None = None,
    foreground_points: Sequence[tuple[int, int]] = (),
) -> np.ndarray:
    """Return a boolean mask ``(H, W)`` of the glomerulus: the largest compact structure.

    Steps:

    1. stain map: darkness + saturation per pixel (:func:`stain_map`), and its absolute
       deviation from the median (the background): silver loops and capsule lie above it,
       the white Bowman's space and lumina below, so both count as "not background";
    2. Gaussian blur, sigma = :data:`BLUR_SIGMA_FRACTION` of the shorter image side, so the
       capillary loops of the tuft merge into one blob;
    3. Otsu threshold (:func:`otsu_threshold`) of the *log* of the blurred map (offset
       :data:`LOG_OFFSET`): on the linear scale the near-black mesangium and loops form the
       upper class alone and the threshold cuts through the tuft;
    4. binary closing (Euclidean disc of :data:`MORPH_RADIUS_FRACTION` of the shorter side)
       to bridge gaps in Bowman's capsule, then fill holes (lumina, Bowman's space);
    5. binary opening with a wider disc (:data:`OPEN_RADIUS_FRACTION`), cutting thin tubule
       lines and their junctions off the glomerulus;
    6. connected components (``scipy.ndimage.label``); keep the component maximising
       ``area * compactness`` with compactness ``4 pi area / perimeter**2`` (1 for a disc;
       capped at 1 because pixel perimeters of small blobs are underestimated);
    7. fill the holes of that component.

    Parameters
    ----------
    rgb
        ``uint8`` image of shape ``(H, W, 3)``.
    box
        Optional ``(x0, y0, x1, y1)`` (x1/y1 exclusive): threshold and search only inside it
        (a user's prompt without SAM).
    foreground_points
        Optional ``(x, y)`` points: when a component contains any of them, only such
        components are candidates.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the image's height and width.

    Raises
    ------
    ValueError
        If ``rgb`` is not an RGB image, or nothing was found.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or min(rgb.shape[:2]) < 8:
        raise ValueError(f"rgb must be an (H, W, 3) image of at least 8 px, got {rgb.shape}")
    height_px, width_px = rgb.shape[:2]
    region = np.ones((height_px, width_px), bool)
    if box is not None:
        x0, y0, x1, y1 = _check_box(box, width_px, height_px)
        region[:] = False
        region[y0:y1, x0:x1] = True
    short_side = min(height_px, width_px)
    stain = stain_map(rgb)
    deviation = np.abs(stain - np.median(stain[region]))
    blurred = ndimage.gaussian_filter(deviation, BLUR_SIGMA_FRACTION * short_side)
    log_blurred = np.log(blurred + LOG_OFFSET)
    threshold = otsu_threshold(log_blurred[region], integer_levels=False)
    foreground = (log_blurred > threshold) & region
    close_px = max(1.0, MORPH_RADIUS_FRACTION * short_side)
    open_px = max(1.0, OPEN_RADIUS_FRACTION * short_side)
    # Pad so that closing does not glue structures to the image border.
    pad = int(np.ceil(max(close_px, open_px))) + 1
    foreground = np.pad(foreground, pad)
    foreground = _erode(_dilate(foreground, close_px), close_px)
    foreground = ndimage.binary_fill_holes(foreground)
    # Opening with a wider disc cuts tubule lines and their junctions off the glomerulus.
    foreground = _dilate(_erode(foreground, open_px), open_px)
    foreground = foreground[pad:-pad, pad:-pad] & region

    labels, n_components = ndimage.label(foreground)
    if n_components == 0:
        where = "" if box is None else f" inside box {tuple(box)}"
        raise ValueError(f"no glomerulus found{where}: no stained structure after thresholding")
    candidates = range(1, n_components + 1)
    hits = {
        int(labels[y, x])
        for x, y in foreground_points
        if 0 <= x < width_px and 0 <= y < height_px and labels[y, x]
    }
    if hits:
        candidates = sorted(hits)
    slices = ndimage.find_objects(labels)
    best_label, best_score = 0, -1.0
    for label in candidates:
        window = slices[label - 1]
        component = np.pad(labels[window] == label, 1)
        area = int(component.sum())
        compactness = 4 * np.pi * area / max(_perimeter_px(component), 1) ** 2
        score = area * min(compactness, 1.0)
        if score > best_score:
            best_label, best_score = label, score
    return ndimage.binary_fill_holes(labels == best_label)


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Return the tight bounding box ``(x0, y0, x1, y1)`` of a 2-D mask; x1/y1 exclusive.

    Examples
    --------
    >>> m = np.zeros((5, 6), bool); m[1:3, 2:5] = True
    >>> mask_to_box(m)
    (2, 1, 5, 3)
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty: it has no bounding box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_box(box, width_px: int, height_px: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width_px and 0 <= y0 < y1 <= height_px):
        raise ValueError(f"box {tuple(box)} is not inside the {width_px}x{height_px} image")
    return x0, y0, x1, y1
