"""Patch one whole-slide image: tissue mask, concentric multi-scale grid, pixels, zarr store.

Contexts crossing the slide edge are padded with the slide's own background colour (the median
of the thumbnail's non-tissue border, :func:`~mmdiag.patching.engine.estimate_background`),
recorded in the store's ``attrs["background"]``.

Side effects: writes the slide's zarr store, its tissue mask PNG and a QC overlay PNG (the
thumbnail, the mask contour and the patch grid), each atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import mmdiag
from mmdiag.data.manifest import read_manifest
from mmdiag.io import sha256_file
from mmdiag.patching.engine import estimate_background, extract_patches_multiscale
from mmdiag.patching.slide import Slide
from mmdiag.patching.store import write_patch_store
from mmdiag.patching.tiling import concentric_grid, grid_scales
from mmdiag.patching.tissue import (
    QC_MIN_LONG_SIDE_PX,
    refine_with_sam,
    tissue_mask,
    write_mask_png,
    write_tissue_qc,
)

log = logging.getLogger(__name__)


def patch_slide(
    slide_path: Path,
    settings: Mapping,
    *,
    store_path: Path,
    mask_path: Path,
    qc_path: Path,
    mpp_override: float | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
) -> dict:
    """Segment, tile and (optionally) extract one slide; return a summary row for the index.

    ``expected_sha256`` (the manifest's checksum) guards against a slide replaced after the
    manifest was built: its patches would be filed under the old slide's row.
    """
    started = time.perf_counter()
    checksum = sha256_file(slide_path)
    if expected_sha256 and checksum != expected_sha256:
        raise ValueError(
            f"{slide_path}: content changed since the manifest was built (sha256 "
            f"{checksum[:12]}... now, {expected_sha256[:12]}... in the manifest); rebuild the "
            "manifest (Snakemake does so when the file is listed in images.tsv)"
        )
    with Slide(slide_path, mpp_override=mpp_override, default_mpp=settings["default_mpp"]) as slide:
        info = slide.info
        thumbnail, thumb_mpp = slide.thumbnail(settings["thumbnail_mpp"])
    mask = tissue_mask(thumbnail, **settings["tissue"], name=str(slide_path))
    sam = settings["tissue_sam"]
    if sam["checkpoint"]:
        from mmdiag.segment.sam import load_sam

        predictor = load_sam(Path(sam["checkpoint"]), sam["model_type"])
        mask = refine_with_sam(
            thumbnail, mask, predictor, min_object_px=settings["tissue"]["min_object_px"]
        )
    grid = concentric_grid(
        info,
        mask,
        thumb_mpp,
        base_mpp=settings["base_mpp"],
        patch_px=settings["patch_px"],
        context_factors=tuple(settings["context_factors"]),
        min_tissue=settings["min_tissue"],
    )
    names = grid_scales(grid)
    boxes = _thumbnail_boxes(grid, names[0], info.mpp / thumb_mpp)
    write_mask_png(mask, mask_path)
    write_tissue_qc(thumbnail, mask, boxes, qc_path, min_long_side_px=QC_MIN_LONG_SIDE_PX)
    background = estimate_background(thumbnail, mask)
    pixels = None
    if settings["save_pixels"]:
        regions = [grid[[f"x_{n}", f"y_{n}", f"size_{n}"]].to_numpy() for n in names]
        arrays = extract_patches_multiscale(
            slide_path,
            regions,
            out_px=settings["patch_px"],
            workers=settings["workers"],
            block_px=settings["block_px"],
            progress=progress,
            background=background,
        )
        pixels = dict(zip(names, arrays, strict=True))
    attrs = {
        "slide_path": str(Path(slide_path).resolve()),
        "sha256": checksum,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "objective_power": info.objective_power,
        "background": list(background),
        "scales": names,
        "parameters": dict(settings),
        "mmdiag_version": mmdiag.__version__,
    }
    write_patch_store(store_path, grid, attrs=attrs, pixels=pixels)
    seconds = time.perf_counter() - started
    log.info(
        "%s: %d patches at %s (+ %s contexts), mpp %.4g (%s), %.1f s",
        slide_path,
        len(grid),
        names[0],
        ", ".join(names[1:]),
        info.mpp,
        info.mpp_source,
        seconds,
    )
    return {
        "slide": str(slide_path),
        "store": str(store_path),
        "n_patches": len(grid),
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "seconds": round(seconds, 3),
    }


def patch_manifest_slide(
    manifest_path: Path,
    image_id: str,
    settings: Mapping,
    *,
    store_path: Path,
    mask_path: Path,
    qc_path: Path,
) -> dict:
    """:func:`patch_slide` for the manifest row ``image_id`` (its path, per-slide µm/px and
    checksum).

    Raises ``ValueError`` naming the manifest when it has no single row of that id, and naming
    the slide when its content is no longer the one the manifest recorded.
    """
    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["image_id"] == image_id]
    if len(rows) != 1:
        raise ValueError(f"{manifest_path}: no single row with image_id {image_id!r}")
    row = rows.iloc[0]
    mpp = row.get("mpp") if "mpp" in rows.columns else None
    checksum = row.get("sha256")
    return patch_slide(
        Path(row["path"]),
        settings,
        store_path=store_path,
        mask_path=mask_path,
        qc_path=qc_path,
        mpp_override=float(mpp) if mpp is not None and mpp == mpp else None,
        expected_sha256=checksum if isinstance(checksum, str) and checksum else None,
    )


def _thumbnail_boxes(grid, base_name: str, scale: float) -> list[tuple[int, int, int, int]]:
    """The base patches' squares in thumbnail pixels, for the QC overlay."""
    x, y, size = (grid[f"{k}_{base_name}"].to_numpy() * scale for k in ("x", "y", "size"))
    return [
        (int(a), int(b), int(a + s), int(b + s))
        for a, b, s in zip(np.round(x), np.round(y), np.round(size), strict=True)
    ]
