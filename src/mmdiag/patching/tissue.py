"""Tissue detection on a slide thumbnail: HSV saturation, Otsu threshold, morphology.

Glass is bright and grey (low saturation); stained tissue is coloured. The mask is the
median-filtered saturation above a threshold (Otsu's by default), closed, with small
objects removed and small holes filled. Only numpy and scipy.ndimage are used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from mmdiag.io.atomic import atomic_path
from mmdiag.segment.threshold import otsu_threshold


def saturation_u8(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on a 0..255 scale: ``255 * (max - min) / max`` (0 where max is 0)."""
    rgb = _check_rgb(rgb)
    high = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return np.rint(255.0 * saturation).astype(np.uint8)


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
    saturation_threshold: float | None = None,
    median_px: int = 7,
    closing_px: int = 5,
    min_object_px: int = 64,
    min_hole_px: int = 64,
    min_otsu_threshold: float = 10.0,
) -> np.ndarray:
    """Return a boolean tissue mask of an RGB thumbnail.

    Parameters
    ----------
    rgb
        uint8 image (H, W, 3).
    saturation_threshold
        Fixed threshold on the 0..255 saturation; ``None`` uses Otsu's threshold.
    median_px, closing_px
        Sizes (thumbnail pixels) of the median filter and the square closing element;
        0 or 1 skips the step.
    min_object_px, min_hole_px
        Connected tissue regions smaller than ``min_object_px`` are removed, and holes
        smaller than ``min_hole_px`` filled.
    min_otsu_threshold
        Floor for Otsu's threshold. Glass has saturation of a few units; without a floor
        Otsu splits JPEG noise on a blank slide into "tissue".
    """
    for name, value in (
        ("median_px", median_px),
        ("closing_px", closing_px),
        ("min_object_px", min_object_px),
        ("min_hole_px", min_hole_px),
    ):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if saturation_threshold is not None and not 0 <= saturation_threshold <= 255:
        raise ValueError(f"saturation_threshold must be in [0, 255], got {saturation_threshold!r}")
    saturation = saturation_u8(rgb)
    if median_px > 1:
        saturation = ndimage.median_filter(saturation, size=int(median_px), mode="nearest")
    if saturation_threshold is None:
        threshold = max(otsu_threshold(saturation, integer_levels=True), min_otsu_threshold)
    else:
        threshold = saturation_threshold
    mask = saturation > threshold
    if closing_px > 1:
        # pad so that closing does not erode tissue touching the border
        pad = int(closing_px)
        padded = np.pad(mask, pad, mode="edge")
        structure = np.ones((int(closing_px), int(closing_px)), bool)
        mask = ndimage.binary_closing(padded, structure=structure)[pad:-pad, pad:-pad]
    mask = _remove_small(mask, int(min_object_px))
    holes = ~mask & ~_touching_border(~mask)
    small_holes = holes & ~_remove_small(holes, int(min_hole_px))
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
) -> Path:
    """Write a QC PNG: the thumbnail, the mask contour (green) and the patch boxes (blue).

    ``boxes_thumb_px`` is an iterable of ``(x, y, size)`` squares, or ``(x0, y0, x1, y1)``
    rectangles (end exclusive), in thumbnail pixels.
    Side effects: writes ``path`` atomically.
    """
    image = _check_rgb(thumbnail).copy()
    mask = np.asarray(mask, bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from thumbnail {image.shape[:2]}")
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
        draw.rectangle([float(x0), float(y0), float(x1) - 1, float(y1) - 1], outline=(30, 60, 220))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
