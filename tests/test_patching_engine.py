"""Tests for the block-wise patch-extraction engine, against a slow per-region reference."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

ENGINE_PATH = Path(__file__).parents[1] / "src" / "mmdiag" / "patching" / "engine.py"


def _load_engine():
    try:
        from mmdiag.patching import engine
    except ImportError:  # the package may not be importable while it is being written
        spec = importlib.util.spec_from_file_location("mmdiag.patching.engine", ENGINE_PATH)
        engine = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = engine
        spec.loader.exec_module(engine)
    return engine


engine = _load_engine()

SLIDE_W, SLIDE_H = 3000, 2000
DOWNSAMPLES = (1, 2, 4)


def write_test_svs(path: Path, width: int, height: int, downsamples=DOWNSAMPLES, seed: int = 0):
    """A small tiled-JPEG Aperio-style SVS with noisy blobs, one level per downsample."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    base = coarse.repeat(16, 0).repeat(16, 1)[:height, :width].astype(np.int16)
    base = (base + rng.integers(-30, 30, base.shape, dtype=np.int16)).clip(0, 255)
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate(downsamples):
            lw, lh = width // ds, height // ds
            level = base[: lh * ds, : lw * ds].reshape(lh, ds, lw, ds, 3).mean((1, 3))
            if i == 0:
                desc = (
                    f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}]"
                    " (256x256) JPEG/RGB Q=85|AppMag = 20|MPP = 0.5"
                )
            else:
                desc = (
                    f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {lw}x{lh} - "
                    "|AppMag = 20|MPP = 0.5"
                )
            tw.write(
                level.astype(np.uint8),
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 85},
                photometric="rgb",
                description=desc,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )


def reference_patches(slide_path: Path, regions: np.ndarray, out_px: int) -> np.ndarray:
    """The straightforward way: one read_region per region at the chosen level."""
    slide = openslide.OpenSlide(str(slide_path))
    out = []
    for x0, y0, size in regions.tolist():
        level = engine.choose_level(slide.level_downsamples, size, out_px)
        side = math.ceil(size / slide.level_downsamples[level])
        rgba = slide.read_region((x0, y0), level, (side, side))
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        out.append(np.asarray(rgb.resize((out_px, out_px), Image.Resampling.BOX)))
    slide.close()
    return np.stack(out)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "test.svs"
    write_test_svs(path, SLIDE_W, SLIDE_H)
    return path


def random_regions(rng, n: int, size: int, margin: int) -> np.ndarray:
    x = rng.integers(-margin, SLIDE_W + margin - size, n)
    y = rng.integers(-margin, SLIDE_H + margin - size, n)
    return np.stack([x, y, np.full(n, size)], axis=1)


def test_test_slide_is_read_as_aperio(slide_path):
    slide = openslide.OpenSlide(str(slide_path))
    assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
    assert slide.level_downsamples == (1.0, 2.0, 4.0)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.5


@pytest.mark.parametrize(
    ("size", "out_px"),
    [
        (64, 64),  # level 0, no resize
        (96, 48),  # level 1, no resize
        (256, 64),  # level 2, no resize
        (300, 100),  # level 1 (ds 3 -> 2), non-integer resize 150 -> 100
        (160, 64),  # level 1 (ds 2.5 -> 2), 80 -> 64
        (50, 100),  # upsampling from level 0
        (512, 64),  # level 2, exact 2x box reduction 128 -> 64 (numpy path)
        (1024, 64),  # level 2, exact 4x box reduction 256 -> 64
        (384, 64),  # level 2, 3x reduction 96 -> 64 (PIL path)
    ],
)
def test_matches_per_region_reference(slide_path, size, out_px):
    rng = np.random.default_rng(size)
    # Odd coordinates give sub-pixel phases at levels 1 and 2; the margin puts regions
    # across the slide borders (white padding); block_px 256 puts them across block borders.
    regions = random_regions(rng, 60, size, margin=size // 2)
    expected = reference_patches(slide_path, regions, out_px)
    got = engine.extract_patches(slide_path, regions, out_px=out_px, block_px=256)
    assert got.dtype == np.uint8 and got.shape == (60, out_px, out_px, 3)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("side", [8, 64, 200])
def test_box_reduce_matches_pil(factor, side):
    rgb = np.random.default_rng(side).integers(0, 256, (side * factor, side * factor + factor, 3))
    rgb = rgb.astype(np.uint8)
    expected = Image.fromarray(rgb).resize((side + 1, side), Image.Resampling.BOX)
    np.testing.assert_array_equal(engine._box_reduce(rgb, factor), np.asarray(expected))
    view = rgb[:, ::-1]  # strided input
    expected = Image.fromarray(np.ascontiguousarray(view)).resize(
        (side + 1, side), Image.Resampling.BOX
    )
    np.testing.assert_array_equal(engine._box_reduce(view, factor), np.asarray(expected))


def test_white_outside_slide(slide_path):
    regions = np.array([[-200, -200, 100], [SLIDE_W + 10, 0, 100], [SLIDE_W - 50, 0, 100]])
    got = engine.extract_patches(slide_path, regions, out_px=100)
    assert (got[0] == 255).all() and (got[1] == 255).all()
    assert (got[2][:, 50:] == 255).all() and not (got[2][:, :50] == 255).all()


def test_grid_with_contexts_crosses_blocks(slide_path):
    """A patch grid with concentric contexts, as the pipeline uses it, across block borders."""
    xs, ys = np.meshgrid(np.arange(0, SLIDE_W, 128), np.arange(0, SLIDE_H, 128))
    centres = np.stack([xs.ravel() + 64, ys.ravel() + 64], axis=1)
    scales = [
        np.column_stack([centres - s // 2, np.full(len(centres), s)]) for s in (128, 256, 512)
    ]
    got = engine.extract_patches_multiscale(slide_path, scales, out_px=64, block_px=300)
    for regions, patches in zip(scales, got, strict=True):
        sample = np.random.default_rng(0).choice(len(regions), 40, replace=False)
        np.testing.assert_array_equal(
            patches[sample], reference_patches(slide_path, regions[sample], 64)
        )
        single = engine.extract_patches(slide_path, regions, out_px=64, block_px=4096)
        np.testing.assert_array_equal(patches, single)


def test_independent_of_workers_and_block_px(slide_path, monkeypatch):
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)  # small slides: through the pool
    rng = np.random.default_rng(1)
    regions = random_regions(rng, 200, 128, margin=64)
    one = engine.extract_patches(slide_path, regions, out_px=64, workers=1, block_px=4096)
    small = engine.extract_patches(slide_path, regions, out_px=64, workers=1, block_px=512)
    two = engine.extract_patches(slide_path, regions, out_px=64, workers=2, block_px=512)
    np.testing.assert_array_equal(one, small)
    np.testing.assert_array_equal(one, two)


def test_multiscale_workers_write_shared_outputs(slide_path, monkeypatch):
    """Workers fill the (shared) outputs of all scales, as one process does."""
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)  # small slides: through the pool
    xs, ys = np.meshgrid(np.arange(0, SLIDE_W, 256), np.arange(0, SLIDE_H, 256))
    centres = np.stack([xs.ravel() + 128, ys.ravel() + 128], axis=1)
    scales = [
        np.column_stack([centres - s // 2, np.full(len(centres), s)]) for s in (256, 512, 1024)
    ]
    one = engine.extract_patches_multiscale(slide_path, scales, out_px=128, block_px=1024)
    two = engine.extract_patches_multiscale(slide_path, scales, out_px=128, workers=2, block_px=512)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)
        b[0] = 0  # the returned arrays are writable
    sample = [0, len(centres) // 2, len(centres) - 1]
    for regions, patches in zip(scales, one, strict=True):
        np.testing.assert_array_equal(
            patches[sample], reference_patches(slide_path, regions[sample], 128)
        )


@pytest.mark.parametrize(("ratio", "level"), [(1, 0), (2, 1), (4, 2), (3, 1), (1.5, 0), (8, 2)])
def test_choose_level(slide_path, ratio, level):
    slide = openslide.OpenSlide(str(slide_path))
    assert engine.choose_level(slide.level_downsamples, 256 * ratio, 256) == level


def test_choose_level_tolerates_aperio_downsamples():
    assert engine.choose_level([1.0, 4.0002, 16.001], 1024, 256) == 1


def test_empty_regions(slide_path):
    got = engine.extract_patches(slide_path, np.zeros((0, 3), int), out_px=32)
    assert got.shape == (0, 32, 32, 3)


def test_missing_slide_raises(tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(ValueError, match="nope.svs"):
        engine.extract_patches(missing, np.array([[0, 0, 10]]), out_px=10)


def test_non_slide_file_raises(tmp_path):
    bogus = tmp_path / "notes.svs"
    bogus.write_text("not a slide")
    with pytest.raises(ValueError, match="notes.svs"):
        engine.extract_patches(bogus, np.array([[0, 0, 10]]), out_px=10)


@pytest.mark.parametrize(
    ("regions", "kwargs", "match"),
    [
        (np.zeros((3, 2), int), {"out_px": 8}, "regions"),
        (np.array([[0, 0, 8], [0, 0, 16]]), {"out_px": 8}, "same size"),
        (np.array([[0.0, 0.0, 8.0]]), {"out_px": 8}, "integer"),
        (np.array([[0, 0, 8]]), {"out_px": 0}, "out_px"),
        (np.array([[0, 0, 8]]), {"out_px": 8, "workers": 0}, "workers"),
        (np.array([[0, 0, 8]]), {"out_px": 8, "block_px": 0}, "block_px"),
    ],
)
def test_invalid_arguments(slide_path, regions, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.extract_patches(slide_path, regions, **kwargs)


# -- OME-TIFF through tifffile -----------------------------------------------------------------
OME_W, OME_H = 1500, 1100


@pytest.fixture(scope="module")
def ome_pyramid(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A tiled JPEG OME-TIFF pyramid (levels 1, 2, 4 as SubIFDs) and its decoded levels."""
    rng = np.random.default_rng(5)
    coarse = rng.integers(0, 256, (OME_H // 16 + 1, OME_W // 16 + 1, 3), dtype=np.uint8)
    base = coarse.repeat(16, 0).repeat(16, 1)[:OME_H, :OME_W]
    path = tmp_path_factory.mktemp("ome") / "pyramid.ome.tif"
    options = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(base, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.5}, **options)
        for ds in (2, 4):
            level = np.asarray(
                Image.fromarray(base).resize((OME_W // ds, OME_H // ds), Image.Resampling.BOX)
            )
            tw.write(level, subfiletype=1, **options)
    with tifffile.TiffFile(path) as tiff:
        levels = [np.asarray(level.asarray()) for level in tiff.series[0].levels]
    return path, levels


def _tiff_reference(levels, regions, out_px, background):
    """Per region: the level's floored window, padded with ``background``, BOX-resized."""
    downsamples = [levels[0].shape[1] / level.shape[1] for level in levels]
    out = []
    for x0, y0, size in regions.tolist():
        level = engine.choose_level(downsamples, size, out_px)
        ds = downsamples[level]
        side = math.ceil(size / ds)
        x, y = math.floor(x0 / ds), math.floor(y0 / ds)
        image = levels[level]
        crop = np.empty((side, side, 3), np.uint8)
        crop[...] = background
        xa, ya = max(x, 0), max(y, 0)
        xb, yb = min(x + side, image.shape[1]), min(y + side, image.shape[0])
        if xa < xb and ya < yb:
            crop[ya - y : yb - y, xa - x : xb - x] = image[ya:yb, xa:xb]
        out.append(np.asarray(Image.fromarray(crop).resize((out_px, out_px), Image.Resampling.BOX)))
    return np.stack(out)


def test_ome_pyramid_is_read_with_tifffile(ome_pyramid):
    path, levels = ome_pyramid
    reader = engine.open_reader(path)
    try:
        assert isinstance(reader, engine.TiffReader)
        assert reader.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in levels)
        assert reader.level_downsamples == (1.0, 2.0, 4.0)
        region = reader.read_region((OME_W - 10, -5), 0, (20, 15), (1, 2, 3))
        np.testing.assert_array_equal(region[5:, :10], levels[0][:10, -10:])
        assert (region[:5] == (1, 2, 3)).all() and (region[:, 10:] == (1, 2, 3)).all()
    finally:
        reader.close()


@pytest.mark.parametrize(("size", "out_px"), [(64, 64), (128, 64), (256, 64), (300, 100)])
def test_ome_pyramid_matches_direct_reads(ome_pyramid, size, out_px):
    path, levels = ome_pyramid
    rng = np.random.default_rng(size)
    x = rng.integers(-size // 2, OME_W - size // 2, 50)
    y = rng.integers(-size // 2, OME_H - size // 2, 50)
    regions = np.stack([x, y, np.full(50, size)], axis=1)
    background = (12, 34, 56)
    expected = _tiff_reference(levels, regions, out_px, background)
    got = engine.extract_patches(path, regions, out_px=out_px, block_px=200, background=background)
    np.testing.assert_array_equal(got, expected)


def test_ome_pyramid_workers(ome_pyramid, monkeypatch):
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)  # small slides: through the pool
    path, _ = ome_pyramid
    xs, ys = np.meshgrid(np.arange(-64, OME_W, 128), np.arange(-64, OME_H, 128))
    regions = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 256)], axis=1)
    one = engine.extract_patches(path, regions, out_px=64, background=7)
    two = engine.extract_patches(path, regions, out_px=64, workers=2, block_px=128, background=7)
    np.testing.assert_array_equal(one, two)
    assert (one[0, :8, :8] == 7).all()  # the first region starts 64 px outside the corner


# -- background padding ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dark_slide(tmp_path_factory) -> Path:
    """A dark (fluorescence-like) Aperio SVS: near-black glass, a dim blue blob."""
    from mmdiag.synth.wsi import write_svs

    rng = np.random.default_rng(3)
    image = np.zeros((1024, 1536, 3), np.uint8)
    image[..., 2] = 6
    yy, xx = np.mgrid[:1024, :1536]
    blob = (yy - 512) ** 2 + (xx - 768) ** 2 < 300**2
    image[blob] = (10, 10, 90)
    image = np.clip(image + rng.integers(0, 3, image.shape), 0, 255).astype(np.uint8)
    return write_svs(
        tmp_path_factory.mktemp("dark") / "dark.svs",
        image,
        mpp=0.5,
        objective_power=20,
        n_levels=3,
        downsample=2,
        tile_px=256,
        jpeg_quality=90,
    )


def test_dark_slide_padding_is_its_background(dark_slide, monkeypatch):
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)  # small slides: through the pool
    from mmdiag.patching.slide import Slide

    with Slide(dark_slide) as slide:
        thumbnail, _ = slide.thumbnail(4.0)
    background = engine.estimate_background(thumbnail)
    assert max(background) < 20 and background[2] >= background[0]
    regions = [
        np.array([[-400, -400, 256]]),  # wholly outside
        np.array([[1536 - 128, 256, 256]]),  # right half outside, level 0 (phase 0)
        np.array([[512, 1024 - 256, 512]]),  # bottom half outside, read at level 1
        np.array([[-256, 300, 1024]]),  # left quarter outside, read at level 2
    ]
    got = [
        p[0]
        for p in engine.extract_patches_multiscale(
            dark_slide, regions, out_px=256, background=background
        )
    ]
    assert (got[0] == background).all()
    assert (got[1][:, 128:] == background).all()
    assert (got[2][128:] == background).all()
    assert (got[3][:, :64] == background).all()
    assert not any((patch == 255).any() for patch in got)
    workers = engine.extract_patches_multiscale(
        dark_slide, regions, out_px=256, workers=2, block_px=128, background=background
    )
    for patch, other in zip(got, workers, strict=True):
        np.testing.assert_array_equal(patch, other[0])
    white = engine.extract_patches_multiscale(dark_slide, regions[:2], out_px=256)  # default
    assert (white[0] == 255).all() and (white[1][0][:, 128:] == 255).all()


def test_estimate_background_prefers_non_tissue_border():
    thumbnail = np.full((100, 120, 3), (240, 235, 230), np.uint8)
    thumbnail[:, :70] = (150, 60, 140)  # tissue touching the top, bottom and left edges
    assert engine.estimate_background(thumbnail) == (150, 60, 140)  # most of the frame
    mask = np.zeros((100, 120), bool)
    mask[:, :70] = True
    assert engine.estimate_background(thumbnail, mask) == (240, 235, 230)
    everything = np.ones((100, 120), bool)  # no glass on the frame: the whole frame counts
    assert engine.estimate_background(thumbnail, everything) == (150, 60, 140)
    assert engine.estimate_background(np.full((5, 5), 9, np.uint8)) == (9, 9, 9)


@pytest.mark.parametrize("background", [256, -1, (1, 2), (1.5, 2, 3), "white"])
def test_invalid_background(slide_path, background):
    with pytest.raises(ValueError, match="background"):
        engine.extract_patches(slide_path, np.array([[0, 0, 8]]), out_px=8, background=background)
