"""Tests of mmdiag.patching on real scanner files and a synthetic Aperio SVS."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from mmdiag.patching import (
    PatchDataset,
    Slide,
    SlideError,
    concentric_grid,
    grid_scales,
    magnification_from_mpp,
    open_patch_store,
    ordered_sequence,
    otsu_threshold,
    sample_fixed,
    scale_name,
    tissue_mask,
    write_mask_png,
    write_patch_store,
    write_tissue_qc,
)
from mmdiag.patching import store as store_module
from mmdiag.patching.tissue import saturation_u8
from mmdiag.synth.wsi import render_wsi, write_svs
from tests.patching_settings import patching_settings

openslide = pytest.importorskip("openslide")

REAL_WSI = Path("/work/shared/data/real/wsi")
CMU = REAL_WSI / "CMU-1-Small-Region.svs"
TCGA = REAL_WSI / "tcga-cr-7395-01a-01-ts1.svs"
NDPI = REAL_WSI / "test3-DAPI-2-387.ndpi"
OME = REAL_WSI / "OS-2-ndpi.ome.tif"
NDPI_MPP = 0.2281750559028887


def _real(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent")
    return path


# -- reading real files ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "backend", "n_levels", "mpp", "source", "power"),
    [
        (CMU, "openslide", 1, 0.499, "metadata", 20.0),
        (NDPI, "openslide", 7, NDPI_MPP, "metadata", 40.0),
        (OME, "tifffile", 1, 0.2270972, "metadata", None),
    ],
)
def test_real_slides_open(path, backend, n_levels, mpp, source, power):
    with Slide(_real(path)) as slide:
        info = slide.info
    assert info.backend == backend
    assert len(info.level_dimensions) == n_levels == len(info.level_downsamples)
    assert info.mpp == pytest.approx(mpp, rel=1e-5)
    assert info.mpp_source == source
    assert info.objective_power == power


def test_tcga_without_mpp_needs_default(caplog):
    path = _real(TCGA)
    with pytest.raises(SlideError, match="µm/px is unknown") as error:
        Slide(path)
    assert path.name in str(error.value)
    with caplog.at_level(logging.WARNING, logger="mmdiag.patching.slide"):
        with Slide(path, default_mpp=0.5) as slide:
            assert slide.info.mpp == 0.5 and slide.info.mpp_source == "default"
            assert slide.info.level_dimensions == ((4443, 3567), (2221, 1783))
            # JPEG 2000 tiles decode: level 1 equals OpenSlide's own read
            ours = slide.read_level(1, 2000, 1500, 96, 80)
    assert any(path.name in record.getMessage() for record in caplog.records)
    with openslide.OpenSlide(str(path)) as direct:
        theirs = np.asarray(direct.read_region((2000, 1500), 1, (96, 80)))
    assert (theirs[..., 3] == 255).all()
    np.testing.assert_array_equal(ours, theirs[..., :3])
    with Slide(path, mpp_override=0.25, default_mpp=0.5) as slide:
        assert slide.info.mpp == 0.25 and slide.info.mpp_source == "override"


@pytest.mark.parametrize(
    ("path", "level", "x0", "y0"),
    [(CMU, 0, 700, 1200), (NDPI, 0, 1500, 2000), (NDPI, 2, 1024, 900)],
)
def test_read_level_equals_openslide(path, level, x0, y0):
    with Slide(_real(path)) as slide:
        ours = slide.read_level(level, x0, y0, 123, 77)
    with openslide.OpenSlide(str(path)) as direct:
        theirs = np.asarray(direct.read_region((x0, y0), level, (123, 77)))
    assert ours.shape == (77, 123, 3) and ours.dtype == np.uint8
    assert (theirs[..., 3] == 255).all()
    np.testing.assert_array_equal(ours, theirs[..., :3])


def test_read_level_ome_equals_tifffile_and_pads_white():
    path = _real(OME)
    direct = tifffile.imread(path)
    with Slide(path) as slide:
        np.testing.assert_array_equal(
            slide.read_level(0, 1000, 600, 150, 90), direct[600:690, 1000:1150]
        )
        edge = slide.read_level(0, 2150, -10, 100, 40)
    np.testing.assert_array_equal(edge[10:, :52], direct[0:30, 2150:2202])
    assert (edge[:10] == 255).all() and (edge[:, 52:] == 255).all()
    # the OME tiles are YCbCr JPEG: tifffile decodes them to neutral-ish colours, not green
    mean = direct.reshape(-1, 3).mean(0)
    assert np.ptp(mean) < 30


def test_best_level_for_mpp_on_ndpi():
    with Slide(_real(NDPI)) as slide:
        for level in range(7):
            assert slide.best_level_for_mpp(NDPI_MPP * 2**level) == level
            # slightly coarser targets never fall back to a finer level
            assert slide.best_level_for_mpp(NDPI_MPP * 2**level * 1.3) == level
        assert slide.best_level_for_mpp(0.5) == 1
        assert slide.best_level_for_mpp(0.1) == 0
        # a 20x patch of 256 px = 561 level-0 px: read from level 1, not decoded at level 0
        patch = slide.read_at_mpp(1000, 1000, 561, 256)
        assert patch.shape == (256, 256, 3)
        level1 = slide.read_level(1, 1000, 1000, 280, 280)
        expected = np.asarray(Image.fromarray(level1).resize((256, 256), Image.BOX))
        np.testing.assert_array_equal(patch, expected)
        thumb, thumb_mpp = slide.thumbnail(8.0)
    assert thumb_mpp == pytest.approx(8.0, rel=0.02)
    assert thumb.shape[1] == round(3968 * NDPI_MPP / thumb_mpp)


def test_magnification_from_mpp():
    assert magnification_from_mpp(0.25) == 40
    assert magnification_from_mpp(0.5) == 20
    assert [scale_name(m) for m in (0.5, 1.0, 2.0, 4.0)] == ["20x", "10x", "5x", "2.5x"]
    with pytest.raises(ValueError, match="mpp"):
        magnification_from_mpp(0)


# -- errors ----------------------------------------------------------------------------------
def test_missing_corrupt_and_unsupported_files(tmp_path):
    corrupt = tmp_path / "broken.svs"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    bad_ome = tmp_path / "bad.ome.tif"
    bad_ome.write_bytes(b"II*\x00garbage")
    for path in (corrupt, text, bad_ome, tmp_path / "absent.svs"):
        with pytest.raises(SlideError) as error:
            Slide(path)
        assert path.name in str(error.value)
    with pytest.raises(SlideError, match="unsupported"):
        Slide(text)
    with pytest.raises(SlideError, match="missing"):
        Slide(tmp_path / "absent.svs")


# -- tissue ----------------------------------------------------------------------------------
def _reference_otsu(values: np.ndarray) -> int:
    best, best_t = -1.0, 0
    values = values.ravel().astype(np.float64)
    for t in range(256):
        low, high = values[values <= t], values[values > t]
        if len(low) == 0 or len(high) == 0:
            continue
        between = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if between > best:
            best, best_t = between, t
    return best_t


def test_otsu_matches_reference():
    rng = np.random.default_rng(3)
    for _ in range(5):
        values = np.concatenate([rng.normal(40, 10, 500), rng.normal(150, 25, 300)])
        values = np.clip(values, 0, 255).astype(np.uint8)
        assert otsu_threshold(values) == _reference_otsu(values)


def test_otsu_maximises_brute_force_between_class_variance():
    """Every cut t of 8-bit values, its variance from the two classes' pixels directly."""
    rng = np.random.default_rng(5)
    images = [
        np.zeros(0, np.uint8),
        np.full((9, 9), 0, np.uint8),
        np.full((9, 9), 140, np.uint8),
        np.array([7] * 30 + [180] * 30, np.uint8),
    ]
    for _ in range(30):
        glass = rng.normal(rng.uniform(0, 12), rng.uniform(0.5, 4), rng.integers(0, 2000))
        tissue = rng.normal(rng.uniform(30, 200), rng.uniform(3, 40), rng.integers(0, 800))
        images.append(np.clip(np.rint(np.concatenate([glass, tissue])), 0, 255).astype(np.uint8))
    for values in images:
        flat = values.ravel().astype(np.float64)
        between = np.zeros(256)
        for t in range(256):
            low, high = flat[flat <= t], flat[flat > t]
            if low.size and high.size:
                between[t] = low.size * high.size * (low.mean() - high.mean()) ** 2
        threshold = otsu_threshold(values)
        assert threshold.is_integer()
        assert between[int(threshold)] >= between.max() * (1 - 1e-12)
        if between.max() == 0:  # nothing to separate: the first cut
            assert threshold == 0


def test_tissue_mask_on_real_he():
    with Slide(_real(CMU)) as slide:
        thumb, _ = slide.thumbnail(4.0)
    mask = tissue_mask(thumb)
    saturation = saturation_u8(thumb)
    stained = saturation > 60
    glass = (thumb.min(axis=2) > 200) & (saturation < 15)
    assert 0.2 < mask.mean() < 0.6
    assert mask[stained].mean() > 0.95
    assert mask[glass].mean() < 0.05
    # the corners are glass
    for corner in (mask[:20, :20], mask[-20:, :20], mask[:20, -20:]):
        assert corner.mean() < 0.05
    # a fixed threshold of 255 finds nothing, of 0 nearly everything
    assert not tissue_mask(thumb, saturation_threshold=255).any()


def test_tissue_mask_fills_small_holes_and_drops_specks():
    rgb = np.full((100, 100, 3), 245, np.uint8)
    rgb[20:80, 20:80] = (200, 80, 150)
    rgb[45:50, 45:50] = 245  # a 25-px hole
    rgb[5:8, 90:93] = (200, 80, 150)  # a 9-px speck
    mask = tissue_mask(rgb, median_px=1, closing_px=1, min_object_px=30, min_hole_px=30)
    assert mask[20:80, 20:80].all()
    assert not mask[5:8, 90:93].any()
    assert mask.sum() == 3600


def test_qc_and_mask_pngs(tmp_path):
    thumb = np.full((60, 80, 3), 240, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    write_mask_png(mask, tmp_path / "mask.png")
    write_tissue_qc(thumb, mask, [(10, 10, 16), (26, 10, 42, 26)], tmp_path / "qc.png")
    assert (np.asarray(Image.open(tmp_path / "mask.png")) > 0).tolist() == mask.tolist()
    qc = np.asarray(Image.open(tmp_path / "qc.png").convert("RGB"))
    assert qc.shape == (60, 80, 3)
    assert tuple(qc[10, 15]) == (30, 60, 220)  # box edge, (x, y, size)
    assert tuple(qc[25, 35]) == (30, 60, 220)  # box edge, (x0, y0, x1, y1)
    assert tuple(qc[30, 10]) == (0, 200, 0)  # contour
    assert not list(tmp_path.glob(".*"))  # no temporary left over


# -- synthetic slide: grid geometry ----------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_svs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svs")
    image = render_wsi(np.random.default_rng(7), 2048, 1536, mpp=0.25)
    path = write_svs(
        folder / "synthetic.svs",
        image,
        mpp=0.25,
        objective_power=40,
        n_levels=3,
        downsample=2,
        tile_px=256,
        jpeg_quality=90,
    )
    return path, image


def test_synthetic_svs_concentric_grid(synthetic_svs):
    path, image = synthetic_svs
    with Slide(path) as slide:
        info = slide.info
        assert info.mpp == 0.25 and info.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.best_level_for_mpp(1.0) == 2
        thumb, thumb_mpp = slide.thumbnail(4.0)
        mask = tissue_mask(thumb)
        grid = concentric_grid(info, mask, thumb_mpp, base_mpp=0.5, patch_px=64)
        assert grid_scales(grid) == ["20x", "10x", "5x"]
        for row in grid.head(3).itertuples():
            patch = slide.read_at_mpp(row.x_5x, row.y_5x, row.size_5x, 64)
            assert patch.shape == (64, 64, 3)
    assert list(grid.columns) == [
        "patch_id",
        "x_20x",
        "y_20x",
        "size_20x",
        "x_10x",
        "y_10x",
        "size_10x",
        "x_5x",
        "y_5x",
        "size_5x",
        "centre_x",
        "centre_y",
        "tissue_fraction",
    ]
    assert (grid["size_20x"] == 128).all()  # 64 px at 0.5 µm/px on a 0.25 µm/px slide
    assert (grid["size_10x"] == 256).all() and (grid["size_5x"] == 512).all()
    for scale in ("20x", "10x", "5x"):  # same centre, exactly (in half-pixel units)
        np.testing.assert_array_equal(
            2 * grid[f"x_{scale}"] + grid[f"size_{scale}"], 2 * grid["centre_x"]
        )
        np.testing.assert_array_equal(
            2 * grid[f"y_{scale}"] + grid[f"size_{scale}"], 2 * grid["centre_y"]
        )
    assert (grid["x_20x"] % 128 == 0).all() and (grid["y_20x"] % 128 == 0).all()
    assert (grid["x_20x"] + 128 <= 2048).all() and (grid["y_20x"] + 128 <= 1536).all()
    assert grid["patch_id"].is_unique and (grid["tissue_fraction"] >= 0.5).all()

    # tiles lie inside tissue only: reference tissue from the full-resolution pixels
    truth = saturation_u8(image) > 40
    truth_fraction = np.array(
        [truth[r.y_20x : r.y_20x + 128, r.x_20x : r.x_20x + 128].mean() for r in grid.itertuples()]
    )
    assert truth_fraction.min() > 0.25 and np.median(truth_fraction) > 0.8
    kept = set(zip(grid["x_20x"], grid["y_20x"], strict=True))
    for y in range(0, 1536 - 127, 128):
        for x in range(0, 2048 - 127, 128):
            if truth[y : y + 128, x : x + 128].mean() > 0.95:
                assert (x, y) in kept
            if truth[y : y + 128, x : x + 128].mean() < 0.02:
                assert (x, y) not in kept


def test_no_tissue_on_blank_slide(tmp_path):
    path = write_svs(
        tmp_path / "blank.svs",
        np.full((512, 512, 3), 246, np.uint8),
        mpp=0.5,
        objective_power=20,
        n_levels=2,
        downsample=2,
        tile_px=256,
        jpeg_quality=90,
    )
    with Slide(path) as slide:
        thumb, thumb_mpp = slide.thumbnail(4.0)
        with pytest.raises(SlideError, match="no tissue found") as error:
            concentric_grid(slide.info, tissue_mask(thumb), thumb_mpp, patch_px=64)
    assert "blank.svs" in str(error.value)


# -- samplers --------------------------------------------------------------------------------
def _toy_grid(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(n)
    cells = rng.permutation(100)[:n]
    return pd.DataFrame(
        {
            "patch_id": cells,
            "x_20x": (cells % 10) * 64,
            "y_20x": (cells // 10) * 64,
            "size_20x": 64,
            "centre_x": (cells % 10) * 64 + 32,
            "centre_y": (cells // 10) * 64 + 32,
            "tissue_fraction": 1.0,
        }
    )


def test_sample_fixed():
    grid = _toy_grid(40)
    many = sample_fixed(grid, 25, seed=1)
    assert len(many) == 25 and many["patch_id"].is_unique
    pd.testing.assert_frame_equal(many, sample_fixed(grid, 25, seed=1))
    assert not many.equals(sample_fixed(grid, 25, seed=2))
    short = sample_fixed(grid, 100, seed=1)
    assert len(short) == 100 and set(short["patch_id"]) == set(grid["patch_id"])
    uniform = sample_fixed(grid, 100, seed=0, mode="uniform")
    assert (
        uniform["patch_id"].tolist()
        == grid["patch_id"].tolist() * 2 + grid["patch_id"].tolist()[:20]
    )
    spaced = sample_fixed(grid, 10, seed=0, mode="uniform")
    assert spaced["patch_id"].tolist() == grid["patch_id"].iloc[::4].tolist()
    with pytest.raises(ValueError, match="mode"):
        sample_fixed(grid, 5, seed=0, mode="nope")
    with pytest.raises(ValueError, match="n must"):
        sample_fixed(grid, 0, seed=0)


def test_ordered_sequence():
    grid = _toy_grid(48)
    sequence = ordered_sequence(grid, 24)
    assert len(sequence) == 24
    keys = list(zip(sequence["centre_y"], sequence["centre_x"], strict=True))
    assert keys == sorted(keys) and len(set(keys)) == 24
    ordered = grid.sort_values(["centre_y", "centre_x"])["patch_id"].tolist()
    assert sequence["patch_id"].iloc[0] == ordered[0]
    assert sequence["patch_id"].iloc[-1] == ordered[-1]
    short = ordered_sequence(_toy_grid(5), 8)
    expected = _toy_grid(5).sort_values(["centre_y", "centre_x"])["patch_id"].tolist()
    assert short["patch_id"].tolist() == expected + [expected[-1]] * 3


# -- store and dataset -----------------------------------------------------------------------
def _store_inputs(synthetic_svs, n: int = 6):
    path, _ = synthetic_svs
    with Slide(path) as slide:
        thumb, thumb_mpp = slide.thumbnail(4.0)
        grid = concentric_grid(slide.info, tissue_mask(thumb), thumb_mpp, patch_px=32)
        grid = ordered_sequence(grid, n)
        pixels = {
            scale: np.stack(
                [
                    slide.read_at_mpp(r[f"x_{scale}"], r[f"y_{scale}"], r[f"size_{scale}"], 32)
                    for _, r in grid.iterrows()
                ]
            )
            for scale in grid_scales(grid)
        }
        attrs = {"slide": path, "mpp": np.float64(slide.info.mpp), "patch_px": 32}
    return grid, pixels, attrs


def test_patch_store_round_trip_and_dataset(tmp_path, synthetic_svs):
    grid, pixels, attrs = _store_inputs(synthetic_svs)
    target = tmp_path / "slide.zarr"
    write_patch_store(target, grid, attrs=attrs, pixels=pixels)
    store = open_patch_store(target)
    assert store.attrs["complete"] is True and store.attrs["slide"] == str(attrs["slide"])
    assert store.scales == ["20x", "10x", "5x"]
    pd.testing.assert_frame_equal(store.grid, grid[store.grid.columns], check_dtype=False)
    for scale in store.scales:
        np.testing.assert_array_equal(store.pixels(scale, slice(None)), pixels[scale])
        np.testing.assert_array_equal(store.pixels(scale, 2), pixels[scale][2])
        assert store.group[f"pixels_{scale}"].chunks == (1, 32, 32, 3)

    second = tmp_path / "coords_only.zarr"
    write_patch_store(second, grid, attrs=attrs)
    assert open_patch_store(second).pixel_scales == []
    with pytest.raises(ValueError, match="no pixels"):
        PatchDataset([target, second])

    dataset = PatchDataset([target, target], scales=["20x", "5x"])
    assert len(dataset) == 12
    image, store_index, patch_index = dataset[7]
    assert (store_index, patch_index) == (1, 1)
    assert image.shape == (2, 3, 32, 32) and image.dtype.is_floating_point
    expected = pixels["5x"][1].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(image[1].numpy(), expected, atol=1e-6)
    import torch.utils.data

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(batch[0]) for batch in batches) == 12
    assert float(batches[0][0].max()) <= 1.0


def test_interrupted_and_incomplete_stores_are_refused(tmp_path, synthetic_svs, monkeypatch):
    grid, pixels, attrs = _store_inputs(synthetic_svs, n=3)
    target = tmp_path / "slide.zarr"

    def fail(group):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(store_module, "_mark_complete", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_patch_store(target, grid, attrs=attrs, pixels=pixels)
    assert not target.exists() and list(tmp_path.iterdir()) == []

    # a store written without "complete" (e.g. by a crashed older writer) is refused
    monkeypatch.setattr(store_module, "_mark_complete", lambda group: None)
    write_patch_store(target, grid, attrs=attrs)
    with pytest.raises(ValueError, match="incomplete") as error:
        open_patch_store(target)
    assert str(target) in str(error.value)
    with pytest.raises(ValueError, match="cannot open"):
        open_patch_store(tmp_path / "absent.zarr")


def test_a_slide_whose_content_is_not_the_manifests_is_refused(tmp_path, synthetic_svs):
    """The manifest's checksum guards the patch job: a slide replaced after the manifest was
    built stops it, naming the slide, before anything is written."""
    from mmdiag.io import sha256_file
    from mmdiag.patching.pipeline import patch_slide

    path, _ = synthetic_svs
    outputs = {
        "store_path": tmp_path / "s.zarr",
        "mask_path": tmp_path / "mask.png",
        "qc_path": tmp_path / "qc.png",
    }
    settings = patching_settings(patch_px=64, context_factors=[2], thumbnail_mpp=4.0)
    settings |= {"save_pixels": False, "workers": 1}
    with pytest.raises(ValueError, match="content changed since the manifest") as error:
        patch_slide(path, settings, expected_sha256="0" * 64, **outputs)
    assert str(path) in str(error.value)
    assert list(tmp_path.iterdir()) == []

    summary = patch_slide(path, settings, expected_sha256=sha256_file(path), **outputs)
    assert summary["n_patches"] > 0 and outputs["store_path"].is_dir()
    assert open_patch_store(outputs["store_path"]).attrs["sha256"] == sha256_file(path)
