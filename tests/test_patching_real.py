"""The patching stage on real scanner files: OME-TIFF colours and µm/px, dark-slide padding.

The OME-TIFFs (QuPath/Bio-Formats exports) hold JPEG tiles that are YCbCr under an RGB tag:
tifffile + imagecodecs decodes them right, libvips does not. The engine must read them with
tifffile, give the pixels tifffile gives, and record the µm/px of the OME-XML. The DAPI NDPI is
a dark fluorescence slide whose 5x contexts cross the slide edge; their padding must be the
slide's (dark) background, not white.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from mmdiag.data.manifest import MANIFEST_COLUMNS, write_manifest
from mmdiag.patching import engine
from mmdiag.patching.pipeline import patch_manifest_slide, patch_slide
from mmdiag.patching.store import open_patch_store
from tests.patching_settings import patching_settings, slide_manifest_row

openslide = pytest.importorskip("openslide")

REAL_WSI = Path("/work/shared/data/real/wsi")
OME_MPP = {
    "OS-1-detail.ome.tif": 0.22710,
    "OS-2-ndpi.ome.tif": 0.22710,
    "OS-2-vsi.ome.tif": 0.34605,
}
DAPI = REAL_WSI / "test3-DAPI-2-387.ndpi"
PATCH_PX = 128

SETTINGS = patching_settings(workers=1)


def _real(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent")
    return path


def _store_pixels(store, scale: str) -> np.ndarray:
    return np.asarray(store.group[f"pixels_{scale}"][...])


def _reference_region(image: np.ndarray, x0: int, y0: int, size: int, background) -> np.ndarray:
    """``size`` x ``size`` level-0 pixels of ``image`` at (x0, y0), background outside."""
    out = np.empty((size, size, 3), np.uint8)
    out[...] = background
    height, width = image.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, width), min(y0 + size, height)
    if xa < xb and ya < yb:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = image[ya:yb, xa:xb]
    return out


# -- OME-TIFF ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ome_stores(tmp_path_factory) -> dict[str, object]:
    """Each real OME-TIFF patched through a manifest row without an mpp (metadata decides).

    ``base_mpp`` is the file's own µm/px, so base patches are read without any resize.
    OS-2-ndpi runs with two workers and small blocks, to cover the worker processes.
    """
    root = tmp_path_factory.mktemp("ome")
    rows = []
    for name in OME_MPP:
        path = _real(REAL_WSI / name)
        rows.append(slide_manifest_row(name.split(".")[0], path, float("nan")))
    manifest = write_manifest(pd.DataFrame(rows)[list(MANIFEST_COLUMNS)], root / "manifest.tsv")
    stores = {}
    for row in rows:
        name = Path(row["path"]).name
        with tifffile.TiffFile(row["path"]) as tiff:
            mpp = float(tiff.ome_metadata.split('PhysicalSizeX="')[1].split('"')[0])
        parallel = name == "OS-2-ndpi.ome.tif"
        settings = {
            **SETTINGS,
            "base_mpp": mpp,
            "patch_px": PATCH_PX,
            "min_tissue": 0.25,
            "thumbnail_mpp": 2.0,
            "workers": 2 if parallel else 1,
            "block_px": 300 if parallel else 4096,
        }
        stem = row["image_id"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "MIN_PX_PER_WORKER", 1)  # a small slide, through the pool
            summary = patch_manifest_slide(
                manifest,
                stem,
                settings,
                store_path=root / f"{stem}.zarr",
                mask_path=root / f"{stem}.png",
                qc_path=root / f"{stem}-qc.png",
            )
        stores[name] = (summary, open_patch_store(root / f"{stem}.zarr"))
    return stores


@pytest.mark.parametrize("name", list(OME_MPP))
def test_ome_reader_is_tifffile(name):
    reader = engine.open_reader(_real(REAL_WSI / name))
    try:
        assert isinstance(reader, engine.TiffReader)
        assert reader.level_downsamples == (1.0,)
    finally:
        reader.close()


@pytest.mark.parametrize("name", list(OME_MPP))
def test_ome_patches_equal_tifffile(ome_stores, name):
    summary, store = ome_stores[name]
    assert summary["n_patches"] > 0 and len(store.grid) == summary["n_patches"]
    assert store.attrs["mpp"] == pytest.approx(OME_MPP[name], rel=1e-4)
    assert store.attrs["mpp_source"] == "metadata"
    image = tifffile.imread(REAL_WSI / name)
    background = tuple(store.attrs["background"])
    base = store.scales[0]
    assert (store.grid[f"size_{base}"] == PATCH_PX).all()  # no resize at the base scale
    for scale in store.scales:
        pixels = _store_pixels(store, scale)
        coords = store.grid[[f"x_{scale}", f"y_{scale}", f"size_{scale}"]].to_numpy()
        expected = []
        for x0, y0, size in coords.tolist():
            region = _reference_region(image, x0, y0, size, background)
            if size != PATCH_PX:
                region = np.asarray(
                    Image.fromarray(region).resize((PATCH_PX, PATCH_PX), Image.Resampling.BOX)
                )
            expected.append(region)
        expected = np.stack(expected)
        if scale == base:
            np.testing.assert_array_equal(pixels, expected)
        means = pixels.reshape(-1, 3).mean(0)
        np.testing.assert_allclose(means, expected.reshape(-1, 3).mean(0), atol=1.0)


def test_ome_colours_are_not_libvips(ome_stores):
    """OS-2-vsi: tifffile's decode is near grey (194/197/200); libvips' is 196/130/126."""
    name = "OS-2-vsi.ome.tif"
    image = tifffile.imread(REAL_WSI / name)
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), [194, 197, 200], atol=1.0)
    _, store = ome_stores[name]
    base = store.scales[0]
    means = _store_pixels(store, base).reshape(-1, 3).mean(0)
    assert abs(means[1] - means[0]) < 15 and abs(means[2] - means[0]) < 15
    pyvips = pytest.importorskip("pyvips")
    vips = pyvips.Image.new_from_file(str(REAL_WSI / name), access="random")
    decoded = np.ndarray(
        buffer=vips.write_to_memory(), dtype=np.uint8, shape=(vips.height, vips.width, vips.bands)
    )[..., :3]
    coords = store.grid[[f"x_{base}", f"y_{base}", f"size_{base}"]].to_numpy()
    wrong = np.stack([decoded[y : y + s, x : x + s] for x, y, s in coords.tolist()])
    assert np.abs(wrong.reshape(-1, 3).mean(0) - means).max() > 30


# -- dark fluorescence NDPI ----------------------------------------------------------------------
def _outside_lines(start_level: int, side: int, limit: int, out_px: int) -> np.ndarray:
    """Output lines (rows or columns) whose BOX-filter support lies wholly outside the slide.

    ``start_level`` is the region's first pixel at the level read, ``side`` its pixels there,
    ``limit`` the level's size along that axis.
    """
    scale = side / out_px
    lines = []
    for c in range(out_px):
        first = start_level + math.floor(c * scale)
        last = start_level + math.ceil((c + 1) * scale) - 1
        if last < 0 or first >= limit:
            lines.append(c)
    return np.asarray(lines, np.int64)


@pytest.fixture(scope="module")
def dapi_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dapi")
    patch_slide(
        _real(DAPI),
        SETTINGS,
        store_path=root / "dapi.zarr",
        mask_path=root / "dapi.png",
        qc_path=root / "dapi-qc.png",
        progress=False,
    )
    return open_patch_store(root / "dapi.zarr")


def test_dapi_contexts_are_padded_with_dark_background(dapi_store):
    store = dapi_store
    background = np.asarray(store.attrs["background"])
    assert background.max() < 40  # dark fluorescence glass, not white
    reader = engine.open_reader(DAPI)
    downsamples, dimensions = reader.level_downsamples, reader.level_dimensions
    reader.close()
    out_px = SETTINGS["patch_px"]
    scale = store.scales[-1]
    pixels = _store_pixels(store, scale)
    coords = store.grid[[f"x_{scale}", f"y_{scale}", f"size_{scale}"]].to_numpy()
    width0, height0 = dimensions[0]
    crossing = 0
    for patch, (x0, y0, size) in zip(pixels, coords.tolist(), strict=True):
        if x0 >= 0 and y0 >= 0 and x0 + size <= width0 and y0 + size <= height0:
            continue
        crossing += 1
        level = engine.choose_level(downsamples, size, out_px)
        ds = downsamples[level]
        side = math.ceil(size / ds)
        level_w, level_h = dimensions[level]
        columns = _outside_lines(math.floor(x0 / ds), side, level_w, out_px)
        rows = _outside_lines(math.floor(y0 / ds), side, level_h, out_px)
        assert len(columns) or len(rows)
        padding = np.concatenate(
            [patch[:, columns].reshape(-1, 3), patch[rows].reshape(-1, 3)], axis=0
        )
        assert not (padding == 255).any()
        np.testing.assert_array_equal(padding, np.broadcast_to(background, padding.shape))
    assert crossing > 0  # the 5x contexts of this slide do cross its edge
