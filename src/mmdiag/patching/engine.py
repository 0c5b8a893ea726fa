"""Fast, level-aware, block-wise patch extraction from whole-slide images.

The authors' pipelines (e.g. CS-MIL, Deng et al., MICCAI 2022, github.com/hrlblab/CS-MIL) read
every patch and every context of every patch with its own ``read_region`` at level 0, so each
JPEG tile of the slide is decoded many times (up to ~21 times for 256/512/1024-px concentric
crops). Here each needed slide pixel is decoded about once:

1. per region size, pick the coarsest pyramid level whose downsample is at most
   ``level0_px / out_px * 1.01`` (a 5x context is read from a 4x-downsampled level, not level 0);
2. sort the regions into blocks of at most ``block_px`` x ``block_px`` pixels at that level (a
   grid over the slide; a region belongs to the cell holding its top-left corner and the block
   read is extended to cover all its regions);
3. read each block once with ``openslide.OpenSlide.read_region``, composite over white, crop
   every region in memory and resize it with PIL's ``BOX`` filter (area average).

The result is pixel-identical to the straightforward per-region read (see ``_reference_patch``
in the tests). OpenSlide interpolates when a level-0 coordinate is not a multiple of the
downsample (sub-pixel offset at that level); a crop from a block is only identical to such a
read when the block has the same sub-pixel phase, so regions are also grouped by phase. Patch
grids whose stride is a multiple of the downsample have a single phase; on slides with
non-integer downsamples many phases may occur, and blocks then hold fewer regions (correct, but
slower).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import openslide.lowlevel
from PIL import Image

__all__ = ["choose_level", "extract_patches", "extract_patches_multiscale"]

# A level whose downsample exceeds the wanted one by at most 1 % still counts as "fine enough"
# (Aperio pyramids store downsamples such as 4.0002).
_LEVEL_TOLERANCE = 1.01


@dataclass(frozen=True)
class _Block:
    """One ``read_region`` call and the regions (of one or more scales) cropped from it."""

    level: int
    x0_level0: int  # read_region location, level-0 pixels
    y0_level0: int
    width_px: int  # read size, pixels at `level`
    height_px: int
    # per scale: (scale index, region indices, crop offsets (k, 2) at `level`, crop side px)
    groups: tuple[tuple[int, np.ndarray, np.ndarray, int], ...]


def _open_slide(slide_path: Path) -> openslide.OpenSlide:
    if not slide_path.is_file():
        raise ValueError(f"slide_path: no such slide file: {str(slide_path)!r}")
    try:
        return openslide.OpenSlide(str(slide_path))
    except (openslide.OpenSlideError, OSError) as error:
        raise ValueError(f"slide_path: cannot read slide {str(slide_path)!r}: {error}") from error


def choose_level(level_downsamples: Sequence[float], level0_px: float, out_px: int) -> int:
    """Index of the coarsest level with downsample <= ``level0_px / out_px * 1.01``.

    Falls back to level 0 when no level qualifies (upsampling).

    Examples
    --------
    >>> choose_level([1.0, 2.0, 4.0], 768, 256)
    1
    >>> choose_level([1.0, 4.0, 16.0], 1024, 256)
    1
    """
    wanted = level0_px / out_px * _LEVEL_TOLERANCE
    best = 0
    for level, downsample in enumerate(level_downsamples):
        if downsample <= wanted and downsample >= level_downsamples[best]:
            best = level
    return best


def _validate_regions(regions: np.ndarray, name: str) -> np.ndarray:
    regions = np.asarray(regions)
    if regions.ndim != 2 or regions.shape[1] != 3:
        raise ValueError(f"{name}: expected an (N, 3) array of x0, y0, size; got {regions.shape}")
    if regions.size and not np.issubdtype(regions.dtype, np.integer):
        raise ValueError(f"{name}: expected integer level-0 coordinates; got {regions.dtype}")
    regions = regions.astype(np.int64, copy=False)
    if len(regions) and (regions[:, 2] <= 0).any():
        raise ValueError(f"{name}: region sizes must be positive")
    if len(regions) and (regions[:, 2] != regions[0, 2]).any():
        raise ValueError(f"{name}: all regions must have the same size; got {set(regions[:, 2])}")
    return regions


def _plan_blocks(
    regions_per_scale: Sequence[np.ndarray],
    level_downsamples: Sequence[float],
    out_px: int,
    block_px: int,
    level_dimensions: Sequence[tuple[int, int]] | None = None,
) -> list[_Block]:
    """Group regions of all scales into blocks per (level, sub-pixel phase, grid cell)."""
    members: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    for scale, regions in enumerate(regions_per_scale):
        if not len(regions):
            continue
        level = choose_level(level_downsamples, float(regions[0, 2]), out_px)
        downsample = float(level_downsamples[level])
        # Same float division as OpenSlide, so phases and offsets match its own arithmetic.
        x_level = regions[:, 0] / downsample
        y_level = regions[:, 1] / downsample
        x_floor, y_floor = np.floor(x_level), np.floor(y_level)
        phase_x, phase_y = x_level - x_floor, y_level - y_floor
        # Regions hanging over the slide border join the edge cell, so that a thin block of
        # them does not decode again the tiles of its neighbour. Only at phase 0: OpenSlide
        # does not interpolate a read at a negative sub-pixel location like a positive one.
        width, height = level_dimensions[level] if level_dimensions else (np.inf, np.inf)
        aligned = (phase_x == 0) & (phase_y == 0)
        x_cell = np.where(aligned, np.clip(x_floor, 0, max(width - 1, 0)), x_floor)
        y_cell = np.where(aligned, np.clip(y_floor, 0, max(height - 1, 0)), y_floor)
        cell_x = np.floor_divide(x_cell, block_px).astype(np.int64)
        cell_y = np.floor_divide(y_cell, block_px).astype(np.int64)
        order = np.lexsort((cell_x, cell_y, phase_y, phase_x))
        sorted_keys = np.stack([phase_x, phase_y, cell_y, cell_x], axis=1)[order]
        boundaries = np.flatnonzero((sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)) + 1
        for indices in np.split(order, boundaries):
            first = indices[0]
            key = (
                level,
                float(phase_x[first]),
                float(phase_y[first]),
                int(cell_y[first]),
                int(cell_x[first]),
            )
            members.setdefault(key, []).append((scale, indices))

    blocks = []
    for key in sorted(members):
        level = key[0]
        downsample = float(level_downsamples[level])
        entries = members[key]
        # Block origin: the smallest corner among its regions (same phase, so integer offsets).
        all_regions = np.concatenate([regions_per_scale[s][i] for s, i in entries])
        x0, y0 = int(all_regions[:, 0].min()), int(all_regions[:, 1].min())
        origin_x, origin_y = math.floor(x0 / downsample), math.floor(y0 / downsample)
        groups = []
        width = height = 0
        for scale, indices in entries:
            regions = regions_per_scale[scale][indices]
            side_px = math.ceil(int(regions[0, 2]) / downsample)
            offsets = np.stack(
                [
                    np.floor(regions[:, 0] / downsample).astype(np.int64) - origin_x,
                    np.floor(regions[:, 1] / downsample).astype(np.int64) - origin_y,
                ],
                axis=1,
            )
            width = max(width, int(offsets[:, 0].max()) + side_px)
            height = max(height, int(offsets[:, 1].max()) + side_px)
            groups.append((scale, indices, offsets, side_px))
        blocks.append(_Block(level, x0, y0, width, height, tuple(groups)))
    return blocks


def _bgra_to_rgb(words: np.ndarray) -> np.ndarray:
    """Little-endian ARGB words (bytes B, G, R, A) to a contiguous RGB array.

    One channel at a time: numpy copies long strided rows much faster than 3-byte pixels.
    """
    bgra = words.view(np.uint8).reshape(*words.shape, 4)
    rgb = np.empty((*words.shape, 3), np.uint8)
    for channel in range(3):
        rgb[..., channel] = bgra[..., 2 - channel]
    return rgb


def _read_rgb_over_white(
    slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]
) -> np.ndarray:
    """``read_region`` composited over white, as an (h, w, 3) uint8 RGB array (maybe a view).

    Reads OpenSlide's premultiplied ARGB words straight into a numpy buffer when the low-level
    binding allows it (skipping the RGBA PIL image and its copies). Pixels of alpha 255 are
    their colour and pixels of alpha 0 (outside the slide) are white after compositing, both
    exactly as ``Image.alpha_composite`` gives them; a block with partial alpha takes the PIL
    path.
    """
    width, height = size
    read = getattr(openslide.lowlevel, "_read_region", None)
    if read is not None and sys.byteorder == "little" and width and height:
        words = np.empty((height, width), np.uint32)
        read(
            slide._osr,
            words.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
            *location,
            level,
            width,
            height,
        )
        opaque = np.uint32(0xFF000000)
        if not (words < opaque).any():
            return _bgra_to_rgb(words)
        alpha = words >> 24
        transparent = alpha == 0
        if (transparent | (alpha == 255)).all():
            words[transparent] = 0xFFFFFFFF
            return _bgra_to_rgb(words)
    rgba = slide.read_region(location, level, size)
    if rgba.getchannel("A").getextrema()[0] == 255:
        return np.asarray(rgba.convert("RGB"))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def _box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """``Image.resize(..., BOX)`` by an exact power-of-two ``factor``, bit for bit.

    PIL resamples horizontally, rounds to uint8, then vertically, with fixed-point weights;
    for a power-of-two factor the weights ``1 / factor`` are exact, so each pass is the
    rounded mean ``(sum + factor // 2) // factor``. ``pixels`` sides are multiples of factor.
    """
    wide = np.uint16 if factor <= 128 else np.uint32
    shift = factor.bit_length() - 1
    acc = np.add(pixels[:, 0::factor], pixels[:, 1::factor], dtype=wide)
    for i in range(2, factor):
        acc += pixels[:, i::factor]
    acc += factor // 2
    acc >>= shift
    rows = np.add(acc[0::factor], acc[1::factor])
    for i in range(2, factor):
        rows += acc[i::factor]
    rows += factor // 2
    rows >>= shift
    return rows.astype(np.uint8)


def _integer_factor(side_px: int, out_px: int) -> int | None:
    """The power-of-two reduction factor from ``side_px`` to ``out_px`` (1 for none), or None."""
    if side_px % out_px:
        return None
    factor = side_px // out_px
    return factor if factor & (factor - 1) == 0 else None


def _fill_group(
    rgb: np.ndarray,
    offsets: np.ndarray,
    side_px: int,
    out_px: int,
    out: np.ndarray,
    targets: list[int],
) -> None:
    """Crop (and resize) every region of one group from the block into ``out[targets]``."""
    factor = _integer_factor(side_px, out_px)
    if factor == 1:
        for t, (dx, dy) in zip(targets, offsets.tolist(), strict=True):
            out[t] = rgb[dy : dy + side_px, dx : dx + side_px]
        return
    if factor is None:
        for t, (dx, dy) in zip(targets, offsets.tolist(), strict=True):
            crop = Image.fromarray(np.ascontiguousarray(rgb[dy : dy + side_px, dx : dx + side_px]))
            out[t] = np.asarray(crop.resize((out_px, out_px), Image.Resampling.BOX))
        return
    # Overlapping regions (concentric contexts on a grid) share their reduction: regions of
    # the same offset phase modulo `factor` are cut from one reduced bounding box when that
    # costs less than reducing each region on its own.
    targets_arr = np.asarray(targets)
    phase = (offsets % factor) @ np.array([1, factor])
    for p in np.unique(phase):
        members = np.flatnonzero(phase == p)
        sub = offsets[members]
        x0, y0 = sub.min(axis=0).tolist()
        x1, y1 = (sub.max(axis=0) + side_px).tolist()
        if (x1 - x0) * (y1 - y0) < len(members) * side_px * side_px:
            reduced = _box_reduce(rgb[y0:y1, x0:x1], factor)
            starts = (sub - [x0, y0]) // factor
            for t, (sx, sy) in zip(targets_arr[members].tolist(), starts.tolist(), strict=True):
                out[t] = reduced[sy : sy + out_px, sx : sx + out_px]
        else:
            for t, (dx, dy) in zip(targets_arr[members].tolist(), sub.tolist(), strict=True):
                out[t] = _box_reduce(rgb[dy : dy + side_px, dx : dx + side_px], factor)


def _extract_block(
    slide: openslide.OpenSlide,
    block: _Block,
    out_px: int,
    outputs: list[np.ndarray] | None = None,
) -> list[np.ndarray | None]:
    """Patches of one block, per group; written straight into ``outputs`` when given."""
    rgb = _read_rgb_over_white(
        slide, (block.x0_level0, block.y0_level0), block.level, (block.width_px, block.height_px)
    )
    results: list[np.ndarray | None] = []
    for scale, indices, offsets, side_px in block.groups:
        if outputs is None:
            patches = np.empty((len(offsets), out_px, out_px, 3), np.uint8)
            _fill_group(rgb, offsets, side_px, out_px, patches, list(range(len(offsets))))
            results.append(patches)
        else:
            _fill_group(rgb, offsets, side_px, out_px, outputs[scale], indices.tolist())
            results.append(None)
    return results


_worker_slide: openslide.OpenSlide | None = None
_worker_outputs: list[np.ndarray] | None = None


def _shared_outputs(buffer: mmap.mmap, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Consecutive uint8 arrays of the given shapes over one shared mapping."""
    outputs, offset = [], 0
    for shape in shapes:
        count = math.prod(shape)
        outputs.append(np.frombuffer(buffer, np.uint8, count, offset).reshape(shape))
        offset += count
    return outputs


def _init_worker(slide_path: str, shared_path: str | None, shapes) -> None:
    global _worker_slide, _worker_outputs
    _worker_slide = openslide.OpenSlide(slide_path)
    if shared_path is not None:
        with open(shared_path, "r+b") as file:
            size = sum(math.prod(shape) for shape in shapes)
            _worker_outputs = _shared_outputs(mmap.mmap(file.fileno(), size), shapes)


def _extract_block_in_worker(block: _Block, out_px: int) -> list[np.ndarray | None]:
    assert _worker_slide is not None
    return _extract_block(_worker_slide, block, out_px, _worker_outputs)


def _allocate_outputs(
    shapes: Sequence[tuple[int, ...]], shared: bool
) -> tuple[list[np.ndarray], str | None, int | None]:
    """Output arrays; with ``shared``, over an anonymous shared file the workers map too.

    Workers then write their patches in place instead of pickling them back through a pipe.
    Returns the arrays, the path workers open and the descriptor to close (None when not
    shared, or where ``os.memfd_create`` is missing).
    """
    size = sum(math.prod(shape) for shape in shapes)
    if shared and size and hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("mmdiag-patches")
        os.ftruncate(fd, size)
        outputs = _shared_outputs(mmap.mmap(fd, size), shapes)
        return outputs, f"/proc/{os.getpid()}/fd/{fd}", fd
    return [np.empty(shape, np.uint8) for shape in shapes], None, None


def _run_blocks(
    slide: openslide.OpenSlide,
    slide_path: Path,
    blocks: list[_Block],
    out_px: int,
    workers: int,
    outputs: list[np.ndarray],
    shared_path: str | None,
) -> Iterator[tuple[_Block, list[np.ndarray | None]]]:
    if workers == 1 or len(blocks) <= 1:
        for block in blocks:
            yield block, _extract_block(slide, block, out_px, outputs)
        return
    shapes = [o.shape for o in outputs]
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(slide_path), shared_path, shapes),
    ) as pool:
        # Largest blocks first keeps the workers busy to the end.
        by_size = sorted(blocks, key=lambda b: -b.width_px * b.height_px)
        futures = [pool.submit(_extract_block_in_worker, b, out_px) for b in by_size]
        for block, future in zip(by_size, futures, strict=True):
            yield block, future.result()


def extract_patches_multiscale(
    slide_path: str | Path,
    regions_per_scale: Sequence[np.ndarray],
    *,
    out_px: int,
    workers: int = 1,
    block_px: int = 4096,
    progress: bool = False,
) -> list[np.ndarray]:
    """Extract several region sets (e.g. 20x patches and their 10x/5x contexts) in one pass.

    Regions of different scales that are read from the same pyramid level share blocks, so a
    slide area is decoded once for all of them. See :func:`extract_patches` for the parameters;
    ``regions_per_scale`` is a sequence of (N_i, 3) arrays, each of one region size.

    Returns
    -------
    list of numpy.ndarray
        One (N_i, out_px, out_px, 3) uint8 RGB array per input array, in input order.
    """
    slide_path = Path(slide_path)
    if not isinstance(out_px, int | np.integer) or out_px <= 0:
        raise ValueError(f"out_px: expected a positive integer; got {out_px!r}")
    if not isinstance(workers, int | np.integer) or workers < 1:
        raise ValueError(f"workers: expected a positive integer; got {workers!r}")
    if not isinstance(block_px, int | np.integer) or block_px < 1:
        raise ValueError(f"block_px: expected a positive integer; got {block_px!r}")
    regions_per_scale = [
        _validate_regions(r, f"regions_per_scale[{i}]") for i, r in enumerate(regions_per_scale)
    ]
    slide = _open_slide(slide_path)
    try:
        blocks = _plan_blocks(
            regions_per_scale, slide.level_downsamples, out_px, block_px, slide.level_dimensions
        )
        shapes = [(len(r), out_px, out_px, 3) for r in regions_per_scale]
        parallel = workers > 1 and len(blocks) > 1
        outputs, shared_path, fd = _allocate_outputs(shapes, shared=parallel)
        try:
            results = _run_blocks(slide, slide_path, blocks, out_px, workers, outputs, shared_path)
            if progress:
                from rich.progress import track

                results = track(results, total=len(blocks), description=f"{slide_path.name}")
            for block, patches_per_group in results:
                for (scale, indices, _offsets, _side), patches in zip(
                    block.groups, patches_per_group, strict=True
                ):
                    if patches is not None:
                        outputs[scale][indices] = patches
        finally:
            if fd is not None:
                os.close(fd)
    finally:
        slide.close()
    return outputs


def extract_patches(
    slide_path: str | Path,
    regions: np.ndarray,
    *,
    out_px: int,
    workers: int = 1,
    block_px: int = 4096,
    progress: bool = False,
) -> np.ndarray:
    """Read square level-0 regions of a slide, resized to ``out_px``, decoding each pixel once.

    Parameters
    ----------
    slide_path : str or Path
        Any slide OpenSlide reads.
    regions : numpy.ndarray
        (N, 3) integers ``x0, y0, size``: top-left corner and side, in level-0 pixels; all N
        regions have the same ``size``. Parts outside the slide come out white.
    out_px : int
        Side of each returned patch, in pixels.
    workers : int, default 1
        Processes reading blocks in parallel (spawned; each opens the slide once). 1 runs
        in-process. The output does not depend on it.
    block_px : int, default 4096
        Side of the grid cells, in pixels at the chosen level, that group regions into one
        ``read_region`` each (a block is extended to cover its regions). The output does not
        depend on it; larger blocks cost memory (about 4 * block_px**2 bytes per worker).
    progress : bool, default False
        Show a progress bar over blocks.

    Returns
    -------
    numpy.ndarray
        (N, out_px, out_px, 3) uint8 RGB, in the order of ``regions``.

    Raises
    ------
    ValueError
        For invalid arguments, or a missing or unreadable slide (naming the file).

    Notes
    -----
    The level read is the coarsest with downsample ``ds <= size / out_px * 1.01``. Patch ``i``
    equals ``read_region((x0, y0), level, (ceil(size / ds),) * 2)`` composited over white and
    resized with ``PIL.Image.resize((out_px, out_px), BOX)``, pixel for pixel.
    """
    return extract_patches_multiscale(
        slide_path,
        [_validate_regions(regions, "regions")],
        out_px=out_px,
        workers=workers,
        block_px=block_px,
        progress=progress,
    )[0]
