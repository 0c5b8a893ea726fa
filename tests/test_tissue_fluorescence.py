"""Tests of tissue detection on dark-background (fluorescence) slides, and of the QC overlay.

Real fluorescence: the Hamamatsu NDPI DAPI and TRITC channels of one tissue section, whose
black background has HSV saturation near 255. Real brightfield: the Aperio SVS files and the
QuPath OME-TIFFs, whose masks must stay those of the saturation method.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from mmdiag.patching import Slide, tissue_mask, write_tissue_qc
from mmdiag.patching.tissue import (
    DARK_BACKGROUND_MAX,
    FULL_MASK_WARN_FRACTION,
    QC_MIN_LONG_SIDE_PX,
    background_brightness,
    detect_background,
    saturation_u8,
)
from mmdiag.segment.threshold import otsu_threshold
from mmdiag.synth.wsi import render_wsi

REAL_WSI = Path("/work/shared/data/real/wsi")
DAPI = REAL_WSI / "test3-DAPI-2-387.ndpi"
TRITC = REAL_WSI / "test3-TRITC-2-560.ndpi"
BRIGHTFIELD_SLIDES = [
    REAL_WSI / "CMU-1-Small-Region.svs",
    REAL_WSI / "tcga-cr-7395-01a-01-ts1.svs",
    REAL_WSI / "OS-1-detail.ome.tif",
    REAL_WSI / "OS-2-ndpi.ome.tif",
    REAL_WSI / "OS-2-vsi.ome.tif",
]
OME_TIFFS = [path for path in BRIGHTFIELD_SLIDES if path.name.endswith(".ome.tif")]
LOGGER = "mmdiag.patching.tissue"


def _thumbnail(path: Path, mpp: float = 8.0) -> np.ndarray:
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent")
    if not path.name.endswith(".ome.tif"):
        pytest.importorskip("openslide")
    # the TCGA file has no µm/px; any value serves to take a thumbnail
    with Slide(path, default_mpp=0.5) as slide:
        thumbnail, _ = slide.thumbnail(mpp)
    return thumbnail


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _saturation_mask_reference(rgb: np.ndarray) -> np.ndarray:
    """The saturation method with the default settings, written out independently."""
    saturation = ndimage.median_filter(saturation_u8(rgb), size=7, mode="nearest")
    mask = saturation > max(otsu_threshold(saturation, integer_levels=True), 10.0)
    padded = np.pad(mask, 5, mode="edge")
    mask = ndimage.binary_closing(padded, structure=np.ones((5, 5), bool))[5:-5, 5:-5]
    labels, count = ndimage.label(mask)
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= 64
    keep[0] = False
    mask = keep[labels]
    labels, count = ndimage.label(~mask)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small_hole = (sizes < 64) & ~np.isin(np.arange(count + 1), border)
    small_hole[0] = False
    return mask | small_hole[labels]


# -- real fluorescence slides ----------------------------------------------------------------
@pytest.mark.parametrize("path", [DAPI, TRITC], ids=["DAPI", "TRITC"])
@pytest.mark.parametrize("mpp", [8.0, 4.0])
def test_real_fluorescence_is_dark_and_masked_on_part_of_the_slide(path, mpp, caplog):
    thumbnail = _thumbnail(path, mpp)
    assert background_brightness(thumbnail) < 10  # measured: 4 for both channels
    assert detect_background(thumbnail) == "dark"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        mask = tissue_mask(thumbnail, name=path.name)
    assert not caplog.records
    # the section fills most of the field; measured 0.85-0.87 (the saturation method: 1.0)
    assert 0.7 < mask.mean() < 0.93
    height, width = mask.shape
    # the top-left corner and the left edge below it are background (seen on the thumbnail)
    assert not mask[: height // 20, : width // 20].any()
    assert mask[height // 2 : height * 4 // 5, width // 3 : width * 2 // 3].mean() > 0.95
    # what the saturation method did with these slides: all of it, now with a warning
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert tissue_mask(thumbnail, background="bright", name=path.name).mean() > 0.99
    assert path.name in caplog.text


def test_real_dapi_and_tritc_masks_agree():
    """Two channels of one section: the sparse nuclear stain gives the same tissue region."""
    dapi = tissue_mask(_thumbnail(DAPI))
    tritc = tissue_mask(_thumbnail(TRITC))
    assert _iou(dapi, tritc) > 0.95  # measured 0.987


# -- real brightfield slides -----------------------------------------------------------------
@pytest.mark.parametrize("path", BRIGHTFIELD_SLIDES, ids=lambda path: path.name)
@pytest.mark.parametrize("mpp", [8.0, 4.0])
def test_real_brightfield_is_bright_and_unchanged(path, mpp):
    thumbnail = _thumbnail(path, mpp)
    assert background_brightness(thumbnail) > 150  # measured 179-247
    assert detect_background(thumbnail) == "bright"
    mask = tissue_mask(thumbnail)
    assert np.array_equal(mask, tissue_mask(thumbnail, background="bright"))
    assert np.array_equal(mask, _saturation_mask_reference(thumbnail))
    assert mask.mean() < FULL_MASK_WARN_FRACTION


@pytest.mark.parametrize("path", OME_TIFFS, ids=lambda path: path.name)
def test_real_ome_tiff_read_with_tifffile_is_bright_and_unchanged(path):
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent")
    thumbnail = np.ascontiguousarray(tifffile.imread(path)[::16, ::16])
    assert detect_background(thumbnail) == "bright"
    assert np.array_equal(tissue_mask(thumbnail), _saturation_mask_reference(thumbnail))


def test_synthetic_brightfield_slide_is_bright_and_unchanged():
    image = render_wsi(np.random.default_rng(7), 2048, 1536, mpp=0.25)
    thumbnail = np.ascontiguousarray(image[::8, ::8, :3])
    assert detect_background(thumbnail) == "bright"
    assert np.array_equal(tissue_mask(thumbnail), _saturation_mask_reference(thumbnail))


# -- synthetic dark slides -------------------------------------------------------------------
def _dark_slide(rng, *, punctate: bool) -> tuple[np.ndarray, np.ndarray]:
    """A black slide (JPEG-like noise, grey levels 0-5) with one bright elliptic section."""
    height, width = 160, 200
    yy, xx = np.mgrid[:height, :width]
    blob = ((yy - 85) / 50.0) ** 2 + ((xx - 95) / 70.0) ** 2 <= 1.0
    value = rng.integers(0, 6, (height, width)).astype(np.float64)
    if punctate:  # a nuclear stain: bright nuclei on a dim tissue
        tissue = (
            12 + rng.integers(0, 6, (height, width)) + 180 * (rng.random((height, width)) < 0.1)
        )
    else:
        tissue = 90 + rng.normal(0, 15, (height, width))
    value[blob] = tissue[blob]
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 2] = np.clip(value, 0, 255).astype(np.uint8)  # one colour, like DAPI's blue
    rgb[..., 0] = rgb[..., 1] = rgb[..., 2] // 8
    return rgb, blob


@pytest.mark.parametrize("punctate", [False, True], ids=["uniform-stain", "nuclear-stain"])
def test_synthetic_dark_slide_mask_matches_the_blob(punctate):
    rgb, blob = _dark_slide(np.random.default_rng(3), punctate=punctate)
    assert saturation_u8(rgb)[~blob].mean() > 150  # why saturation cannot work here
    assert background_brightness(rgb) < DARK_BACKGROUND_MAX
    assert detect_background(rgb) == "dark"
    mask = tissue_mask(rgb)
    assert _iou(mask, blob) > 0.9
    assert np.array_equal(mask, tissue_mask(rgb, background="dark"))


def test_blank_dark_slide_has_no_tissue(caplog):
    rgb = np.random.default_rng(0).integers(0, 6, (120, 120, 3)).astype(np.uint8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not tissue_mask(rgb).any()
    assert not caplog.records


def test_dark_slide_with_white_unscanned_border_is_still_dark():
    """Unscanned areas come back white (composited); they are neither glass nor tissue."""
    rgb, blob = _dark_slide(np.random.default_rng(5), punctate=False)
    padded = np.pad(rgb, ((0, 0), (0, 40), (0, 0)), constant_values=255)
    assert detect_background(padded) == "dark"
    mask = tissue_mask(padded)
    assert not mask[:, -40:].any()
    assert _iou(mask[:, :-40], blob) > 0.9


def test_fixed_brightness_threshold_on_dark_slides():
    rgb, blob = _dark_slide(np.random.default_rng(3), punctate=False)
    assert _iou(tissue_mask(rgb, brightness_threshold=40), blob) > 0.9
    assert not tissue_mask(rgb, brightness_threshold=255).any()


def test_background_choice_is_checked():
    rgb = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="background"):
        tissue_mask(rgb, background="fluorescence")
    with pytest.raises(ValueError, match="brightness_threshold"):
        tissue_mask(rgb, brightness_threshold=300)


# -- the warning on masks covering (nearly) the whole slide ----------------------------------
@pytest.mark.parametrize(
    ("colour", "kind"), [((200, 80, 150), "bright"), ((40, 40, 40), "dark")], ids=["pink", "grey"]
)
def test_whole_slide_mask_is_warned_naming_the_slide(colour, kind, caplog):
    rgb = np.empty((100, 100, 3), np.uint8)
    rgb[:] = colour
    assert detect_background(rgb) == kind
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        mask = tissue_mask(rgb, name="uniform-slide.svs")
    assert mask.all()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "uniform-slide.svs" in record.getMessage()
    assert "100.0%" in record.getMessage() and kind in record.getMessage()


def test_no_warning_below_the_limit(caplog):
    rgb = np.full((100, 100, 3), 245, np.uint8)
    rgb[:, :90] = (200, 80, 150)  # 90 % tissue
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        mask = tissue_mask(rgb, name="mostly-tissue.svs")
    assert 0.85 < mask.mean() < FULL_MASK_WARN_FRACTION
    assert not caplog.records


# -- QC overlay size -------------------------------------------------------------------------
def test_small_qc_overlay_is_enlarged(tmp_path):
    thumb = np.full((31, 24, 3), 240, np.uint8)  # OS-1-detail at 8 µm/px is 31 px wide
    mask = np.zeros((31, 24), bool)
    mask[5:25, 4:20] = True
    path = write_tissue_qc(
        thumb, mask, [(4, 5, 8)], tmp_path / "qc.png", min_long_side_px=QC_MIN_LONG_SIDE_PX
    )
    qc = np.asarray(Image.open(path).convert("RGB"))
    factor = 17  # the smallest integer with 31 * factor >= 512
    assert qc.shape == (31 * factor, 24 * factor, 3)
    assert max(qc.shape[:2]) >= QC_MIN_LONG_SIDE_PX
    assert tuple(qc[5 * factor + 40, 4 * factor]) == (30, 60, 220)  # the box's left edge
    assert tuple(qc[5 * factor, 12 * factor - 1]) == (30, 60, 220)  # its right edge
    assert tuple(qc[15 * factor, 20 * factor]) == (0, 200, 0)  # the contour, thin
    assert tuple(qc[15 * factor, 20 * factor + 3]) == (240, 240, 240)
    assert tuple(qc[1, 1]) == (240, 240, 240)
    assert not list(tmp_path.glob(".*"))


def test_large_qc_overlay_keeps_its_size(tmp_path):
    thumb = np.full((600, 40, 3), 240, np.uint8)
    mask = np.zeros((600, 40), bool)
    write_tissue_qc(thumb, mask, [], tmp_path / "qc.png", min_long_side_px=QC_MIN_LONG_SIDE_PX)
    assert Image.open(tmp_path / "qc.png").size == (40, 600)
    write_tissue_qc(thumb[:30, :20], mask[:30, :20], [], tmp_path / "default.png")
    assert Image.open(tmp_path / "default.png").size == (20, 30)
    with pytest.raises(ValueError, match="min_long_side_px"):
        write_tissue_qc(thumb, mask, [], tmp_path / "bad.png", min_long_side_px=-1)
