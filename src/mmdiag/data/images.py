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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "FULL_DECODE_MAX_PX",
    "ImageReadError",
    "ImageSize",
    "image_stem",
    "read_image_size",
]

#: Raster images up to this many pixels are fully decoded as a readability check.
FULL_DECODE_MAX_PX = 4_000_000

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
    path = Path(path)
    modality = modality.upper() if modality else None
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    name = path.name.lower()
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return _dicom_series_size(path)
        if name.endswith(".nii") or name.endswith(".nii.gz"):
            return _nifti_size(path)
        if suffix == ".dcm" or (modality in VOLUME_MODALITIES and suffix == ""):
            return _dicom_file_size(path)
        if suffix in OPENSLIDE_SUFFIXES or modality == "WSI":
            return _slide_size(path)
        return _raster_size(path)
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


def _dicom_series_size(folder: Path) -> ImageSize:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
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
