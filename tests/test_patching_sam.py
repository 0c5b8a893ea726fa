"""Optional SAM refinement of the whole-slide tissue mask (reusing the CMUS SAM code)."""

import numpy as np
import torch

from mmdiag.patching.tissue import refine_with_sam
from mmdiag.segment import sam as sam_module


def _two_pieces():
    mask = np.zeros((64, 96), dtype=bool)
    mask[10:30, 10:40] = True  # piece 1
    mask[40:60, 60:90] = True  # piece 2
    return mask | _speck()


def _speck():
    """A speck below min_object_px, never prompted and dropped from the refined mask."""
    speck = np.zeros((64, 96), dtype=bool)
    speck[2:4, 90:92] = True
    return speck


def test_each_piece_is_replaced_by_sams_mask_or_kept(monkeypatch):
    boxes = []

    def fake_sam_mask(predictor, rgb, prompt):
        boxes.append(prompt.box)
        proposal = np.zeros(rgb.shape[:2], dtype=bool)
        x0, y0, x1, y1 = prompt.box
        if x0 < 50:  # SAM tightens piece 1 and finds nothing for piece 2
            proposal[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = True
        return proposal

    monkeypatch.setattr(sam_module, "sam_mask", fake_sam_mask)
    mask = _two_pieces()
    refined = refine_with_sam(np.zeros((64, 96, 3), np.uint8), mask, object(), min_object_px=16)
    assert sorted(boxes) == [(10, 10, 40, 30), (60, 40, 90, 60)]  # one box per piece, no speck
    expected = np.zeros_like(mask)
    expected[12:28, 12:38] = True  # SAM's mask for piece 1
    expected[40:60, 60:90] = True  # piece 2 kept: SAM found nothing
    np.testing.assert_array_equal(refined, expected)


class PlantedPredictor:
    """A stand-in with SamPredictor's interface: for each box, three proposals of which the
    planted mask scores best (an empty one where nothing is planted)."""

    def __init__(self, planted):
        self.planted, self.boxes = planted, []

    def set_image(self, image, image_format="RGB"):
        self.shape = image.shape[:2]

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        self.boxes.append(tuple(int(v) for v in box))
        best = self.planted.get(self.boxes[-1], np.zeros(self.shape, bool))
        masks = np.stack([np.ones(self.shape, bool), best, ~best])
        return masks, np.array([0.3, 0.9, 0.1]), None


def test_sams_mask_replaces_the_piece_through_the_predictor():
    mask = _two_pieces()
    mask[10:20, 25:40] = False  # piece 1 is an L; its box (10, 10, 40, 30) covers the notch
    rows, cols = np.mgrid[:64, :96]
    disc = (rows - 18) ** 2 + (cols - 30) ** 2 <= 7**2  # planted: over the notch and the L
    predictor = PlantedPredictor({(10, 10, 40, 30): disc})
    rgb = np.zeros((64, 96, 3), np.uint8)
    refined = refine_with_sam(rgb, mask, predictor, min_object_px=16)
    assert sorted(predictor.boxes) == [(10, 10, 40, 30), (60, 40, 90, 60)]
    box = np.zeros_like(mask)
    box[10:30, 10:40] = True
    np.testing.assert_array_equal(refined & box, disc)  # piece 1 is SAM's disc, all of it
    classical = mask & box
    assert (disc & ~classical).sum() > 40 and (classical & ~disc).sum() > 300
    np.testing.assert_array_equal(refined & ~box, mask & ~box & ~_speck())  # piece 2 kept


def test_a_real_small_sam_checkpoint_goes_through(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "sam_tiny.pth"
    torch.save(sam_module.build_sam("tiny").state_dict(), checkpoint)
    predictor = sam_module.load_sam(checkpoint, "tiny")
    rgb = np.full((64, 96, 3), 240, np.uint8)
    rgb[10:30, 10:40] = (200, 100, 160)
    mask = _two_pieces()
    refined = refine_with_sam(rgb, mask, predictor, min_object_px=16)
    assert refined.shape == (64, 96) and refined.dtype == bool
    proposals = [
        sam_module.sam_mask(predictor, rgb, sam_module.Prompt(box=box))
        for box in ((10, 10, 40, 30), (60, 40, 90, 60))
    ]
    assert all(p.any() for p in proposals)  # the random tiny SAM proposes a mask for both
    np.testing.assert_array_equal(refined, proposals[0] | proposals[1])  # SAM's mask per piece
    assert (refined != (mask & ~_speck())).sum() > 100  # not the classical mask
