"""Synthetic H&E whole-slide images written as Aperio-style pyramidal SVS files.

The slide shows one or two irregular tissue fragments (pink eosin stroma with fibre
texture and dark-purple haematoxylin nuclei) on a white glass background. The planted
signal is the nuclear density of the tissue, which depends on the disease
(:data:`NUCLEAR_DENSITY`): LN tissue is hypercellular, MN tissue sparse.

The SVS layout follows what OpenSlide's Aperio reader expects: a tiled, JPEG-compressed
RGB level 0 whose ``ImageDescription`` starts with ``Aperio Image Library`` and carries
``AppMag`` and ``MPP``, followed by reduced-resolution levels (``subfiletype=1``), each
``downsample`` times smaller than the one above, made by area averaging.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from mmdiag.synth._draw import blend, impulse_blobs, smooth_noise, soft_step, to_uint8

NUCLEAR_DENSITY = {"IgAN": 1.0, "MN": 0.7, "LN": 1.5}
_NUCLEUS_SPACING_UM = 12.0  # mean distance between nuclei at density 1
_NUCLEUS_SIGMA_UM = 1.6
_BACKGROUND_RGB = (246.0, 246.0, 244.0)


def render_wsi(
    rng: np.random.Generator,
    width_px: int,
    height_px: int,
    *,
    mpp: float,
    disease: str = "IgAN",
) -> np.ndarray:
    """Render an H&E-like slide at ``mpp`` micrometres per pixel; returns uint8 (H, W, 3)."""
    if disease not in NUCLEAR_DENSITY:
        raise ValueError(f"disease must be one of {tuple(NUCLEAR_DENSITY)}, got {disease!r}")
    yy, xx = np.mgrid[0:height_px, 0:width_px].astype(np.float32)
    yy /= np.float32(height_px)
    xx /= np.float32(width_px)

    # Tissue: one or two jittered ellipses whose rims are roughened by smooth noise.
    level = np.full((height_px, width_px), -np.inf, np.float32)
    n_fragments = int(rng.integers(1, 3))
    for index in range(n_fragments):
        if n_fragments == 1:
            cx, cy = rng.uniform(0.42, 0.58), rng.uniform(0.42, 0.58)
        else:
            cx, cy = (0.3 + 0.4 * index) + rng.uniform(-0.05, 0.05), rng.uniform(0.4, 0.6)
        semi_x = rng.uniform(0.2, 0.27) / n_fragments**0.5
        semi_y = rng.uniform(0.22, 0.3)
        angle = rng.uniform(0, np.pi)
        du, dv = xx - cx, (yy - cy) * (height_px / width_px)
        u = du * np.cos(angle) + dv * np.sin(angle)
        v = -du * np.sin(angle) + dv * np.cos(angle)
        level = np.maximum(level, 1.0 - np.sqrt((u / semi_x) ** 2 + (v / semi_y) ** 2))
    level += 0.15 * smooth_noise(rng, height_px, width_px, width_px / 10)
    level += 0.05 * smooth_noise(rng, height_px, width_px, width_px / 40)
    border = np.minimum(np.minimum(xx, 1 - xx), np.minimum(yy, 1 - yy))
    tissue = soft_step(-level, 0.004) * soft_step(0.05 - border, 0.005)

    fibres = smooth_noise(rng, height_px, width_px, max(6.0 / mpp, 2.0))
    image = np.empty((height_px, width_px, 3), np.float32)
    image[:] = _BACKGROUND_RGB
    stroma = np.empty_like(image)
    stroma[:] = (230.0, 150.0, 188.0)
    stroma = blend(stroma, (246, 205, 224), soft_step(-fibres, 0.3) * 0.8)  # light stroma

    spacing_px = _NUCLEUS_SPACING_UM / mpp / np.sqrt(NUCLEAR_DENSITY[disease])
    n_candidates = int(height_px * width_px / spacing_px**2)
    ys = rng.uniform(0, height_px - 1, n_candidates)
    xs = rng.uniform(0, width_px - 1, n_candidates)
    inside = tissue[ys.astype(np.int64), xs.astype(np.int64)] > 0.5
    nuclei = impulse_blobs(
        (height_px, width_px),
        ys[inside],
        xs[inside],
        sigma_px=max(_NUCLEUS_SIGMA_UM / mpp, 0.7),
        weights=rng.uniform(0.8, 1.4, int(inside.sum())),
    )
    stroma = blend(stroma, (78, 42, 118), np.clip(1.7 * nuclei, 0.0, 0.95))

    image = blend(image, 0.0, tissue)
    image += stroma * tissue[..., None]
    image += rng.normal(0.0, 2.0, (height_px, width_px, 1)).astype(np.float32)
    return to_uint8(image)


def pyramid_levels(image: np.ndarray, n_levels: int, downsample: int) -> list[np.ndarray]:
    """Return ``n_levels`` images, each ``downsample`` times smaller, by area averaging."""
    if n_levels < 1 or downsample < 2:
        raise ValueError(f"need n_levels >= 1 and downsample >= 2, got {n_levels}, {downsample}")
    levels = [image]
    for _ in range(1, n_levels):
        previous = Image.fromarray(levels[-1])
        size = (max(1, previous.width // downsample), max(1, previous.height // downsample))
        levels.append(np.asarray(previous.resize(size, Image.BOX)))
    return levels


def write_svs(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    mpp: float,
    objective_power: float,
    n_levels: int,
    downsample: int,
    tile_px: int,
    jpeg_quality: int,
) -> Path:
    """Write ``image`` (uint8 RGB, level 0) as an Aperio-style pyramidal SVS at ``path``.

    Side effects: writes ``path`` (not atomically; callers build in a temporary folder).
    No timestamp is written, so the same pixels give the same bytes.
    """
    path = Path(path)
    height, width = image.shape[:2]
    head = "Aperio Image Library v12.0.15 \r\n"
    tail = f"|AppMag = {objective_power:g}|MPP = {mpp:g}"
    bigtiff = image.nbytes > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
        for index, level in enumerate(pyramid_levels(image, n_levels, downsample)):
            level_h, level_w = level.shape[:2]
            if index == 0:
                description = (
                    f"{head}{width}x{height} [0,0 {width}x{height}] "
                    f"({tile_px}x{tile_px}) JPEG/RGB Q={jpeg_quality}{tail}"
                )
            else:
                description = f"{head}{width}x{height} -> {level_w}x{level_h} - {tail}"
            level_mpp = mpp * width / level_w
            writer.write(
                level,
                tile=(tile_px, tile_px),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                photometric="rgb",
                description=description,
                subfiletype=0 if index == 0 else 1,
                metadata=None,
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                resolutionunit="CENTIMETER",
            )
    return path


def write_patient_slides(
    folder: str | os.PathLike,
    patient_id: str,
    n_slides: int,
    rng: np.random.Generator,
    *,
    width_px: int,
    height_px: int,
    mpp: float,
    disease: str = "IgAN",
    objective_power: float = 20.0,
    n_levels: int = 3,
    downsample: int = 4,
    tile_px: int = 256,
    jpeg_quality: int = 90,
) -> list[Path]:
    """Write ``n_slides`` SVS slides of one patient, ``<patient_id>_s1.svs``, ``_s2``...

    Each slide is a different section: it is rendered by :func:`render_wsi` from its own
    generator, seeded by one integer drawn from ``rng`` per slide, so slides differ from
    each other but depend only on ``rng``'s state. The keyword arguments go to
    :func:`render_wsi` and :func:`write_svs`. Returns the paths in slide order.

    Side effects: writes ``n_slides`` files into the existing ``folder`` (not atomically).
    """
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    section_seeds = rng.integers(0, 2**63 - 1, size=n_slides, dtype=np.int64)
    paths = []
    for number, section_seed in enumerate(section_seeds, start=1):
        pixels = render_wsi(
            np.random.default_rng(int(section_seed)),
            width_px,
            height_px,
            mpp=mpp,
            disease=disease,
        )
        path = Path(folder) / f"{patient_id}_s{number}.svs"
        paths.append(
            write_svs(
                path,
                pixels,
                mpp=mpp,
                objective_power=objective_power,
                n_levels=n_levels,
                downsample=downsample,
                tile_px=tile_px,
                jpeg_quality=jpeg_quality,
            )
        )
    return paths


def write_single_level_tiff(path: Path, size_px: int, tile_px: int = 256) -> Path:
    """Write a tiled JPEG TIFF of one level (no pyramid, no µm/px): a disc of pink, noisy
    'tissue' tiles on white glass, as scanners' single-level exports are.

    Tiles repeat from a small set and are streamed to the writer, so a gigapixel slide takes
    seconds and little memory to write.
    """
    rng = np.random.default_rng(0)
    pink = np.array([200, 110, 160])
    tissue = [
        (pink + rng.integers(-30, 30, (tile_px, tile_px, 3))).clip(0, 255).astype(np.uint8)
        for _ in range(4)
    ]
    glass = np.full((tile_px, tile_px, 3), 242, np.uint8)
    n = math.ceil(size_px / tile_px)

    def tiles():
        for row in range(n):
            for col in range(n):
                inside = (row + 0.5 - n / 2) ** 2 + (col + 0.5 - n / 2) ** 2 < (0.45 * n) ** 2
                yield tissue[(row + col) % 4] if inside else glass

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size_px, size_px, 3),
        dtype=np.uint8,
        tile=(tile_px, tile_px),
        photometric="rgb",
        compression="jpeg",
        metadata=None,
    )
    return path
