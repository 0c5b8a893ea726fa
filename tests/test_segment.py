"""Tests for glomerulus segmentation (mmdiag.segment): detector, prompts, SAM, cohort stage."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import mmdiag.segment.cohort as cohort_module
from mmdiag.segment import (
    SEGMENTATION_COLUMNS,
    Prompt,
    build_sam,
    detect_glomerulus,
    load_sam,
    mask_to_box,
    otsu_threshold,
    read_prompts,
    sam_mask,
    segment_cohort,
)
from mmdiag.synth.renal import DISEASES, random_glomerulus, render_om

WIDTH_PX, HEIGHT_PX = 384, 256


def _jpeg_round_trip(rgb: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _render(pattern: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A demo OM image and its reference glomerulus: the disc inside Bowman's capsule."""
    rgb = render_om(np.random.default_rng(seed), pattern, WIDTH_PX, HEIGHT_PX)
    # render_om draws its geometry first, so the same seed gives the same glomerulus.
    glom = random_glomerulus(np.random.default_rng(seed), WIDTH_PX, HEIGHT_PX)
    yy, xx = np.mgrid[0:HEIGHT_PX, 0:WIDTH_PX]
    capsule_r = 1.08 * glom.radius_px  # as in render_om
    reference = np.hypot(xx - glom.centre_x, yy - glom.centre_y) <= capsule_r
    return _jpeg_round_trip(rgb), reference


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _add_distractor(rgb: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Paint a smaller dark blob on the side of the image away from the glomerulus."""
    centre_x = np.flatnonzero(reference.any(axis=0)).mean()
    blob_x = 48 if centre_x > WIDTH_PX / 2 else WIDTH_PX - 48
    blob_y = HEIGHT_PX // 2
    yy, xx = np.mgrid[0:HEIGHT_PX, 0:WIDTH_PX]
    blob = np.hypot(xx - blob_x, yy - blob_y) <= 28
    out = rgb.copy()
    out[blob] = (70, 55, 65)
    return out, (blob_x, blob_y)


# ---------------------------------------------------------------- classical detector


def _otsu_reference(values: np.ndarray, bins: int = 256) -> float:
    """Slow, obvious Otsu: try every bin edge, compute the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_t = -1.0, None
    for k in range(1, bins):
        w0, w1 = counts[:k].sum(), counts[k:].sum()
        if w0 == 0 or w1 == 0:
            between = 0.0
        else:
            m0 = (counts[:k] * centres[:k]).sum() / w0
            m1 = (counts[k:] * centres[k:]).sum() / w1
            between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_t = between, edges[k]
    return float(best_t)


def test_otsu_threshold_lies_between_the_modes_and_matches_reference():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 3000), rng.normal(50, 4, 1000)])
    threshold = otsu_threshold(values)
    assert 10 + 3 * 2 < threshold < 50 - 3 * 4
    for seed in range(20):
        rng = np.random.default_rng(seed)
        # Dense histograms: with empty bins the criterion has plateaus and ties.
        data = np.concatenate([rng.normal(0, 1, 4000), rng.normal(rng.uniform(1, 4), 1, 2000)])
        assert otsu_threshold(data, bins=64) == pytest.approx(_otsu_reference(data, bins=64))
    assert otsu_threshold(np.full(5, 3.0)) == 3.0
    with pytest.raises(ValueError, match="no finite"):
        otsu_threshold(np.array([np.nan]))


def _brute_force_otsu(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Between-class variance of every cut k (class 0 = bins 0..k), from the binned values.

    Each value is replaced by its bin centre; both classes' sizes and means are computed from
    those values directly, not from cumulative sums. Returns (variance per cut, cut values).
    """
    values = values[np.isfinite(values)]
    edges = np.histogram_bin_edges(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    binned = centres[index]
    between = np.zeros(bins - 1)
    for k in range(bins - 1):
        low, high = binned[index <= k], binned[index > k]
        if low.size and high.size:
            between[k] = low.size * high.size * (low.mean() - high.mean()) ** 2
    return between, edges[1:]


def _assert_best_cut(threshold: float, between: np.ndarray, cuts: np.ndarray) -> None:
    best = between.max()
    k = int(np.flatnonzero(cuts == threshold)[0])
    assert between[k] >= best * (1 - 1e-12)
    near = np.flatnonzero(between >= best * (1 - 1e-9))
    if near.size == 1:  # a clear maximum: the very same cut
        assert k == near[0]


def test_otsu_threshold_maximises_brute_force_between_class_variance():
    rng = np.random.default_rng(11)
    for trial in range(40):
        n_low, n_high = rng.integers(1, 400, size=2)
        values = np.concatenate(
            [rng.normal(0, 1, n_low), rng.normal(rng.uniform(0.5, 6), rng.uniform(0.2, 2), n_high)]
        )
        if trial % 3 == 0:
            values[rng.random(values.size) < 0.1] = rng.choice([np.nan, np.inf, -np.inf])
        bins = int(rng.choice([2, 5, 32, 256]))
        threshold = otsu_threshold(values, bins=bins)
        _assert_best_cut(threshold, *_brute_force_otsu(values, bins))


def test_otsu_threshold_on_grey_levels():
    rng = np.random.default_rng(12)
    levels = rng.integers(0, 256, 1000)
    as_uint8 = otsu_threshold(levels.astype(np.uint8))
    assert as_uint8 == otsu_threshold(levels.astype(np.float64), integer_levels=True)
    assert as_uint8 == otsu_threshold(levels, integer_levels=True) and as_uint8.is_integer()
    # one bin per level, whatever the data's range; no separating cut gives 0
    assert otsu_threshold(np.full(7, 100, np.uint8)) == 0.0
    assert otsu_threshold(np.zeros(0, np.uint8)) == 0.0
    assert otsu_threshold(np.array([3, 3, 9, 9], np.uint8)) == 3.0
    # integer_levels=False on uint8 is the float histogram of the same values
    assert otsu_threshold(levels.astype(np.uint8), integer_levels=False) == otsu_threshold(
        levels.astype(np.float64)
    )
    for bad in ([0.0, 2.5], [-1, 4], [0, 256]):
        with pytest.raises(ValueError, match=r"integer levels 0\.\.255"):
            otsu_threshold(np.array(bad), integer_levels=True)
    with pytest.raises(ValueError, match="bins must be at least 2"):
        otsu_threshold(np.arange(5.0), bins=1)


@pytest.mark.parametrize("pattern", DISEASES)
def test_detector_finds_the_demo_glomerulus(pattern):
    for seed in range(4):
        rgb, reference = _render(pattern, seed)
        mask = detect_glomerulus(rgb)
        assert mask.dtype == bool and mask.shape == reference.shape
        assert _iou(mask, reference) >= 0.7, (pattern, seed)


def test_detector_ignores_a_smaller_distractor():
    for pattern, seed in [("IgAN", 11), ("MN", 12), ("LN", 13)]:
        rgb, reference = _render(pattern, seed)
        rgb, (blob_x, blob_y) = _add_distractor(rgb, reference)
        mask = detect_glomerulus(rgb)
        assert _iou(mask, reference) >= 0.7
        assert not mask[blob_y, blob_x]


def test_detector_can_be_restricted_to_a_box_and_raises_on_blank_images():
    rgb, reference = _render("MN", 3)
    rgb, (blob_x, blob_y) = _add_distractor(rgb, reference)
    box = (blob_x - 40, blob_y - 40, blob_x + 40, blob_y + 40)
    mask = detect_glomerulus(rgb, box=box)
    assert mask[blob_y, blob_x]
    x0, y0, x1, y1 = mask_to_box(mask)
    assert box[0] <= x0 and box[1] <= y0 and x1 <= box[2] and y1 <= box[3]
    with pytest.raises(ValueError, match="no glomerulus found"):
        detect_glomerulus(np.full((64, 64, 3), 220, np.uint8))
    with pytest.raises(ValueError, match="rgb must be"):
        detect_glomerulus(np.zeros((64, 64), np.uint8))


def test_mask_to_box_is_exact():
    mask = np.zeros((10, 12), bool)
    mask[2, 3] = True
    mask[6, 9] = True
    mask[4, 5:7] = True
    assert mask_to_box(mask) == (3, 2, 10, 7)
    mask[:] = False
    mask[0, 11] = True
    assert mask_to_box(mask) == (11, 0, 12, 1)
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((3, 3), bool))


# ---------------------------------------------------------------- prompts TSV


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_prompts_parses_boxes_and_points(tmp_path):
    path = _write(
        tmp_path / "prompts.tsv",
        "image_id\tx0\ty0\tx1\ty1\tpoint_x\tpoint_y\tpoint_label\n"
        "om/P001\t80\t20\t300\t240\t190\t130\t1\n"
        "om/P001\t\t\t\t\t30\t30\t0\n"
        "om/P002\t\t\t\t\t150\t120\t\n"
        "om/P003\t10\t10\t60\t50\t\t\t\n",
    )
    prompts = read_prompts(path, image_sizes={"om/P001": (384, 256)})
    assert prompts["om/P001"] == Prompt((80, 20, 300, 240), ((190, 130), (30, 30)), (1, 0))
    assert prompts["om/P002"] == Prompt(None, ((150, 120),), (1,))
    assert prompts["om/P003"] == Prompt((10, 10, 60, 50))
    assert prompts["om/P001"].describe() == "box:80,20,300,240;point:190,130,1;point:30,30,0"
    box_only = _write(tmp_path / "boxes.tsv", "image_id\tx0\ty0\tx1\ty1\nA\t1\t2\t3\t4\n")
    assert read_prompts(box_only) == {"A": Prompt((1, 2, 3, 4))}
    points_only = _write(tmp_path / "points.tsv", "image_id\tpoint_x\tpoint_y\nA\t5\t6\n")
    assert read_prompts(points_only) == {"A": Prompt(None, ((5, 6),), (1,))}


HEADER = "image_id\tx0\ty0\tx1\ty1\tpoint_x\tpoint_y\tpoint_label\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image_id\tx0\ty0\tx1\nA\t1\t2\t3\n", r"lacks column\(s\) y1"),
        ("image_id\tfoo\nA\t1\n", r"lacks column\(s\) point_x, point_y"),
        (HEADER + "A\t1\t2\t3\t4\t\t\t\nA\t1\t2\tx\t4\t\t\t\n", r"line 3: x1 must be an integer"),
        (HEADER + "A\t1.5\t2\t3\t4\t\t\t\n", r"line 2: x0 must be an integer"),
        (HEADER + "A\t1\t2\t\t4\t\t\t\n", r"line 2: .*x1 is empty"),
        (HEADER + "A\t5\t2\t3\t4\t\t\t\n", r"line 2: box \(5, 2, 3, 4\) .* needs 0 <= x0 < x1"),
        (HEADER + "om/P001\t0\t0\t400\t100\t\t\t\n", r"line 2: box .* outside the 384x256"),
        (HEADER + "om/P001\t\t\t\t\t10\t300\t1\n", r"line 2: point .* outside the 384x256"),
        (HEADER + "A\t\t\t\t\t1\t2\t2\n", r"line 2: point_label .* must be 0 or 1"),
        (HEADER + "A\t1\t2\t3\t4\t\t\t\nA\t1\t2\t3\t5\t\t\t\n", r"line 3: .*differs .* line 2"),
        (HEADER + "A\t\t\t\t\t\t\t\n", r"line 2: .*neither a box nor a point"),
        (HEADER + "\t1\t2\t3\t4\t\t\t\n", r"line 2: image_id is empty"),
    ],
)
def test_read_prompts_errors_name_file_and_line(tmp_path, text, message):
    path = _write(tmp_path / "bad_prompts.tsv", text)
    with pytest.raises(ValueError, match=message) as caught:
        read_prompts(path, image_sizes={"om/P001": (384, 256)})
    assert "bad_prompts.tsv" in str(caught.value)


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_prompts(tmp_path / "nope.tsv")


def test_prompt_validates_itself():
    with pytest.raises(ValueError, match="differ in length"):
        Prompt(None, ((1, 2),), ())
    with pytest.raises(ValueError, match="needs a box or at least one point"):
        Prompt(None)
    with pytest.raises(ValueError, match="x0 < x1"):
        Prompt((5, 0, 5, 3))


# ---------------------------------------------------------------- SAM


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    state = build_sam("tiny").state_dict()
    state["image_encoder.pos_embed"].normal_(0.0, 0.02)  # zeros at init; make it distinctive
    torch.save(state, path)
    return path


def test_load_sam_loads_the_file_weights(tiny_checkpoint):
    saved = torch.load(tiny_checkpoint, weights_only=True)
    predictor = load_sam(tiny_checkpoint, "tiny")
    loaded = predictor.model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    fresh = build_sam("tiny").state_dict()  # random init differs, so loading did something
    assert not torch.equal(fresh["image_encoder.pos_embed"], saved["image_encoder.pos_embed"])


def test_load_sam_errors_name_the_file(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"sam_tiny\.pth does not fit model type 'vit_b'"):
        load_sam(tiny_checkpoint, "vit_b")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_sam(tmp_path / "missing.pth", "tiny")
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2], not_a_state_dict)
    with pytest.raises(ValueError, match=r"list\.pth is not a state dict"):
        load_sam(not_a_state_dict, "tiny")
    with pytest.raises(ValueError, match="model_type must be one of"):
        build_sam("vit_x")


def test_sam_mask_shape_dtype_and_determinism(tiny_checkpoint):
    predictor = load_sam(tiny_checkpoint, "tiny")
    rgb = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    prompt = Prompt((20, 30, 100, 110), ((60, 70),), (1,))
    first = sam_mask(predictor, rgb, prompt)
    assert first.dtype == bool and first.shape == (128, 128)
    assert np.array_equal(first, sam_mask(predictor, rgb, prompt))
    with pytest.raises(ValueError, match="outside the 128x128 image"):
        sam_mask(predictor, rgb, Prompt((0, 0, 200, 50)))


# ---------------------------------------------------------------- cohort stage


@pytest.fixture
def om_manifest(tmp_path) -> pd.DataFrame:
    """Three demo OM images (one with a distractor blob) and one non-OM row."""
    rows = []
    for index, pattern in enumerate(DISEASES):
        rgb, reference = _render(pattern, 20 + index)
        if index == 0:
            rgb, _ = _add_distractor(rgb, reference)
        path = tmp_path / "raw" / "om" / f"P{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
        rows.append(("OM", f"om/P{index}", path, pattern))
    rows.append(("IM", "im/P0", tmp_path / "raw" / "im" / "P0.jpg", "IgAN"))  # never read
    return pd.DataFrame(
        {
            "patient_id": [f"P{i}" for i in (0, 1, 2, 0)],
            "modality": [r[0] for r in rows],
            "image_id": [r[1] for r in rows],
            "path": [str(r[2]) for r in rows],
            "width_px": WIDTH_PX,
            "height_px": HEIGHT_PX,
            "disease": [r[3] for r in rows],
        }
    )


def _check_outputs(table: pd.DataFrame, out_dir: Path) -> None:
    assert list(table.columns) == list(SEGMENTATION_COLUMNS)
    assert list(table["image_id"]) == ["om/P0", "om/P1", "om/P2"]
    for row in table.itertuples():
        mask = np.asarray(Image.open(out_dir / "masks" / f"{row.image_id}.png"))
        assert mask.shape == (HEIGHT_PX, WIDTH_PX) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert int((mask == 255).sum()) == row.mask_area_px > 0
        x0, y0, x1, y1 = mask_to_box(mask == 255)
        assert 0 <= row.crop_x0 <= x0 < x1 <= row.crop_x1 <= WIDTH_PX
        assert 0 <= row.crop_y0 <= y0 < y1 <= row.crop_y1 <= HEIGHT_PX
        qc = np.asarray(Image.open(out_dir / "qc" / f"{row.image_id}.png"))
        assert qc.shape == (HEIGHT_PX, WIDTH_PX, 3)
        assert (qc == cohort_module.CONTOUR_RGB).all(axis=-1).any()


def test_segment_cohort_classical(om_manifest, tmp_path, caplog):
    out_dir = tmp_path / "seg"
    with caplog.at_level(logging.WARNING, logger="mmdiag.segment.cohort"):
        table = segment_cohort(om_manifest, out_dir, progress=False)
    _check_outputs(table, out_dir)
    assert (table["method"] == "classical").all()
    assert table["prompt"].str.startswith("box:").all()
    assert sum("SAM is not configured" in r.getMessage() for r in caplog.records) == 1
    # The crop is the mask box grown by 10 % per side (clipped), and misses the distractor.
    for row in table.itertuples():
        mask = np.asarray(Image.open(out_dir / "masks" / f"{row.image_id}.png")) == 255
        x0, _, x1, _ = mask_to_box(mask)
        grow = 0.1 * (x1 - x0)
        assert row.crop_x0 == max(0, int(np.floor(x0 - grow)))
        assert row.crop_x1 == min(WIDTH_PX, int(np.ceil(x1 + grow)))


def test_segment_cohort_with_tiny_sam(om_manifest, tmp_path, tiny_checkpoint):
    out_dir = tmp_path / "seg"
    table = segment_cohort(
        om_manifest, out_dir, sam_checkpoint=tiny_checkpoint, sam_model_type="tiny", progress=False
    )
    # Random tiny-SAM weights may still give an empty mask, which falls back to classical.
    assert (table["method"] == "sam").sum() >= 1
    _check_outputs(table, out_dir)


def test_segment_cohort_falls_back_when_sam_mask_is_empty(
    om_manifest, tmp_path, tiny_checkpoint, monkeypatch, caplog
):
    monkeypatch.setattr(
        cohort_module, "sam_mask", lambda predictor, rgb, prompt: np.zeros(rgb.shape[:2], bool)
    )
    out_dir = tmp_path / "seg"
    with caplog.at_level(logging.WARNING, logger="mmdiag.segment.cohort"):
        table = segment_cohort(
            om_manifest,
            out_dir,
            sam_checkpoint=tiny_checkpoint,
            sam_model_type="tiny",
            progress=False,
        )
    assert (table["method"] == "classical").all()
    _check_outputs(table, out_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert any("empty mask for om/P1" in message for message in messages)


def test_user_prompts_override_the_detector(om_manifest, tmp_path, tiny_checkpoint):
    first = np.asarray(Image.open(om_manifest.loc[0, "path"]))
    _, reference = _render(DISEASES[0], 20)
    _, (blob_x, blob_y) = _add_distractor(first, reference)
    box = (blob_x - 40, blob_y - 40, blob_x + 40, blob_y + 40)
    prompts = _write(
        tmp_path / "prompts.tsv",
        "image_id\tx0\ty0\tx1\ty1\n" + "om/P0\t" + "\t".join(map(str, box)) + "\n",
    )
    out_dir = tmp_path / "seg"
    table = segment_cohort(om_manifest, out_dir, prompts_tsv=prompts, progress=False)
    row = table.iloc[0]
    assert row["prompt"] == "user:box:" + ",".join(map(str, box))
    mask = np.asarray(Image.open(out_dir / "masks" / "om" / "P0.png")) == 255
    assert mask[blob_y, blob_x] and not (mask & reference).any()
    assert table["prompt"].iloc[1:].str.startswith("box:").all()  # others: the detector

    with_sam = segment_cohort(
        om_manifest.iloc[:1],
        tmp_path / "seg_sam",
        prompts_tsv=prompts,
        sam_checkpoint=tiny_checkpoint,
        sam_model_type="tiny",
        progress=False,
    )
    assert with_sam["prompt"].iloc[0].startswith("user:box:")


def test_segment_cohort_rejects_bad_arguments(om_manifest, tmp_path):
    with pytest.raises(ValueError, match="lacks column"):
        segment_cohort(om_manifest.drop(columns="image_id"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no OM image"):
        segment_cohort(om_manifest.iloc[3:], tmp_path, progress=False)
    with pytest.raises(ValueError, match="crop_margin"):
        segment_cohort(om_manifest, tmp_path, crop_margin=-1.0, progress=False)
    unsafe = om_manifest.assign(image_id=["../x", "om/P1", "om/P2", "im/P0"])
    with pytest.raises(ValueError, match="cannot name a file"):
        segment_cohort(unsafe, tmp_path, progress=False)
