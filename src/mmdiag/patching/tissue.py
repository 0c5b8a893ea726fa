"""Tissue detection on a slide thumbnail: brightfield on saturation, fluorescence on brightness.

Brightfield slides (bright glass): glass is bright and grey (low saturation) and stained
tissue coloured, so the mask is the median-filtered HSV saturation above a threshold (Otsu's
by default). Fluorescence slides (dark background): the black background has a saturation
near 255 (JPEG noise on a few grey levels), so saturation would take the whole slide; there
tissue is brighter than the background, and the mask is the brightness (grey-closed to join
nuclei) above Otsu's threshold on a log scale, capped at twice the background's. Which kind
a slide is comes from the median brightness of the thumbnail's border
(:func:`detect_background`), or is set with ``background``. Either mask is then closed, with
small objects removed and small holes filled, and a mask covering more than
:data:`FULL_MASK_WARN_FRACTION` of the slide is warned about, since it is most likely wrong.
Only numpy and scipy.ndimage are used.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from mmdiag.io.atomic import atomic_path
from mmdiag.segment.threshold import otsu_threshold

log = logging.getLogger(__name__)

#: The values of ``tissue_mask(background=...)``: detect, brightfield, fluorescence.
BACKGROUNDS = ("auto", "bright", "dark")
#: A slide is dark (fluorescence) when the median brightness (max of R, G, B) of its
#: thumbnail's border is below this. Measured on real slides: brightfield glass or tissue
#: at the border 180-250, fluorescence (Hamamatsu NDPI DAPI and TRITC) 4.
DARK_BACKGROUND_MAX = 64.0
#: On dark slides Otsu's brightness threshold is capped at this many times the background's
#: brightness (tissue is anything clearly brighter than the background).
DARK_CONTRAST = 2.0
#: Width of the border ring used by :func:`background_brightness`, as a fraction of the
#: thumbnail's short side (at least one pixel).
BORDER_FRACTION = 0.05
#: A mask covering more than this fraction of the slide is warned about.
FULL_MASK_WARN_FRACTION = 0.95
#: Long side, in pixels, that QC overlays are enlarged to at least (see write_tissue_qc).
QC_MIN_LONG_SIDE_PX = 512
_WHITE = 255


def saturation_u8(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on a 0..255 scale: ``255 * (max - min) / max`` (0 where max is 0)."""
    rgb = _check_rgb(rgb)
    high = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return np.rint(255.0 * saturation).astype(np.uint8)


def brightness_u8(rgb: np.ndarray) -> np.ndarray:
    """Brightness as the maximum over R, G and B (HSV value), 0..255.

    The maximum rather than the grey value keeps a fluorescence channel stored in one colour
    (DAPI in blue) at its full intensity, and keeps stained brightfield tissue bright.
    """
    return _check_rgb(rgb).max(axis=2)


def background_brightness(rgb: np.ndarray) -> float:
    """Median brightness (:func:`brightness_u8`) of the thumbnail's border ring.

    The ring is :data:`BORDER_FRACTION` of the short side wide; the border of a slide is
    mostly background even where the tissue reaches it. Pure white pixels are left out:
    they are the unscanned parts of a slide, which the reader composites on white, and say
    nothing about the glass. Without border pixels the whole thumbnail is used, and a
    thumbnail that is all pure white counts as bright (255).
    """
    rgb = _check_rgb(rgb)
    value = brightness_u8(rgb)
    padding = (rgb == _WHITE).all(axis=2)
    ring = np.zeros(value.shape, bool)
    width = max(1, int(round(BORDER_FRACTION * min(value.shape))))
    ring[:width] = ring[-width:] = True
    ring[:, :width] = ring[:, -width:] = True
    for region in (ring & ~padding, ~padding):
        if region.any():
            return float(np.median(value[region]))
    return float(_WHITE)


def detect_background(rgb: np.ndarray, *, dark_max: float = DARK_BACKGROUND_MAX) -> str:
    """Return ``"dark"`` (fluorescence) or ``"bright"`` (brightfield) for a thumbnail.

    Dark when :func:`background_brightness` is below ``dark_max``.
    """
    return "dark" if background_brightness(rgb) < dark_max else "bright"


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def tissue_mask(
    rgb: np.ndarray,
    *,
    background: str = "auto",
    saturation_threshold: float | None = None,
    brightness_threshold: float | None = None,
    median_px: int = 7,
    closing_px: int = 5,
    min_object_px: int = 64,
    min_hole_px: int = 64,
    min_otsu_threshold: float = 10.0,
    min_brightness_threshold: float = 6.0,
    name: str | os.PathLike | None = None,
) -> np.ndarray:
    """Return a boolean tissue mask of an RGB thumbnail.

    Parameters
    ----------
    rgb
        uint8 image (H, W, 3).
    background
        ``"bright"``: brightfield, tissue is more saturated than the glass. ``"dark"``:
        fluorescence, tissue is brighter than the background. ``"auto"`` (default) decides
        with :func:`detect_background`.
    saturation_threshold
        Bright slides: fixed threshold on the 0..255 saturation; ``None`` uses Otsu's.
    brightness_threshold
        Dark slides: fixed threshold on the 0..255 smoothed brightness; ``None`` uses
        Otsu's threshold on ``log(1 + brightness)``, capped at :data:`DARK_CONTRAST` times
        the background brightness (:func:`background_brightness`). The log spreads the few
        grey levels of the background apart from the dim tissue; on a linear scale Otsu
        splits the bright nuclei from the rest of the tissue instead.
    median_px, closing_px
        Sizes (thumbnail pixels) of the smoothing window and of the square closing element;
        0 or 1 skips the step. Bright slides smooth saturation with a median filter; dark
        slides smooth brightness with a grey-level closing of that size, since fluorescence
        is punctate (bright nuclei on a dim tissue) and a median would drop it.
    min_object_px, min_hole_px
        Connected tissue regions smaller than ``min_object_px`` are removed, and holes
        smaller than ``min_hole_px`` filled.
    min_otsu_threshold
        Floor for Otsu's saturation threshold. Glass has saturation of a few units; without a
        floor Otsu splits JPEG noise on a blank slide into "tissue".
    min_brightness_threshold
        Floor for Otsu's brightness threshold on dark slides, for the same reason: the black
        background of a fluorescence scan has grey levels 0-5.
    name
        The slide, named in the warning given when the mask covers more than
        :data:`FULL_MASK_WARN_FRACTION` of it.
    """
    for label, value in (
        ("median_px", median_px),
        ("closing_px", closing_px),
        ("min_object_px", min_object_px),
        ("min_hole_px", min_hole_px),
    ):
        if int(value) != value or value < 0:
            raise ValueError(f"{label} must be an integer >= 0, got {value!r}")
    for label, value in (
        ("saturation_threshold", saturation_threshold),
        ("brightness_threshold", brightness_threshold),
    ):
        if value is not None and not 0 <= value <= 255:
            raise ValueError(f"{label} must be in [0, 255], got {value!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    rgb = _check_rgb(rgb)
    slide = str(name) if name is not None else "thumbnail"
    if background == "auto":
        level = background_brightness(rgb)
        background = "dark" if level < DARK_BACKGROUND_MAX else "bright"
        if background == "dark":
            log.info(
                "%s: dark (fluorescence) background, border brightness %.0f < %.0f; "
                "tissue is segmented on brightness",
                slide,
                level,
                DARK_BACKGROUND_MAX,
            )
    if background == "dark":
        mask = _dark_foreground(
            rgb,
            brightness_threshold,
            int(median_px),
            float(min_brightness_threshold),
            background_brightness(rgb),
        )
    else:
        mask = _bright_foreground(
            rgb, saturation_threshold, int(median_px), float(min_otsu_threshold)
        )
    mask = _clean(mask, int(closing_px), int(min_object_px), int(min_hole_px))
    fraction = float(mask.mean()) if mask.size else 0.0
    if fraction > FULL_MASK_WARN_FRACTION:
        log.warning(
            "%s: the tissue mask covers %.1f%% of the slide (%s background); it is probably "
            "wrong: check the QC overlay, and set patching.tissue background or a fixed "
            "threshold",
            slide,
            100.0 * fraction,
            background,
        )
    return mask


def _bright_foreground(
    rgb: np.ndarray, threshold: float | None, median_px: int, min_threshold: float
) -> np.ndarray:
    """Brightfield: median-filtered saturation above ``threshold`` (Otsu's, floored)."""
    saturation = saturation_u8(rgb)
    if median_px > 1:
        saturation = ndimage.median_filter(saturation, size=median_px, mode="nearest")
    if threshold is None:
        threshold = max(otsu_threshold(saturation, integer_levels=True), min_threshold)
    return saturation > threshold


def _dark_foreground(
    rgb: np.ndarray,
    threshold: float | None,
    window_px: int,
    min_threshold: float,
    background_level: float,
) -> np.ndarray:
    """Fluorescence: brightness, grey-closed over ``window_px``, above ``threshold``.

    Without a fixed threshold: Otsu's on ``log(1 + brightness)``, at most
    :data:`DARK_CONTRAST` times ``background_level`` and at least ``min_threshold``. The cap
    matters on nuclear stains: DAPI is bright on the nuclei and dim between them, so Otsu's
    cut falls inside the tissue and drops its sparse parts; tissue is anything clearly
    brighter than the background. Pure white pixels (unscanned areas composited on white)
    count as background.

    The grey-level closing (a maximum then a minimum filter) gives the gaps between nuclei
    narrower than the window the brightness around them, and leaves the tissue's outline
    and isolated bright specks where they were; a mean filter would spread the outline by
    half a window, and a median would drop a sparse nuclear stain.
    """
    value = brightness_u8(rgb).astype(np.float64)
    value[(rgb == _WHITE).all(axis=2)] = 0.0
    if window_px > 1:
        value = ndimage.grey_closing(value, size=window_px, mode="nearest")
    if threshold is None:
        scale = 255.0 / math.log(256.0)
        log_levels = np.rint(scale * np.log1p(value)).astype(np.uint8)
        # the brightness at the upper edge of the lower class's last log level
        otsu = math.expm1((otsu_threshold(log_levels, integer_levels=True) + 0.5) / scale)
        threshold = max(min(otsu, DARK_CONTRAST * background_level), min_threshold)
    return value > threshold


def _clean(mask: np.ndarray, closing_px: int, min_object_px: int, min_hole_px: int) -> np.ndarray:
    """Close the mask, drop objects under ``min_object_px`` and fill holes under ``min_hole_px``."""
    if closing_px > 1:
        # pad so that closing does not erode tissue touching the border
        pad = closing_px
        padded = np.pad(mask, pad, mode="edge")
        structure = np.ones((closing_px, closing_px), bool)
        mask = ndimage.binary_closing(padded, structure=structure)[pad:-pad, pad:-pad]
    mask = _remove_small(mask, min_object_px)
    holes = ~mask & ~_touching_border(~mask)
    small_holes = holes & ~_remove_small(holes, min_hole_px)
    return mask | small_holes


def refine_with_sam(
    rgb: np.ndarray, mask: np.ndarray, predictor, *, min_object_px: int = 64
) -> np.ndarray:
    """Refine a classical tissue mask with SAM, one box prompt per tissue piece.

    Each connected piece of ``mask`` (at least ``min_object_px``) becomes a box prompt; SAM's
    mask for it replaces the piece, and a piece for which SAM finds nothing keeps its classical
    mask. ``predictor`` comes from :func:`mmdiag.segment.load_sam` (the CMUS segmentation code).
    """
    from mmdiag.segment.glomerulus import mask_to_box
    from mmdiag.segment.sam import Prompt, sam_mask

    labels, n_pieces = ndimage.label(mask)
    refined = np.zeros_like(mask, dtype=bool)
    for piece in range(1, n_pieces + 1):
        classical = labels == piece
        if classical.sum() < min_object_px:
            continue
        proposal = sam_mask(predictor, rgb, Prompt(box=mask_to_box(classical)))
        refined |= proposal if proposal.any() else classical
    return refined


def _touching_border(mask: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` connected to the image border (background, not holes)."""
    labels, _ = ndimage.label(mask)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border_labels = border_labels[border_labels > 0]
    return np.isin(labels, border_labels)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return rgb


def write_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a boolean mask as a black/white PNG, atomically."""
    mask = np.asarray(mask, bool)
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    return Path(path)


def write_tissue_qc(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    boxes_thumb_px,
    path: str | os.PathLike,
    *,
    min_long_side_px: int = 0,
) -> Path:
    """Write a QC PNG: the thumbnail, the mask contour (green) and the patch boxes (blue).

    ``boxes_thumb_px`` is an iterable of ``(x, y, size)`` squares, or ``(x0, y0, x1, y1)``
    rectangles (end exclusive), in thumbnail pixels.
    ``min_long_side_px``: a thumbnail whose long side is shorter is enlarged by the smallest
    integer factor reaching it (nearest neighbour, so thumbnail pixels stay sharp squares),
    before the contour and boxes are drawn with thin lines; thumbnails at 8 µm/px are often
    only tens of pixels wide, too small to read. :data:`QC_MIN_LONG_SIDE_PX` is a readable
    size; 0 (default) keeps the thumbnail's size.
    Side effects: writes ``path`` atomically.
    """
    image = _check_rgb(thumbnail)
    mask = np.asarray(mask, bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from thumbnail {image.shape[:2]}")
    if int(min_long_side_px) != min_long_side_px or min_long_side_px < 0:
        raise ValueError(f"min_long_side_px must be an integer >= 0, got {min_long_side_px!r}")
    long_side = max(image.shape[:2])
    factor = max(1, math.ceil(int(min_long_side_px) / long_side)) if long_side else 1
    if factor > 1:
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
        mask = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
    else:
        image = image.copy()
    contour = mask & ~ndimage.binary_erosion(mask, iterations=1, border_value=0)
    contour = ndimage.binary_dilation(contour, iterations=1)
    image[contour] = (0, 200, 0)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for box in boxes_thumb_px:
        if len(box) == 3:
            x0, y0, size = box
            x1, y1 = x0 + size, y0 + size
        else:
            x0, y0, x1, y1 = box
        draw.rectangle(
            [
                float(x0) * factor,
                float(y0) * factor,
                float(x1) * factor - 1,
                float(y1) * factor - 1,
            ],
            outline=(30, 60, 220),
        )
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
