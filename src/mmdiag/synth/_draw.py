"""Small vectorised drawing helpers shared by the synthetic renderers.

Everything here works on float32 numpy arrays and draws with a caller-supplied
``numpy.random.Generator``, so the renderers stay seeded and deterministic.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def stream_rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """The generator of one random stream (e.g. one modality) of one patient or slide, so
    each output depends only on the seed and its own indices."""
    return np.random.default_rng([int(seed), stream, index])


def balanced_labels(labels, n: int, rng: np.random.Generator) -> list:
    """``n`` labels round-robin over ``labels`` (counts differ by at most one), shuffled by
    ``rng`` so that the order of the patients does not reveal their label."""
    cycled = [labels[i % len(labels)] for i in range(n)]
    return [cycled[i] for i in rng.permutation(n)]


def smooth_noise(rng: np.random.Generator, height_px: int, width_px: int, cell_px: float):
    """Return smooth unit-variance noise of shape ``(height_px, width_px)``.

    Random values on a coarse grid with ``cell_px`` spacing are resized bicubically,
    which is much faster than Gaussian filtering full-resolution white noise.
    """
    coarse_h = max(2, int(np.ceil(height_px / cell_px)) + 1)
    coarse_w = max(2, int(np.ceil(width_px / cell_px)) + 1)
    coarse = rng.standard_normal((coarse_h, coarse_w)).astype(np.float32)
    up = Image.fromarray(coarse, mode="F").resize((width_px, height_px), Image.BICUBIC)
    field = np.asarray(up, dtype=np.float32)
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def impulse_blobs(
    shape: tuple[int, int],
    ys: np.ndarray,
    xs: np.ndarray,
    sigma_px: float,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Gaussian blobs at ``(ys, xs)`` (pixel coordinates), peak about ``weights``.

    Points outside the image are dropped. The result is normalised so that an isolated
    blob of weight 1 peaks at 1.
    """
    height_px, width_px = shape
    ys = np.round(np.asarray(ys)).astype(np.int64)
    xs = np.round(np.asarray(xs)).astype(np.int64)
    weights = np.ones(ys.shape, np.float32) if weights is None else np.asarray(weights)
    keep = (ys >= 0) & (ys < height_px) & (xs >= 0) & (xs < width_px)
    flat = np.bincount(
        ys[keep] * width_px + xs[keep],
        weights=weights[keep],
        minlength=height_px * width_px,
    )
    impulses = flat.reshape(height_px, width_px).astype(np.float32)
    blurred = ndimage.gaussian_filter(impulses, sigma_px, mode="constant")
    return blurred * np.float32(2.0 * np.pi * sigma_px**2)


def soft_step(x: np.ndarray, edge_px: float = 1.0) -> np.ndarray:
    """Smooth 0→1 step at ``x == 0`` (1 where ``x < 0``), anti-aliased over ``edge_px``."""
    return (1.0 / (1.0 + np.exp(np.clip(x / edge_px, -30, 30)))).astype(np.float32)


def blend(image: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend a flat RGB ``colour`` over float32 ``image`` (H, W, 3), in place.

    ``alpha`` (H, W) is clipped to [0, 1]. Returns ``image`` for chaining.
    """
    colour = np.asarray(colour, np.float32)
    a = np.clip(alpha, 0.0, 1.0, dtype=np.float32)[..., None]
    image += (colour - image) * a
    return image


def to_uint8(image: np.ndarray, low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """Round and clip to ``[low, high]`` and return uint8."""
    return np.clip(np.rint(image), low, high).astype(np.uint8)
