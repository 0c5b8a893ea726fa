"""Read the pixel size of an image file without decoding the whole image.

One entry point, :func:`read_image_size`, dispatches on the file's format:

- raster micrographs (OM, IM, TEM; JPEG/PNG/TIFF): Pillow's lazy ``Image.open(...).size``;
  images of at most :data:`FULL_DECODE_MAX_PX` pixels are also decoded to prove they are
  readable, larger ones are only ``verify()``-ed. TIFFs Pillow cannot open fall back to
  tifffile's page shape.
- whole-slide images (``.svs``, ``.ndpi``, ``.mrxs``, ... or any file of modality ``WSI``):
  OpenSlide ``level_dimensions[0]``, plus a 1-pixel read at the smallest level.
- NIfTI volumes (``.nii``, ``.nii.gz``): the nibabel header shape; the in-plane size is
  the first two array axes (``width_px = shape[0]``, ``height_px = shape[1]``).
- DICOM (``.dcm`` file, or a folder holding one series): pydicom with
  ``stop_before_pixels``; ``width_px = Columns``, ``height_px = Rows``.

Every failure is raised as :class:`ImageReadError`, whose message names the path.

:func:`check_image_decodes` goes further for the manifest's ``verify: decode``: headers can be
intact while the pixels are not (a corrupt JPEG tile deep inside a slide, a truncated PNG, a
damaged gzip stream), and such files would otherwise fail only at patching or training. It
decodes every pixel of a micrograph and every voxel of a volume, and a deterministic sample
of regions on each pyramid level of a slide (:func:`slide_sample_regions`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "DECODE_REGIONS_PER_LEVEL",
    "DECODE_REGION_PX",
    "FULL_DECODE_MAX_PX",
    "ImageReadError",
    "ImageSize",
    "SlideRegion",
    "check_image_decodes",
    "image_stem",
    "read_image_size",
    "slide_sample_regions",
]

#: Raster images up to this many pixels are fully decoded as a readability check.
FULL_DECODE_MAX_PX = 4_000_000

#: Regions decoded per pyramid level of a slide by :func:`check_image_decodes` (by default).
DECODE_REGIONS_PER_LEVEL = 8
#: Side of a decoded slide region, in pixels of its level (a few JPEG tiles of most scanners).
DECODE_REGION_PX = 512
#: At most this many failing regions of one slide are named in an error message.
MAX_NAMED_REGIONS = 3

#: Suffixes only OpenSlide reads (plain ``.tif``/``.tiff`` go to OpenSlide only for WSI).
OPENSLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
VOLUME_MODALITIES = frozenset({"CT", "MR"})
#: Multi-part suffixes removed whole by :func:`image_stem`.
COMPOUND_SUFFIXES = (".nii.gz", ".ome.tiff", ".ome.tif")


class ImageSize(NamedTuple):
    """In-plane size of an image in pixels (for volumes: of one slice)."""

    width_px: int
    height_px: int


class SlideRegion(NamedTuple):
    """One region of a slide level: OpenSlide's ``read_region`` arguments, units in the names."""

    level: int
    x_level0_px: int
    y_level0_px: int
    width_px: int  # pixels of `level`
    height_px: int

    def describe(self) -> str:
        """``level 1 region x=1024,y=0,w=512,h=512``, as the patching engine names a region."""
        return (
            f"level {self.level} region x={self.x_level0_px},y={self.y_level0_px},"
            f"w={self.width_px},h={self.height_px}"
        )


class ImageReadError(ValueError):
    """An image file is missing, of an unknown format, or cannot be decoded."""


def image_stem(path: str | os.PathLike) -> str:
    """Return the name without its suffix (``ct.nii.gz`` -> ``ct``; a folder keeps its name)."""
    name = Path(path).name
    lowered = name.lower()
    for suffix in COMPOUND_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_image_size(path: str | os.PathLike, *, modality: str | None = None) -> ImageSize:
    """Return the in-plane pixel size of the image at ``path``, checking that it decodes.

    Parameters
    ----------
    path
        An image file, or a folder holding one DICOM series.
    modality
        ``OM``, ``IM``, ``TEM``, ``WSI``, ``CT`` or ``MR``; decides the reader where the
        suffix alone does not (a ``.tif`` of modality ``WSI`` is read with OpenSlide).

    Returns
    -------
    ImageSize
        ``(width_px, height_px)``.

    Raises
    ------
    ImageReadError
        When the path does not exist or the image cannot be read; the message names the path.
    """
    readers = {
        "dicom_series": _dicom_series_size,
        "nifti": _nifti_size,
        "dicom_file": _dicom_file_size,
        "slide": _slide_size,
        "raster": _raster_size,
    }
    return _read_with(readers, Path(path), modality)


def check_image_decodes(
    path: str | os.PathLike,
    *,
    modality: str | None = None,
    regions_per_level: int = DECODE_REGIONS_PER_LEVEL,
) -> None:
    """Decode the image's pixels, raising :class:`ImageReadError` if any part fails.

    Micrographs (JPEG/PNG/TIFF) are decoded whole, whatever their size; NIfTI volumes have
    every voxel read (all volumes of a 4D file); DICOM files and series are read with
    :func:`mmdiag.volumes.read_volume`, as the pipeline reads them; slides have the regions
    of :func:`slide_sample_regions` read through the patching engine's reader
    (:func:`mmdiag.patching.engine.open_reader`), and the error names each failing region's
    level and place. Costs a full decode, so the manifest does it only with ``verify: decode``.

    Parameters
    ----------
    path, modality
        As for :func:`read_image_size`.
    regions_per_level
        Slides: regions decoded per pyramid level (every region of a level with fewer).
    """
    if regions_per_level < 1:
        raise ValueError(f"regions_per_level must be at least 1, got {regions_per_level!r}")
    readers = {
        "dicom_series": _decode_volume,
        "nifti": _decode_nifti,
        "dicom_file": _decode_volume,
        "slide": lambda p: _decode_slide(p, regions_per_level),
        "raster": _decode_raster,
    }
    _read_with(readers, Path(path), modality)


def _reader_kind(path: Path, modality: str | None) -> str:
    """Which reader a file needs: by folder, suffix, then modality (see the module docstring)."""
    name = path.name.lower()
    suffix = path.suffix.lower()
    if path.is_dir():
        return "dicom_series"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if suffix == ".dcm" or (modality in VOLUME_MODALITIES and suffix == ""):
        return "dicom_file"
    if suffix in OPENSLIDE_SUFFIXES or modality == "WSI":
        return "slide"
    return "raster"


def _read_with(readers: dict[str, Callable[[Path], object]], path: Path, modality: str | None):
    """Run the reader ``path`` needs, turning any failure into an :class:`ImageReadError`."""
    modality = modality.upper() if modality else None
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    try:
        return readers[_reader_kind(path, modality)](path)
    except ImageReadError:
        raise
    except Exception as exc:  # every reader has its own exception types
        raise ImageReadError(f"{path}: cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _raster_size(path: Path) -> ImageSize:
    from PIL import Image

    try:
        with Image.open(path) as img:
            width_px, height_px = img.size
            if width_px * height_px <= FULL_DECODE_MAX_PX:
                img.load()
            else:
                img.verify()
    except Exception:
        # Pillow lacks some TIFF codecs (JPEG 2000, zstd, ...) and refuses huge pages;
        # tifffile with imagecodecs reads those, and decodes small ones as Pillow would.
        if path.suffix.lower() in TIFF_SUFFIXES:
            return _tiff_size(path, decode=True)
        raise
    return ImageSize(int(width_px), int(height_px))


def _tiff_size(path: Path, *, decode: bool = False) -> ImageSize:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        size = ImageSize(int(page.imagewidth), int(page.imagelength))
        if decode and size.width_px * size.height_px <= FULL_DECODE_MAX_PX:
            page.asarray()
    return size


def _slide_size(path: Path) -> ImageSize:
    import openslide

    if openslide.OpenSlide.detect_format(str(path)) is None:
        if path.suffix.lower() in TIFF_SUFFIXES:
            # a plain (untiled) TIFF that OpenSlide does not claim; still a valid slide scan
            return _tiff_size(path)
        raise ImageReadError(f"{path}: not a whole-slide format OpenSlide can read")
    with openslide.OpenSlide(str(path)) as slide:
        width_px, height_px = slide.level_dimensions[0]
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
    return ImageSize(int(width_px), int(height_px))


def _nifti_size(path: Path) -> ImageSize:
    import nibabel

    shape = nibabel.load(path).header.get_data_shape()
    if len(shape) < 2:
        raise ImageReadError(f"{path}: NIfTI image has shape {shape}, expected at least 2 axes")
    return ImageSize(int(shape[0]), int(shape[1]))


def _dicom_file_size(path: Path) -> ImageSize:
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if rows is None or columns is None:
        raise ImageReadError(f"{path}: DICOM file has no Rows/Columns (not an image)")
    return ImageSize(int(columns), int(rows))


def _series_files(folder: Path) -> list[Path]:
    """The files of a DICOM series folder (hidden files left out), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _dicom_series_size(folder: Path) -> ImageSize:
    files = _series_files(folder)
    if not files:
        raise ImageReadError(f"{folder}: DICOM series folder holds no files")
    sizes = {}
    for file in files:
        try:
            sizes[file.name] = _dicom_file_size(file)
        except Exception as exc:
            raise ImageReadError(
                f"{folder}: DICOM series file {file.name} cannot be read ({exc})"
            ) from exc
    distinct = set(sizes.values())
    if len(distinct) > 1:
        raise ImageReadError(
            f"{folder}: DICOM series slices differ in size: {sorted(distinct)} "
            "(expected one series per folder)"
        )
    return distinct.pop()


# --------------------------------------------------------------------------- full decoding


def slide_sample_regions(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    *,
    regions_per_level: int = DECODE_REGIONS_PER_LEVEL,
    region_px: int = DECODE_REGION_PX,
) -> list[SlideRegion]:
    """The regions :func:`check_image_decodes` reads from a slide, level by level.

    Each level is cut into a grid of ``region_px`` squares (clipped at the right and bottom
    edges). A level of at most ``regions_per_level`` squares is read whole (the small levels
    of a pyramid, whose damage a sample would easily miss); otherwise the squares at
    ``regions_per_level`` evenly spaced positions in row-major order are read, the first and
    the last included, so the sample spans every band of rows and is the same on every run.
    """
    regions = []
    for level, ((width_px, height_px), downsample) in enumerate(
        zip(level_dimensions, level_downsamples, strict=True)
    ):
        columns = -(-width_px // region_px)
        rows = -(-height_px // region_px)
        for cell in _spread(columns * rows, regions_per_level):
            x_px, y_px = (cell % columns) * region_px, (cell // columns) * region_px
            regions.append(
                SlideRegion(
                    level=level,
                    x_level0_px=round(x_px * downsample),
                    y_level0_px=round(y_px * downsample),
                    width_px=min(region_px, width_px - x_px),
                    height_px=min(region_px, height_px - y_px),
                )
            )
    return regions


def _spread(n_cells: int, n_wanted: int) -> list[int]:
    """All of ``range(n_cells)``, or ``n_wanted`` of them evenly spaced, first and last kept."""
    if n_cells <= n_wanted:
        return list(range(n_cells))
    if n_wanted == 1:
        return [0]
    step = (n_cells - 1) / (n_wanted - 1)
    return sorted({round(i * step) for i in range(n_wanted)})


def _decode_slide(path: Path, regions_per_level: int) -> None:
    """Read the sampled regions of every level; name every failing one in one error."""
    from mmdiag.patching.engine import open_reader

    reader = open_reader(path)
    try:
        regions = slide_sample_regions(
            reader.level_dimensions, reader.level_downsamples, regions_per_level=regions_per_level
        )
    finally:
        reader.close()
    failures = _failed_regions(path, regions)
    if failures:
        raise ImageReadError(_regions_message(path, failures, len(regions)))


def _failed_regions(path: Path, regions: Sequence[SlideRegion]) -> list[str]:
    """One line (see :func:`_region_failure`) for each region that fails to read.

    OpenSlide keeps a handle in an error state after its first failed read, so the slide is
    opened afresh after each failure to go on checking the remaining regions.
    """
    from mmdiag.patching.engine import open_reader

    failures = []
    reader = open_reader(path)
    try:
        for region in regions:
            try:
                reader.read_region(
                    (region.x_level0_px, region.y_level0_px),
                    region.level,
                    (region.width_px, region.height_px),
                )
            except Exception as exc:  # OpenSlide, tifffile and imagecodecs raise many types
                failures.append(_region_failure(path, region, exc))
                reader.close()
                reader = None
                reader = open_reader(path)
    finally:
        if reader is not None:
            reader.close()
    return failures


def _region_failure(path: Path, region: SlideRegion, error: Exception) -> str:
    """``cannot decode level L region x=..,y=..,w=..,h=.. (<reason>)``, without the path.

    The engine's reader already words a decode failure so (its ``SlideReadError``); any other
    error is worded the same way, so manifest and patching logs name a region alike.
    """
    message = " ".join(str(error).split())
    if message.startswith(f"{path}: cannot decode "):
        return message.removeprefix(f"{path}: ")
    return f"cannot decode {region.describe()} ({type(error).__name__}: {message})"


def _regions_message(path: Path, failures: Sequence[str], n_regions: int) -> str:
    named = "; ".join(failures[:MAX_NAMED_REGIONS])
    more = len(failures) - MAX_NAMED_REGIONS
    tail = f"; and {more} more" if more > 0 else ""
    return f"{path}: {len(failures)} of {n_regions} sampled slide regions fail: {named}{tail}"


def _decode_raster(path: Path) -> None:
    """Decode the whole (first) image; TIFFs Pillow cannot read go to tifffile."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tif.series[0].asarray()


def _decode_nifti(path: Path) -> None:
    """Read every voxel (gzip and the data block) in the file's own dtype."""
    import nibabel
    import numpy as np

    np.asarray(nibabel.load(path).dataobj)


def _decode_volume(path: Path) -> None:
    """Read a DICOM file or series as the pipeline does, pixel data decoded."""
    from mmdiag.volumes import read_volume

    read_volume(path)
