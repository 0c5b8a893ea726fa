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
3. read each block once through a slide reader (:class:`OpenSlideReader` for the vendor formats,
   :class:`TiffReader` for OME-TIFF), fill the parts outside the slide with a background colour,
   crop every region in memory and resize it with PIL's ``BOX`` filter (area average).

OME-TIFF goes through tifffile because OpenSlide cannot open it, and because the JPEG tiles that
QuPath/Bio-Formats writes are YCbCr under an RGB tag: tifffile + imagecodecs decodes them with
the right colours, libvips does not. The reader reads only the tiles a block touches.

Regions crossing the slide edge are padded with ``background`` (white by default, as
OpenSlide composites). The pipeline passes each slide's own background
(:func:`estimate_background`): white padding on a dark fluorescence slide is a bright artefact
that a model would learn from.

The result (white background, OpenSlide reader) is pixel-identical to the straightforward
per-region read (see ``reference_patches`` in the tests). OpenSlide interpolates when a level-0
coordinate is not a multiple of the downsample (sub-pixel offset at that level); a crop from a
block is only identical to such a read when the block has the same sub-pixel phase, so regions
are also grouped by phase. Patch grids whose stride is a multiple of the downsample have a
single phase; on slides with non-integer downsamples many phases may occur, and blocks then
hold fewer regions (correct, but slower). The tifffile reader does not interpolate (it reads
at the floored level coordinate), so there a crop always equals the per-region read.

Worker processes cost about a second to start (a fresh interpreter importing numpy and
OpenSlide), more than a small slide takes to decode; :func:`worker_count` therefore starts only
as many as the decoded pixels pay for. Workers end with the process that started them
(:mod:`mmdiag.patching.workers`), and a damaged tile, in-process or in a worker, ends the
extraction with one :class:`~mmdiag.patching.slide.SlideReadError` naming the file, level and
region.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import mmap
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import openslide
import openslide.lowlevel
from PIL import Image

from mmdiag.io.atomic import exit_cleanly_on_sigterm
from mmdiag.patching.slide import OME_SUFFIXES, SlideError, SlideReadError, decode_error
from mmdiag.patching.workers import end_with_parent, stop_workers

__all__ = [
    "OpenSlideReader",
    "SlideReadError",
    "SlideReader",
    "TiffReader",
    "choose_level",
    "estimate_background",
    "extract_patches",
    "extract_patches_multiscale",
    "open_reader",
    "worker_count",
]

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)

# A level whose downsample exceeds the wanted one by at most 1 % still counts as "fine enough"
# (Aperio pyramids store downsamples such as 4.0002).
_LEVEL_TOLERANCE = 1.01

#: Decoded pixels that pay for one worker process: 64 Mi px take about 1.5 s to decode from JPEG
#: (45 Mpx/s per core here), against about 1 s for a spawned worker to start.
MIN_PX_PER_WORKER = 1 << 26


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


class SlideReader(Protocol):
    """What the engine needs of a slide: its pyramid and region reads.

    ``read_region`` follows OpenSlide's convention: ``location`` is the top-left corner in
    level-0 pixels, ``size`` is in pixels of ``level``, and the result is an (h, w, 3) uint8
    RGB array in which every pixel outside the slide is ``background``. A read that fails to
    decode raises :class:`~mmdiag.patching.slide.SlideReadError` naming the file and region.
    """

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        background: tuple[int, int, int] = WHITE,
    ) -> np.ndarray: ...

    def close(self) -> None: ...


class OpenSlideReader:
    """A slide OpenSlide reads (Aperio, Hamamatsu, MIRAX, generic tiled TIFF, ...)."""

    kind = "openslide"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._slide = openslide.OpenSlide(os.fspath(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        background: tuple[int, int, int] = WHITE,
    ) -> np.ndarray:
        """OpenSlide's ``read_region`` composited over ``background`` (see the protocol)."""
        with _naming_damage(self.path, level, location, size):
            return _read_openslide_rgb(self._slide, location, level, size, background)

    def close(self) -> None:
        self._slide.close()


class TiffReader:
    """An OME-TIFF read with tifffile: each pyramid level as a zarr array over its tiles.

    Only the tiles a read touches are decoded. Level ``k`` is read at
    ``floor(location / downsample_k)`` without interpolation (downsamples are level-0 width
    over level width, as :class:`mmdiag.patching.slide.Slide` computes them).
    """

    kind = "tifffile"

    def __init__(self, path: str | os.PathLike) -> None:
        import tifffile
        import zarr

        self.path = Path(path)
        self._tiff = tifffile.TiffFile(os.fspath(path))
        try:
            series = self._tiff.series[0]
            shape = series.shape
            grey = series.axes == "YX"
            if series.dtype != np.uint8 or not (
                grey or (series.axes == "YXS" and shape[-1] in (3, 4))
            ):
                raise ValueError(
                    f"unsupported OME-TIFF layout axes={series.axes} shape={shape} "
                    f"dtype={series.dtype} (need uint8 YX or YXS with 3 or 4 samples)"
                )
            self._levels = [
                zarr.open_array(series.aszarr(level=k), mode="r") for k in range(len(series.levels))
            ]
        except Exception:
            self._tiff.close()
            raise
        self.level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)
        width0 = self.level_dimensions[0][0]
        self.level_downsamples = tuple(width0 / w for w, _ in self.level_dimensions)

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        background: tuple[int, int, int] = WHITE,
    ) -> np.ndarray:
        """The level's pixels under the region, ``background`` outside the slide."""
        width, height = size
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        # Same float division as the block planner, so crop offsets match.
        x, y = math.floor(location[0] / downsample), math.floor(location[1] / downsample)
        out = np.empty((height, width, 3), np.uint8)
        out[...] = background
        xa, ya = max(x, 0), max(y, 0)
        xb, yb = min(x + width, level_w), min(y + height, level_h)
        if xa < xb and ya < yb:
            with _naming_damage(self.path, level, location, size):
                window = np.asarray(self._levels[level][ya:yb, xa:xb])
            out[ya - y : yb - y, xa - x : xb - x] = _window_rgb(window, background)
        return out

    def close(self) -> None:
        self._tiff.close()
        self._levels = []


@contextlib.contextmanager
def _naming_damage(
    path: Path, level: int, location: tuple[int, int], size: tuple[int, int]
) -> Iterator[None]:
    """Turn a decoder's error (OpenSlide's, imagecodecs', zarr's) into a SlideReadError."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as error:
        raise decode_error(path, level, location, size, error) from error


def _window_rgb(window: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Grey to RGB; RGBA composited over ``background``; RGB as it is."""
    if window.ndim == 2:
        return window[..., None]
    if window.shape[2] == 4:
        alpha = window[..., 3:4].astype(np.float32) / 255.0
        back = np.asarray(background, np.float32)
        rgb = window[..., :3].astype(np.float32) * alpha + back * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)
    return window


def open_reader(slide_path: str | os.PathLike) -> SlideReader:
    """Open a slide for the engine: OME-TIFF with tifffile, anything else with OpenSlide.

    A file OpenSlide does not recognise is still read with tifffile when it is an OME-TIFF
    under another name. Raises ``ValueError`` naming the file when it is missing or unreadable.
    """
    slide_path = Path(slide_path)
    if not slide_path.is_file():
        raise ValueError(f"slide_path: no such slide file: {str(slide_path)!r}")
    if slide_path.name.lower().endswith(OME_SUFFIXES):
        return _open_tiff(slide_path)
    try:
        return OpenSlideReader(slide_path)
    except openslide.OpenSlideUnsupportedFormatError as error:
        if _is_ome_tiff(slide_path):
            return _open_tiff(slide_path)
        raise ValueError(f"slide_path: cannot read slide {str(slide_path)!r}: {error}") from error
    except (openslide.OpenSlideError, OSError) as error:
        raise ValueError(f"slide_path: cannot read slide {str(slide_path)!r}: {error}") from error


def _open_tiff(slide_path: Path) -> TiffReader:
    try:
        return TiffReader(slide_path)
    except Exception as error:  # tifffile raises many types on damaged files
        raise ValueError(
            f"slide_path: cannot read OME-TIFF {str(slide_path)!r}: {error}"
        ) from error


def _is_ome_tiff(slide_path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(slide_path) as tiff:
            return bool(tiff.is_ome)
    except Exception:  # not a TIFF at all
        return False


def _open_reader_kind(slide_path: str, kind: str) -> SlideReader:
    """The reader class the parent process chose, so that every worker reads alike."""
    return TiffReader(slide_path) if kind == TiffReader.kind else OpenSlideReader(slide_path)


def estimate_background(
    thumbnail: np.ndarray, mask: np.ndarray | None = None, *, frame: float = 0.02
) -> tuple[int, int, int]:
    """The slide's background colour: the per-channel median of the thumbnail's border.

    The border is a frame ``frame`` of the shorter side wide (at least one pixel): what lies
    just inside the slide edge is the best guess for what lies past it (glass on brightfield,
    near-black on fluorescence). When a tissue ``mask`` of the thumbnail's shape is given and
    at least a tenth of the frame is not tissue, only those frame pixels count, so tissue
    touching the edge does not colour the background.
    """
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim == 2:
        thumbnail = thumbnail[..., None].repeat(3, axis=2)
    if thumbnail.ndim != 3 or thumbnail.shape[2] < 3 or not thumbnail.size:
        raise ValueError(f"thumbnail: expected an (h, w, 3) image; got {thumbnail.shape}")
    height, width = thumbnail.shape[:2]
    side = max(1, round(frame * min(height, width)))
    border = np.zeros((height, width), bool)
    border[:side] = border[-side:] = True
    border[:, :side] = border[:, -side:] = True
    if mask is not None and np.shape(mask) == (height, width):
        glass = border & ~np.asarray(mask, bool)
        if glass.sum() >= 0.1 * border.sum():
            border = glass
    median = np.median(thumbnail[border][:, :3], axis=0)
    return tuple(int(v) for v in np.rint(median))


def _validate_background(background) -> tuple[int, int, int]:
    values = np.atleast_1d(np.asarray(background))
    if values.shape == (1,):
        values = values.repeat(3)
    if (
        values.shape != (3,)
        or not np.issubdtype(values.dtype, np.integer)
        or (values < 0).any()
        or (values > 255).any()
    ):
        raise ValueError(
            f"background: expected an integer or 3 integers in [0, 255]; got {background!r}"
        )
    return tuple(int(v) for v in values)


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


def _read_openslide_rgb(
    slide: openslide.OpenSlide,
    location: tuple[int, int],
    level: int,
    size: tuple[int, int],
    background: tuple[int, int, int] = WHITE,
) -> np.ndarray:
    """``read_region`` composited over ``background``, as (h, w, 3) uint8 RGB (maybe a view).

    Reads OpenSlide's premultiplied ARGB words straight into a numpy buffer when the low-level
    binding allows it (skipping the RGBA PIL image and its copies). Pixels of alpha 255 are
    their colour and pixels of alpha 0 (outside the slide) are ``background`` after
    compositing, both exactly as ``Image.alpha_composite`` gives them; a block with partial
    alpha takes the PIL path.
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
            red, green, blue = background
            words[transparent] = 0xFF000000 | red << 16 | green << 8 | blue
            return _bgra_to_rgb(words)
    rgba = slide.read_region(location, level, size)
    if rgba.getchannel("A").getextrema()[0] == 255:
        return np.asarray(rgba.convert("RGB"))
    back = Image.new("RGBA", rgba.size, (*background, 255))
    return np.asarray(Image.alpha_composite(back, rgba).convert("RGB"))


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
    reader: SlideReader,
    block: _Block,
    out_px: int,
    outputs: list[np.ndarray] | None = None,
    background: tuple[int, int, int] = WHITE,
) -> list[np.ndarray | None]:
    """Patches of one block, per group; written straight into ``outputs`` when given."""
    rgb = reader.read_region(
        (block.x0_level0, block.y0_level0),
        block.level,
        (block.width_px, block.height_px),
        background,
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


_worker_reader: SlideReader | None = None
_worker_outputs: list[np.ndarray] | None = None
_worker_background: tuple[int, int, int] = WHITE


def _shared_outputs(buffer: mmap.mmap, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Consecutive uint8 arrays of the given shapes over one shared mapping."""
    outputs, offset = [], 0
    for shape in shapes:
        count = math.prod(shape)
        outputs.append(np.frombuffer(buffer, np.uint8, count, offset).reshape(shape))
        offset += count
    return outputs


def _init_worker(
    parent_pid: int,
    slide_path: str,
    kind: str,
    background: tuple[int, int, int],
    shared_path: str | None,
    shapes,
) -> None:
    """Open the slide and the shared output buffer in a new worker, bound to its parent's life."""
    global _worker_reader, _worker_outputs, _worker_background
    end_with_parent(parent_pid)
    _worker_reader = _open_reader_kind(slide_path, kind)
    _worker_background = background
    if shared_path is not None:
        with open(shared_path, "r+b") as file:
            size = sum(math.prod(shape) for shape in shapes)
            _worker_outputs = _shared_outputs(mmap.mmap(file.fileno(), size), shapes)


def _extract_block_in_worker(block: _Block, out_px: int) -> list[np.ndarray | None]:
    assert _worker_reader is not None
    return _extract_block(_worker_reader, block, out_px, _worker_outputs, _worker_background)


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


def worker_count(workers: int, n_blocks: int, decoded_px: int) -> int:
    """How many processes to read ``n_blocks`` blocks of ``decoded_px`` pixels in all with.

    ``min(workers, n_blocks, decoded_px // MIN_PX_PER_WORKER)``, and at least 1 (in-process):
    a spawned worker costs about a second to start, so each must have about
    ``MIN_PX_PER_WORKER`` pixels (64 Mi px, ~1.5 s of JPEG decoding) to decode to pay for it,
    and a block is never split between workers.

    Examples
    --------
    >>> worker_count(2, 4, 7_000_000)  # a small slide runs in-process
    1
    >>> worker_count(8, 40, 3 * MIN_PX_PER_WORKER)
    3
    >>> worker_count(2, 40, 10 * MIN_PX_PER_WORKER)
    2
    """
    return max(1, min(workers, n_blocks, decoded_px // MIN_PX_PER_WORKER))


def _run_blocks(
    reader: SlideReader,
    slide_path: Path,
    blocks: list[_Block],
    out_px: int,
    processes: int,
    outputs: list[np.ndarray],
    shared_path: str | None,
    background: tuple[int, int, int],
) -> Iterator[tuple[_Block, list[np.ndarray | None]]]:
    """Patches of every block, in-process or in ``processes`` spawned workers.

    The pool is created and shut down by the calling thread (the workers' parent-death signal
    follows that thread). If the caller stops early (an error, ``SIGTERM``, the generator
    closed), the workers are killed rather than left to finish queued blocks.
    """
    if processes == 1:
        for block in blocks:
            yield block, _extract_block(reader, block, out_px, outputs, background)
        return
    shapes = [o.shape for o in outputs]
    pool = ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(), str(slide_path), reader.kind, background, shared_path, shapes),
    )
    try:
        # Largest blocks first keeps the workers busy to the end.
        by_size = sorted(blocks, key=lambda b: -b.width_px * b.height_px)
        futures = [pool.submit(_extract_block_in_worker, b, out_px) for b in by_size]
        for block, future in zip(by_size, futures, strict=True):
            yield block, _worker_result(future, slide_path)
    except BaseException:
        stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_result(future: Future, slide_path: Path) -> list[np.ndarray | None]:
    """A worker's patches; its SlideReadError as it is, a dead worker as a SlideError."""
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise SlideError(
            f"{slide_path}: a patch worker process died ({error}); "
            "out of memory? try fewer workers or a smaller block_px"
        ) from error


def extract_patches_multiscale(
    slide_path: str | Path,
    regions_per_scale: Sequence[np.ndarray],
    *,
    out_px: int,
    workers: int = 1,
    block_px: int = 4096,
    progress: bool = False,
    background: int | Sequence[int] = WHITE,
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
    background = _validate_background(background)
    regions_per_scale = [
        _validate_regions(r, f"regions_per_scale[{i}]") for i, r in enumerate(regions_per_scale)
    ]
    reader = open_reader(slide_path)
    try:
        blocks = _plan_blocks(
            regions_per_scale, reader.level_downsamples, out_px, block_px, reader.level_dimensions
        )
        shapes = [(len(r), out_px, out_px, 3) for r in regions_per_scale]
        processes = _log_worker_count(slide_path, workers, blocks)
        outputs, shared_path, fd = _allocate_outputs(shapes, shared=processes > 1)
        try:
            blocks_done = _run_blocks(
                reader, slide_path, blocks, out_px, processes, outputs, shared_path, background
            )
            with contextlib.closing(blocks_done), exit_cleanly_on_sigterm():
                results = blocks_done
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
        reader.close()
    return outputs


def _log_worker_count(slide_path: Path, workers: int, blocks: Sequence[_Block]) -> int:
    """:func:`worker_count` for these blocks, logged with the figures it was chosen from."""
    decoded_px = sum(block.width_px * block.height_px for block in blocks)
    processes = worker_count(workers, len(blocks), decoded_px)
    log.info(
        "%s: %d blocks, %.1f Mpx to decode: %d process(es) (workers=%d; one per %d Mpx)",
        slide_path,
        len(blocks),
        decoded_px / 1e6,
        processes,
        workers,
        MIN_PX_PER_WORKER // 1_000_000,
    )
    return processes


def extract_patches(
    slide_path: str | Path,
    regions: np.ndarray,
    *,
    out_px: int,
    workers: int = 1,
    block_px: int = 4096,
    progress: bool = False,
    background: int | Sequence[int] = WHITE,
) -> np.ndarray:
    """Read square level-0 regions of a slide, resized to ``out_px``, decoding each pixel once.

    Parameters
    ----------
    slide_path : str or Path
        Any slide OpenSlide reads, or an OME-TIFF (read with tifffile; see :func:`open_reader`).
    regions : numpy.ndarray
        (N, 3) integers ``x0, y0, size``: top-left corner and side, in level-0 pixels; all N
        regions have the same ``size``. Parts outside the slide come out ``background``.
    out_px : int
        Side of each returned patch, in pixels.
    workers : int, default 1
        At most this many processes read blocks in parallel (spawned; each opens the slide
        once); fewer when the slide is small (:func:`worker_count`: one per
        ``MIN_PX_PER_WORKER`` decoded pixels, at most one per block), and one runs
        in-process. The output does not depend on it.
    block_px : int, default 4096
        Side of the grid cells, in pixels at the chosen level, that group regions into one
        ``read_region`` each (a block is extended to cover its regions). The output does not
        depend on it; larger blocks cost memory (about 4 * block_px**2 bytes per worker).
    progress : bool, default False
        Show a progress bar over blocks.
    background : int or 3 ints, default white
        RGB colour of the pixels outside the slide (an int is grey), e.g. the slide's own
        background from :func:`estimate_background`, so that a region crossing the edge of a
        dark slide is not padded with bright white.

    Returns
    -------
    numpy.ndarray
        (N, out_px, out_px, 3) uint8 RGB, in the order of ``regions``.

    Raises
    ------
    ValueError
        For invalid arguments, or a missing or unreadable slide (naming the file).
    SlideReadError
        A ``ValueError`` for a tile that cannot be decoded, naming the file, the level and
        the region read, also when a worker process read it.

    Notes
    -----
    The level read is the coarsest with downsample ``ds <= size / out_px * 1.01``. Patch ``i``
    equals ``read_region((x0, y0), level, (ceil(size / ds),) * 2)`` composited over white (the
    default ``background``) and
    resized with ``PIL.Image.resize((out_px, out_px), BOX)``, pixel for pixel.
    """
    return extract_patches_multiscale(
        slide_path,
        [_validate_regions(regions, "regions")],
        out_px=out_px,
        workers=workers,
        block_px=block_px,
        progress=progress,
        background=background,
    )[0]
