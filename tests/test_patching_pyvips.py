"""Plain pyramidal TIFF is read through libvips; pixels equal OpenSlide's."""

import numpy as np
import openslide
import pytest
import pyvips

from mmdiag.patching.slide import Slide


@pytest.fixture(scope="module")
def plain_pyramid(tmp_path_factory):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    image = pyvips.Image.new_from_array(coarse).resize(64, kernel="linear").cast("uchar")
    path = tmp_path_factory.mktemp("vips") / "plain.tif"
    image.tiffsave(
        str(path),
        tile=True,
        tile_width=256,
        tile_height=256,
        pyramid=True,
        compression="jpeg",
        Q=85,
        xres=2000,
        yres=2000,
    )  # 2000 px/mm = 0.5 µm/px
    return path


def test_plain_pyramidal_tiff_uses_pyvips_with_openslides_geometry(plain_pyramid):
    reference = openslide.OpenSlide(str(plain_pyramid))
    assert reference.properties["openslide.vendor"] == "generic-tiff"
    with Slide(plain_pyramid) as slide:
        assert slide.info.backend == "pyvips"
        assert slide.info.level_dimensions == reference.level_dimensions
        assert slide.info.mpp == pytest.approx(0.5)
        for level, (x, y) in [(0, (100, 200)), (1, (512, 256)), (2, (0, 0))]:
            ours = slide.read_level(level, x, y, 300, 200)
            theirs = np.asarray(reference.read_region((x, y), level, (300, 200)))[..., :3]
            np.testing.assert_array_equal(ours, theirs)
        # outside the slide: white, as OpenSlide pads
        width, height = slide.info.level_dimensions[0]
        edge = slide.read_level(0, width - 10, height - 10, 20, 20)
        assert (edge[10:, :] == 255).all() and (edge[:, 10:] == 255).all()
