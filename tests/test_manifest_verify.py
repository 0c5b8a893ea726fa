"""Tests of the manifest's ``verify: decode``: damaged pixels behind intact headers, in copies
of real scanner files (a zeroed JPEG tile of a slide, truncated PNG/JPEG/NIfTI/DICOM), fail
with one error naming every file (and, for slides, the level and region); clean real files
pass."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from mmdiag.config import ConfigError, validate_config
from mmdiag.data import ManifestError, ManifestRules, build_manifest
from mmdiag.data.images import (
    ImageReadError,
    SlideRegion,
    check_image_decodes,
    read_image_size,
    slide_sample_regions,
)
from tests.test_manifest import CLINICAL, RULES, _real, _write_tsv

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
ANY = ManifestRules(classes=RULES.classes, stages=RULES.stages)
DECODE = dataclasses.replace(ANY, verify="decode")


def _cohort(root: Path, images: dict[str, list[tuple[str, Path]]]) -> Path:
    """A cohort folder whose patients (``P1``, ``P2``) have the given (modality, file) rows."""
    rows = [
        {"patient_id": pid, "modality": modality, "path": str(path)}
        for pid, files in images.items()
        for modality, path in files
    ]
    root.mkdir(parents=True, exist_ok=True)
    _write_tsv(CLINICAL, root / "clinical.tsv")
    _write_tsv(rows, root / "images.tsv")
    return root


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(source, target))


def _zero_tile(slide: Path, tile_index: int) -> Path:
    """Overwrite one level-0 tile's compressed bytes with zeros (headers stay intact)."""
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[tile_index], page.databytecounts[tile_index]
    with open(slide, "r+b") as file:
        file.seek(offset)
        file.write(bytes(count))
    return slide


def _tile_under(slide: Path, region: SlideRegion) -> int:
    """Index (row-major) of the level-0 tile under the centre of ``region``."""
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        tile_px, across = page.tilewidth, -(-page.imagewidth // page.tilewidth)
    column = (region.x_level0_px + region.width_px // 2) // tile_px
    row = (region.y_level0_px + region.height_px // 2) // tile_px
    return row * across + column


def _level0_regions(slide: Path) -> list[SlideRegion]:
    import openslide

    with openslide.OpenSlide(str(slide)) as handle:
        regions = slide_sample_regions(handle.level_dimensions, handle.level_downsamples)
    return [region for region in regions if region.level == 0]


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _decode_error(root: Path, rules: ManifestRules = DECODE) -> str:
    with pytest.raises(ManifestError) as info:
        build_manifest(cohort_root=root, rules=rules)
    return str(info.value)


# --------------------------------------------------------------------------- slides


def test_zeroed_slide_tile_passes_header_and_fails_decode_naming_level_and_region(
    tmp_path: Path,
) -> None:
    source = _real("wsi", "CMU-1-Small-Region.svs")
    clean = _copy(source, tmp_path / "cohort" / "p1.svs")
    broken = _copy(source, tmp_path / "cohort" / "p2.svs")
    # a middle sampled region: away from the corner pixel the header check reads
    region = _level0_regions(source)[3]
    _zero_tile(broken, _tile_under(source, region))
    root = _cohort(tmp_path / "cohort", {"P1": [("WSI", clean)], "P2": [("WSI", broken)]})

    assert len(build_manifest(cohort_root=root, rules=ANY)) == 2
    message = _decode_error(root)
    assert "images whose pixels cannot be decoded (verify: decode) (1)" in message
    assert (
        f"patient 'P2', row 3: {broken}: 1 of 8 sampled slide regions fail: cannot decode "
        "level 0 region x=1024,y=1024,w=512,h=512 (Not a JPEG file: starts with 0x00 0x00)"
    ) in message
    assert region.describe() == "level 0 region x=1024,y=1024,w=512,h=512"
    assert str(clean) not in message


def test_every_damaged_region_of_a_slide_is_named(tmp_path: Path) -> None:
    """OpenSlide fails every read after its first error; the check reopens and goes on."""
    source = _real("wsi", "CMU-1-Small-Region.svs")
    broken = _copy(source, tmp_path / "slide.svs")
    regions = _level0_regions(source)
    for region in (regions[2], regions[5]):
        _zero_tile(broken, _tile_under(source, region))
    with pytest.raises(ImageReadError) as info:
        check_image_decodes(broken, modality="WSI")
    message = str(info.value)
    assert message.startswith(f"{broken}: 2 of 8 sampled slide regions fail: cannot decode ")
    assert f"cannot decode {regions[2].describe()} (Not a JPEG file" in message
    assert f"; cannot decode {regions[5].describe()} (Not a JPEG file" in message
    for clean in (regions[0], regions[1], regions[3], regions[4], regions[6], regions[7]):
        assert clean.describe() not in message


def test_zeroed_ome_tiff_tile_fails_decode(tmp_path: Path) -> None:
    """OME-TIFF goes through tifffile (the patching engine's reader), not OpenSlide."""
    source = _real("wsi", "OS-2-ndpi.ome.tif")
    broken = _copy(source, tmp_path / "slide.ome.tif")
    region = _level0_regions_ome(source)[2]
    _zero_tile(broken, _tile_under(source, region))
    assert read_image_size(broken, modality="WSI") == (2202, 2202)
    with pytest.raises(ImageReadError, match=r"slide\.ome\.tif: 1 of 8 sampled") as info:
        check_image_decodes(broken, modality="WSI")
    assert f"cannot decode {region.describe()} (Not a JPEG file" in str(info.value)


def _level0_regions_ome(slide: Path) -> list[SlideRegion]:
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        regions = slide_sample_regions([(page.imagewidth, page.imagelength)], [1.0])
    return regions


# --------------------------------------------------------------------------- micrographs, volumes


def test_truncated_png_micrograph_is_named(tmp_path: Path) -> None:
    png = _truncate(_copy(_real("microscopy", "skimage_ihc.png"), tmp_path / "om.png"))
    with pytest.raises(ImageReadError) as info:
        check_image_decodes(png, modality="OM")
    assert str(info.value) == f"{png}: cannot be decoded (OSError: image file is truncated)"


def test_damaged_images_of_every_kind_are_listed_at_once(tmp_path: Path) -> None:
    """A large truncated JPEG, a truncated NIfTI, a DICOM series with a truncated slice and
    a single truncated DICOM: the headers are intact, so only ``decode`` finds them."""
    tiled = np.tile(np.asarray(Image.open(_real("microscopy", "skimage_ihc.png"))), (5, 5, 1))
    jpeg = tmp_path / "c" / "im.jpg"
    jpeg.parent.mkdir()
    Image.fromarray(tiled).save(jpeg, quality=90)  # 2560 x 2560: over FULL_DECODE_MAX_PX
    _truncate(jpeg)
    nifti = _truncate(
        _copy(_real("radiology", "example_ct_sm.nii.gz"), tmp_path / "c" / "a.nii.gz")
    )
    dicom = _truncate(_copy(_real("radiology", "CT_small.dcm"), tmp_path / "c" / "b.dcm"))
    series = Path(
        shutil.copytree(_real("radiology", "ct_series_siemens_biograph40"), tmp_path / "s")
    )
    # the last file by name: a cut slice, whose header (read without pixels) is intact
    last_slice = _truncate(sorted(series.iterdir())[-1], keep=0.9)
    rows = {"P1": [("IM", jpeg), ("CT", nifti)], "P2": [("CT", dicom), ("MR", series)]}
    root = _cohort(tmp_path / "c", rows)

    assert len(build_manifest(cohort_root=root, rules=ANY)) == 4
    message = _decode_error(root)
    assert "images whose pixels cannot be decoded (verify: decode) (4)" in message
    assert f"patient 'P1', row 2: {jpeg}: cannot be decoded (OSError: image file is truncated" in (
        message
    )
    assert f"patient 'P1', row 3: {nifti}: cannot be decoded (EOFError: " in message
    assert f"patient 'P2', row 4: {dicom}: cannot be decoded (VolumeError: {dicom}: " in message
    assert (
        f"patient 'P2', row 5: {series}: cannot be decoded (VolumeError: {last_slice}: no DICOM "
        "element could be read (truncated file?))"
    ) in message


def test_clean_real_cohort_passes_decode(tmp_path: Path) -> None:
    """Every real slide, micrograph and volume decodes, in place; the manifest is the same."""
    files = {
        "P1": [
            ("WSI", _real("wsi", "CMU-1-Small-Region.svs")),
            ("WSI", _real("wsi", "tcga-cr-7395-01a-01-ts1.svs")),
            ("WSI", _real("wsi", "test3-DAPI-2-387.ndpi")),
            ("WSI", _real("wsi", "OS-2-vsi.ome.tif")),
            ("CT", _real("radiology", "ct_series_siemens_biograph40")),
        ],
        "P2": [
            ("OM", _real("microscopy", "skimage_ihc.png")),
            ("IM", _real("microscopy", "small_vectra.qptiff")),
            ("CT", _real("radiology", "example_ct_sm.nii.gz")),
            ("MR", _real("radiology", "nibabel_example4d.nii.gz")),
            ("CT", _real("radiology", "CT_small.dcm")),
        ],
    }
    root = _cohort(tmp_path / "cohort", files)
    decoded = build_manifest(cohort_root=root, rules=DECODE, progress=True)
    assert len(decoded) == 10
    assert decoded.equals(build_manifest(cohort_root=root, rules=ANY))


# --------------------------------------------------------------------------- the sample


def test_sample_reads_small_levels_whole_and_spreads_over_large_ones() -> None:
    levels = [(2220, 2967), (1110, 1000), (300, 200)]
    regions = slide_sample_regions(levels, [1.0, 2.0, 7.4], regions_per_level=8)
    by_level = {level: [r for r in regions if r.level == level] for level in range(3)}
    # level 0: 5 x 6 squares of 512 px, 8 evenly spaced in row-major order, first and last kept
    assert [(r.x_level0_px, r.y_level0_px) for r in by_level[0]] == [
        (0, 0), (2048, 0), (1536, 512), (1024, 1024),
        (1024, 1536), (512, 2048), (0, 2560), (2048, 2560),
    ]  # fmt: skip
    assert (by_level[0][1].width_px, by_level[0][-1].height_px) == (2220 - 2048, 2967 - 2560)
    # level 1: 3 x 2 squares, fewer than 8: read whole, level-0 coordinates doubled
    assert len(by_level[1]) == 6
    assert sum(r.width_px * r.height_px for r in by_level[1]) == 1110 * 1000
    assert by_level[1][-1] == SlideRegion(1, 2048, 1024, 1110 - 1024, 1000 - 512)
    assert by_level[2] == [SlideRegion(2, 0, 0, 300, 200)]
    assert slide_sample_regions(levels, [1.0, 2.0, 7.4], regions_per_level=8) == regions


def test_one_region_per_level_is_the_first() -> None:
    regions = slide_sample_regions([(4096, 4096), (1024, 1024)], [1.0, 4.0], regions_per_level=1)
    assert regions == [SlideRegion(0, 0, 0, 512, 512), SlideRegion(1, 0, 0, 512, 512)]


# --------------------------------------------------------------------------- configuration


def test_rules_read_verify_from_config_and_default_to_header() -> None:
    section = {"classes": ["A", "B"], "stages": [], "required_modalities": [], "min_image_px": {}}
    assert ManifestRules.from_config(section).verify == "header"
    rules = ManifestRules.from_config(section | {"verify": "decode", "decode_regions_per_level": 3})
    assert (rules.verify, rules.decode_regions_per_level) == ("decode", 3)
    with pytest.raises(ValueError, match="verify must be one of \\['header', 'decode'\\]"):
        ManifestRules(classes=("A", "B"), verify="pixels")
    with pytest.raises(ValueError, match="decode_regions_per_level must be at least 1"):
        ManifestRules(classes=("A", "B"), decode_regions_per_level=0)


def test_config_defaults_and_schema() -> None:
    config = validate_config(yaml.safe_load(CONFIG.read_text()))
    assert (config["manifest"]["verify"], config["manifest"]["decode_regions_per_level"]) == (
        "header",
        8,
    )
    bad = yaml.safe_load(CONFIG.read_text())
    bad["manifest"]["verify"] = "pixels"
    with pytest.raises(ConfigError, match="verify"):
        validate_config(bad)
