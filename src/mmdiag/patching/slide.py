"""Whole-slide image reading with a known resolution, through OpenSlide or tifffile.

Vendor formats (Aperio ``.svs``, Hamamatsu ``.ndpi``, MIRAX ``.mrxs``, Leica ``.scn``,
generic tiled TIFF) are read with OpenSlide; OME-TIFF (``*.ome.tif(f)``) with tifffile, whose
JPEG decoding handles the YCbCr tiles that QuPath/Bio-Formats writes under an RGB tag (libvips
decodes them with wrong colours). All pixel coordinates passed in are level-0 pixels unless a
name says otherwise; all images returned are RGB ``uint8`` arrays of shape (height, width, 3).

The level-0 resolution (micrometres per pixel, ``mpp``) is resolved in this order:
the manifest's per-slide override, the file's metadata, the objective power
(``mpp = 10 / power``), a configured default (with a warning), else :class:`SlideError`.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

OPENSLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".tif",
    ".tiff",
    ".svslide",
    ".bif",
)
OME_SUFFIXES = (".ome.tif", ".ome.tiff")
_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}
_MPP_TOLERANCE = 1.01  # a level 1 % finer than the target still counts as "at" the target


# Level pixels decoded at once when a thumbnail is reduced band by band: about 4 Mi px keep the
# peak near 0.15 GB (an OpenSlide band passes through RGBA and float32 copies) on any slide.
_THUMBNAIL_BAND_PX = 1 << 22


class SlideError(ValueError):
    """A slide cannot be used: missing, unsupported, corrupt, or of unknown resolution."""


class SlideReadError(SlideError):
    """Pixels of a slide cannot be decoded (a damaged tile); the message names the region."""


def decode_error(
    path: str | os.PathLike,
    level: int,
    location: tuple[int, int],
    size: tuple[int, int],
    error: BaseException,
) -> SlideReadError:
    """The error for a failed read of ``size`` level pixels at level-0 ``location``.

    One line, ``<path>: cannot decode level L region x=..,y=..,w=..,h=.. (<reason>)``, with
    ``x, y`` in level-0 pixels (as the read was asked) and ``w, h`` in pixels of the level,
    so that a damaged file and the tile at fault can be found from a job's log alone.
    """
    reason = " ".join(str(error).split()) or type(error).__name__
    (x, y), (width, height) = location, size
    return SlideReadError(
        f"{path}: cannot decode level {level} region x={x},y={y},w={width},h={height} ({reason})"
    )


@dataclass(frozen=True)
class SlideInfo:
    """What the patching stage needs to know about one slide's pyramid."""

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str
    objective_power: float | None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """Micrometres per pixel of ``level``."""
        return self.mpp * self.level_downsamples[level]


def magnification_from_mpp(mpp: float) -> float:
    """Return the nominal objective magnification of ``mpp`` µm/px (0.25 -> 40x, 0.5 -> 20x)."""
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp!r}")
    return 10.0 / mpp


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _to_rgb(region: np.ndarray) -> np.ndarray:
    """Drop alpha by compositing over white (OpenSlide gives premultiplied-free RGBA)."""
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2)
    if region.shape[2] == 4 and region[..., 3].min() == 255:
        return np.ascontiguousarray(region[..., :3])  # opaque: the float path gives the same
    if region.shape[2] == 4:
        alpha = region[..., 3:4].astype(np.float32) / 255.0
        rgb = region[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)
    return np.ascontiguousarray(region[..., :3])


def _ome_physical_size_um(ome_xml: str | None) -> float | None:
    if not ome_xml:
        return None
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            size = _positive_float(element.attrib["PhysicalSizeX"])
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            factor = _OME_UNIT_TO_UM.get(unit)
            if size is not None and factor is not None:
                return size * factor
    return None


class Slide:
    """An open whole-slide image; use as a context manager.

    Parameters
    ----------
    path
        The slide file.
    mpp_override
        Level-0 µm/px from the manifest; wins over anything in the file.
    default_mpp
        Used, with a warning naming the slide, when neither metadata nor objective power
        give the resolution.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        mpp_override: float | None = None,
        default_mpp: float | None = None,
    ) -> None:
        self.path = Path(path)
        self._openslide = None
        self._vendor = None
        self._vips_pages: list = []
        self._tiff = None
        self._levels: list = []
        if not self.path.is_file():
            raise SlideError(f"slide {self.path}: file is missing")
        name = self.path.name.lower()
        if name.endswith(OME_SUFFIXES):
            backend, metadata_mpp, objective_power = self._open_ome()
        elif name.endswith(OPENSLIDE_SUFFIXES):
            backend, metadata_mpp, objective_power = self._open_openslide()
            if self._vendor == "generic-tiff" and self._open_pyvips_pages():
                backend = "pyvips"
        else:
            raise SlideError(
                f"slide {self.path}: unsupported format {self.path.suffix!r} "
                f"(expected one of {OPENSLIDE_SUFFIXES + OME_SUFFIXES})"
            )
        mpp, mpp_source = self._resolve_mpp(
            mpp_override, metadata_mpp, objective_power, default_mpp
        )
        self.info = SlideInfo(
            path=self.path,
            backend=backend,
            level_dimensions=self._level_dimensions,
            level_downsamples=self._level_downsamples,
            mpp=mpp,
            mpp_source=mpp_source,
            objective_power=objective_power,
        )

    # -- opening ---------------------------------------------------------------------------
    def _open_openslide(self) -> tuple[str, float | None, float | None]:
        import openslide

        try:
            handle = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as error:
            raise SlideError(
                f"slide {self.path}: unsupported or unrecognised format ({error})"
            ) from error
        except openslide.OpenSlideError as error:
            raise SlideError(f"slide {self.path}: corrupt or unreadable ({error})") from error
        self._openslide = handle
        self._vendor = handle.properties.get(openslide.PROPERTY_NAME_VENDOR)
        self._level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        props = handle.properties
        mpp_x = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        mpp_y = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
        metadata_mpp = (mpp_x + mpp_y) / 2 if mpp_x and mpp_y else mpp_x or mpp_y
        power = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        return "openslide", metadata_mpp, power

    def _open_ome(self) -> tuple[str, float | None, float | None]:
        import tifffile
        import zarr

        try:
            tiff = tifffile.TiffFile(self.path)
        except Exception as error:  # tifffile raises many types on damaged files
            raise SlideError(
                f"slide {self.path}: corrupt or unreadable OME-TIFF ({error})"
            ) from error
        self._tiff = tiff
        try:
            series = tiff.series[0]
            if series.dtype != np.uint8 or series.axes not in ("YXS", "YX"):
                raise SlideError(
                    f"slide {self.path}: unsupported OME-TIFF layout axes={series.axes} "
                    f"dtype={series.dtype} (need RGB uint8 YXS)"
                )
            for index in range(len(series.levels)):
                self._levels.append(zarr.open_array(series.aszarr(level=index), mode="r"))
        except SlideError:
            self.close()
            raise
        except Exception as error:
            self.close()
            raise SlideError(
                f"slide {self.path}: corrupt or unreadable OME-TIFF ({error})"
            ) from error
        self._level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)
        width0 = self._level_dimensions[0][0]
        self._level_downsamples = tuple(width0 / w for w, _ in self._level_dimensions)
        return "tifffile", _ome_physical_size_um(tiff.ome_metadata), None

    def _open_pyvips_pages(self) -> bool:
        """Plain pyramidal TIFF: read its levels (TIFF pages) with libvips, about 4-5x faster
        than OpenSlide's generic-TIFF reader here (``benchmarks`` in the README). Falls back
        to OpenSlide when the pages do not match OpenSlide's levels."""
        try:
            import pyvips

            first = pyvips.Image.new_from_file(str(self.path), access="random")
            n_pages = first.get("n-pages") if "n-pages" in first.get_fields() else 1
            pages = [
                pyvips.Image.new_from_file(str(self.path), page=k, access="random")
                for k in range(min(n_pages, len(self._level_dimensions)))
            ]
        except Exception:  # libvips without TIFF support, or pages it cannot read
            return False
        if tuple((p.width, p.height) for p in pages) != self._level_dimensions:
            return False
        self._vips_pages = pages
        return True

    def _resolve_mpp(
        self, override, metadata_mpp, objective_power, default_mpp
    ) -> tuple[float, str]:
        if override is not None:
            value = _positive_float(override)
            if value is None:
                raise SlideError(
                    f"slide {self.path}: mpp (the manifest's mpp column) must be > 0, "
                    f"got {override!r}"
                )
            return value, "override"
        if metadata_mpp is not None:
            return metadata_mpp, "metadata"
        if objective_power is not None:
            return 10.0 / objective_power, "objective_power"
        if default_mpp is not None:
            value = _positive_float(default_mpp)
            if value is None:
                raise SlideError(f"slide {self.path}: default_mpp must be > 0, got {default_mpp!r}")
            log.warning(
                "slide %s has no µm/px metadata nor objective power; using default_mpp=%g",
                self.path,
                value,
            )
            return value, "default"
        raise SlideError(
            f"slide {self.path}: µm/px is unknown (no mpp metadata, no objective power); "
            "give it in the manifest's mpp column or set patching.default_mpp"
        )

    # -- reading ---------------------------------------------------------------------------
    def read_level(
        self, level: int, x0_level0: int, y0_level0: int, width: int, height: int
    ) -> np.ndarray:
        """Read ``width`` x ``height`` LEVEL pixels whose top-left is at a level-0 coordinate.

        Like OpenSlide's ``read_region``: the parts outside the slide are white.
        """
        if not 0 <= level < len(self._level_dimensions):
            raise ValueError(f"level must be in [0, {len(self._level_dimensions)}), got {level}")
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be > 0, got {width}x{height}")
        location, size = (int(x0_level0), int(y0_level0)), (int(width), int(height))
        try:
            return self._decode_level(level, location, size)
        except MemoryError:
            raise
        except Exception as error:  # OpenSlide, libvips and imagecodecs each raise their own
            raise decode_error(self.path, level, location, size, error) from error

    def _decode_level(
        self, level: int, location: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """:meth:`read_level` through the slide's backend, errors as the backend raises them."""
        if self._vips_pages:
            return self._read_vips_level(level, *location, *size)
        if self._openslide is not None:
            return _to_rgb(np.asarray(self._openslide.read_region(location, level, size)))
        return self._read_tiff_level(level, *location, *size)

    def _read_vips_level(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        page = self._vips_pages[level]
        downsample = self._level_downsamples[level]
        x, y = int(math.floor(x0 / downsample)), int(math.floor(y0 / downsample))
        out = np.full((height, width, 3), 255, np.uint8)
        xa, ya = max(x, 0), max(y, 0)
        xb, yb = min(x + width, page.width), min(y + height, page.height)
        if xa < xb and ya < yb:
            region = page.crop(xa, ya, xb - xa, yb - ya)
            window = np.ndarray(
                buffer=region.write_to_memory(),
                dtype=np.uint8,
                shape=(yb - ya, xb - xa, region.bands),
            )
            out[ya - y : yb - y, xa - x : xb - x] = _to_rgb(window)
        return out

    def _read_tiff_level(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        array = self._levels[level]
        downsample = self._level_downsamples[level]
        level_w, level_h = self._level_dimensions[level]
        x = int(math.floor(x0 / downsample))
        y = int(math.floor(y0 / downsample))
        out = np.full((height, width, 3), 255, np.uint8)
        xa, ya = max(x, 0), max(y, 0)
        xb, yb = min(x + width, level_w), min(y + height, level_h)
        if xa < xb and ya < yb:
            window = np.asarray(array[ya:yb, xa:xb])
            out[ya - y : yb - y, xa - x : xb - x] = _to_rgb(window)
        return out

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose µm/px is at most ``target_mpp`` (1 % tolerance); else 0."""
        if not target_mpp > 0:
            raise ValueError(f"target_mpp must be > 0, got {target_mpp!r}")
        best = 0
        for level, downsample in enumerate(self._level_downsamples):
            if self.info.mpp * downsample <= target_mpp * _MPP_TOLERANCE:
                if downsample >= self._level_downsamples[best]:
                    best = level
        return best

    def read_at_mpp(
        self, x0_level0: int, y0_level0: int, size_level0_px: int, out_px: int
    ) -> np.ndarray:
        """Read the square of ``size_level0_px`` level-0 pixels and resize it to ``out_px``.

        The pixels come from the coarsest level at least as fine as the output's µm/px
        (``mpp * size_level0_px / out_px``), so level 0 is decoded only when needed.
        """
        if size_level0_px <= 0 or out_px <= 0:
            raise ValueError(
                f"size_level0_px and out_px must be > 0, got {size_level0_px}, {out_px}"
            )
        target_mpp = self.info.mpp * size_level0_px / out_px
        level = self.best_level_for_mpp(target_mpp)
        level_px = max(1, int(round(size_level0_px / self._level_downsamples[level])))
        region = self.read_level(level, x0_level0, y0_level0, level_px, level_px)
        return _resize(region, out_px, out_px)

    def thumbnail(self, target_mpp: float = 8.0) -> tuple[np.ndarray, float]:
        """Return the whole slide near ``target_mpp`` µm/px, and the image's actual µm/px.

        Never upsamples: if level 0 is coarser than ``target_mpp``, level 0 is returned.
        The level is reduced band by band (:meth:`_reduce_level`), so a single-level slide
        costs the memory of one band (about ``_THUMBNAIL_BAND_PX`` pixels), not of level 0.
        """
        level = self.best_level_for_mpp(target_mpp)
        level_w, level_h = self._level_dimensions[level]
        width0 = self._level_dimensions[0][0]
        scale = max(self.info.mpp * self._level_downsamples[level] / target_mpp, 0.0)
        if scale < 1.0:
            out_w = max(1, int(round(level_w * scale)))
            out_h = max(1, int(round(level_h * scale)))
            image = self._reduce_level(level, out_w, out_h)
        else:
            image = self.read_level(level, 0, 0, level_w, level_h)
        return image, self.info.mpp * width0 / image.shape[1]

    def _reduce_level(self, level: int, out_w: int, out_h: int) -> np.ndarray:
        """The whole ``level`` shrunk to ``out_w`` x ``out_h``, bit for bit as PIL's ``BOX``.

        PIL resizes rows first, rounds to uint8, then columns. The level is read in bands of
        whole tile rows (each tile decoded once, about ``_THUMBNAIL_BAND_PX`` pixels a band),
        each band's rows are resized by PIL itself (rows are independent), and the vertical
        pass is PIL's, replayed with its own weights (:func:`_box_weights`) over the reduced
        rows kept from band to band. OpenSlide interpolates a read that starts between the
        rows of a level whose downsample is not an integer, so such a level is read whole (a
        reduced pyramid level, small beside level 0).
        """
        level_w, level_h = self._level_dimensions[level]
        downsample = self._level_downsamples[level]
        if self._openslide is not None and not self._vips_pages and downsample % 1:
            return _resize(self.read_level(level, 0, 0, level_w, level_h), out_w, out_h)
        starts, counts, weights = _box_weights(level_h, out_h)
        ends = starts + counts
        tile_rows = self._tile_rows(level)
        band_rows = tile_rows * max(1, _THUMBNAIL_BAND_PX // (level_w * tile_rows))
        out = np.empty((out_h, out_w, 3), np.uint8)
        kept, kept_from, done = np.empty((0, out_w, 3), np.uint8), 0, 0
        for y0 in range(0, level_h, band_rows):
            rows = min(band_rows, level_h - y0)
            band = self.read_level(level, 0, _level0_coordinate(y0, downsample), level_w, rows)
            reduced = np.asarray(Image.fromarray(band).resize((out_w, rows), Image.BOX))
            kept = np.concatenate([kept, reduced])
            ready = int(np.searchsorted(ends, y0 + rows, side="right"))
            if ready > done:
                sources = starts[done:ready] - kept_from
                out[done:ready] = _vertical_box(kept, sources, weights[done:ready])
                done = ready
            if done < out_h:  # drop the reduced rows no output row needs any more
                kept, kept_from = kept[starts[done] - kept_from :], int(starts[done])
        return out

    def _tile_rows(self, level: int) -> int:
        """Height of the level's tiles, so that band reads start on tile rows (1 if unknown)."""
        if self._tiff is not None:
            page = self._tiff.series[0].levels[level].keyframe
            return max(1, int(page.tilelength or page.rowsperstrip or 1))
        if self._openslide is not None:
            value = self._openslide.properties.get(f"openslide.level[{level}].tile-height")
            return max(1, int(value)) if value else 1
        return 1

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        if self._openslide is not None:
            self._openslide.close()
            self._openslide = None
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        self._levels = []
        self._vips_pages = []

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r})"


def _level0_coordinate(level_px: int, downsample: float) -> int:
    """The smallest level-0 coordinate that reads start at level pixel ``level_px`` from.

    The readers map a level-0 coordinate ``c`` to ``floor(c / downsample)``; for an integer
    downsample this is ``level_px * downsample``, which OpenSlide also reads without
    interpolating.
    """
    coordinate = math.ceil(level_px * downsample)
    while coordinate > 0 and math.floor((coordinate - 1) / downsample) >= level_px:
        coordinate -= 1
    while math.floor(coordinate / downsample) < level_px:
        coordinate += 1
    return coordinate


# PIL's fixed-point precision for 8-bit resampling (Pillow src/libImaging/Resample.c).
_PIL_PRECISION_BITS = 32 - 8 - 2


def _box_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's ``BOX`` coefficients along one axis: first source pixel, count, integer weights.

    The same double-precision steps, in the same order, as Pillow's ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc`` for the box ``(0, in_size)``, so the weights are PIL's exactly.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale  # the box filter's support is 0.5
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    starts = np.maximum((center - support + 0.5).astype(np.int64), 0)
    counts = np.minimum((center + support + 0.5).astype(np.int64), in_size) - starts
    taps = np.arange(ksize)
    offset = ((taps + starts[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    inside = (offset > -0.5) & (offset <= 0.5) & (taps < counts[:, None])
    weights = inside.astype(np.float64)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=weights, where=total != 0)
    fixed = (0.5 + weights * (1 << _PIL_PRECISION_BITS)).astype(np.int64)
    return starts, counts, fixed


def _vertical_box(rows: np.ndarray, starts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """PIL's vertical pass: output row ``i`` is ``rows[starts[i]:]`` weighed by ``weights[i]``,
    rounded and clipped as its ``ImagingResampleVertical_8bpc``."""
    acc = np.full((len(starts), *rows.shape[1:]), 1 << (_PIL_PRECISION_BITS - 1), np.int64)
    last = len(rows) - 1
    for tap in range(weights.shape[1]):
        used = weights[:, tap] != 0
        if used.any():
            source = rows[np.minimum(starts + tap, last)]
            acc += source * np.where(used, weights[:, tap], 0)[:, None, None]
    return np.clip(acc >> _PIL_PRECISION_BITS, 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Box filter when shrinking (area average), bilinear when enlarging."""
    if image.shape[1] == out_w and image.shape[0] == out_h:
        return image
    shrinking = out_w <= image.shape[1] and out_h <= image.shape[0]
    resample = Image.BOX if shrinking else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((out_w, out_h), resample))
