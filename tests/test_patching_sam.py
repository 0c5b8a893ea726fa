"""Optional SAM refinement of the whole-slide tissue mask (reusing the CMUS SAM code)."""

import numpy as np
import torch

from mmdiag.patching.tissue import refine_with_sam
from mmdiag.segment import sam as sam_module


def _two_pieces():
    mask = np.zeros((64, 96), dtype=bool)
    mask[10:30, 10:40] = True  # piece 1
    mask[40:60, 60:90] = True  # piece 2
    mask[2:4, 90:92] = True  # a speck below min_object_px
    return mask


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


def test_a_real_small_sam_checkpoint_goes_through(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "sam_tiny.pth"
    torch.save(sam_module.build_sam("tiny").state_dict(), checkpoint)
    predictor = sam_module.load_sam(checkpoint, "tiny")
    rgb = np.full((64, 96, 3), 240, np.uint8)
    rgb[10:30, 10:40] = (200, 100, 160)
    refined = refine_with_sam(rgb, _two_pieces(), predictor, min_object_px=16)
    assert refined.shape == (64, 96) and refined.dtype == bool and refined.any()
    again = refine_with_sam(rgb, _two_pieces(), predictor, min_object_px=16)
    np.testing.assert_array_equal(refined, again)  # deterministic
