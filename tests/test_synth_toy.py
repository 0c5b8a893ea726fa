"""Tests of the toy micro/macro-anomaly slide cohorts (mmdiag.synth.toy_mil).

The scale-specific claims are checked on the pixels that the real patching stage
(:func:`mmdiag.patching.pipeline.patch_slide`, repository defaults) reads back from the SVS
files, i.e. after JPEG compression, the pyramid and the engine's area reduction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmdiag.data.manifest import ManifestRules, build_manifest
from mmdiag.patching.pipeline import patch_slide
from mmdiag.patching.store import open_patch_store
from mmdiag.synth import toy_mil
from tests.patching_settings import patching_settings

openslide = pytest.importorskip("openslide")

PATCH_PX = 256
N_SITES = 8
# The patching defaults of config/config.yaml (workers 1: a test needs no process pool).
PATCHING = patching_settings(patch_px=PATCH_PX, workers=1)
N_SLIDES = {"micro": 2, "macro": 2, "mixed": 2}
FIRST_SEED = 8  # seeds 8, 9, 10 give 3 positive sites per cohort
NEAR_WHITE = 230  # a pixel whose darkest channel is at least this is "near-white"
SITE_5X = slice(3 * PATCH_PX // 8, 5 * PATCH_PX // 8)  # the site inside its 5x context


def _near_white(pixels: np.ndarray) -> np.ndarray:
    return pixels.min(axis=-1) >= NEAR_WHITE


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, tuple[Path, pd.DataFrame, dict]]:
    """Per kind: the cohort folder, its sites table with the patched pixels of each site,
    and per slide the sorted level-0 corners of the base patches the patching stage kept."""
    out = tmp_path_factory.mktemp("toy")
    result = {}
    for seed, kind in enumerate(toy_mil.KINDS, start=FIRST_SEED):
        root = toy_mil.write_toy_cohort(
            out / kind, kind=kind, n_slides=N_SLIDES[kind], seed=seed, progress=False
        )
        sites = pd.read_csv(root / "sites.tsv", sep="\t")
        sites = sites.sort_values(["patient_id", "site"], ignore_index=True)
        found, pixels = {}, {"20x": [], "5x": []}
        for slide_id, slide_sites in sites.groupby("patient_id", sort=True):
            store_path = out / f"{kind}_{slide_id}.zarr"
            patch_slide(
                root / "wsi" / f"{slide_id}.svs",
                PATCHING,
                store_path=store_path,
                mask_path=out / f"{kind}_{slide_id}_mask.png",
                qc_path=out / f"{kind}_{slide_id}_qc.png",
                progress=False,
            )
            store = open_patch_store(store_path)
            corners = list(zip(store.grid["x_20x"], store.grid["y_20x"], strict=True))
            found[slide_id] = sorted((int(x), int(y)) for x, y in corners)
            for row in slide_sites.itertuples():
                index = corners.index((row.x_level0_px, row.y_level0_px))
                for scale in pixels:
                    pixels[scale].append(np.asarray(store.group[f"pixels_{scale}"][index]))
        sites["pixels_20x"], sites["pixels_5x"] = pixels["20x"], pixels["5x"]
        result[kind] = (root, sites, found)
    return result


# -- geometry and arguments ------------------------------------------------------------------
@pytest.mark.parametrize(("n_sites", "patch_px"), [(8, 256), (5, 128), (1, 64)])
def test_layout_aligns_sites_and_separates_contexts(n_sites, patch_px):
    width, height, corners = toy_mil.slide_layout(n_sites, patch_px)
    assert len(corners) == n_sites
    context = 4 * patch_px
    boxes = []
    for x, y in corners:
        assert x % patch_px == 0 and y % patch_px == 0  # on the base-patch grid
        cx0, cy0 = x + patch_px // 2 - context // 2, y + patch_px // 2 - context // 2
        assert 0 <= cx0 and cx0 + context <= width and 0 <= cy0 and cy0 + context <= height
        boxes.append((cx0, cy0))
    for i, (ax, ay) in enumerate(boxes):
        for bx, by in boxes[i + 1 :]:
            assert abs(ax - bx) >= context or abs(ay - by) >= context  # contexts do not overlap
    if (n_sites, patch_px) == (8, 256):
        assert (width, height) == (4352, 2304)
        assert corners[:2] == [(512, 512), (1536, 512)] and corners[4] == (512, 1536)


def test_arguments_are_validated():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        toy_mil.render_toy_slide("meso", [], rng)
    with pytest.raises(ValueError, match="positive_sites"):
        toy_mil.render_toy_slide("micro", [8], rng)
    with pytest.raises(ValueError, match="positive_sites"):
        toy_mil.render_toy_slide("micro", [1, 1], rng)
    with pytest.raises(ValueError, match="positive_anomaly"):
        toy_mil.render_toy_slide("mixed", [0], rng)
    with pytest.raises(ValueError, match="positive_anomaly"):
        toy_mil.render_toy_slide("micro", [0], rng, positive_anomaly="macro")
    with pytest.raises(ValueError, match="patch_px"):
        toy_mil.slide_layout(8, 100)
    with pytest.raises(ValueError, match="n_sites"):
        toy_mil.slide_layout(0, 256)
    with pytest.raises(ValueError, match="n_slides"):
        toy_mil.plan_toy_slides("micro", 0, seed=1)


# -- bags and labels -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", toy_mil.KINDS)
def test_plans_are_balanced_with_one_to_three_positive_sites(kind):
    plans = toy_mil.plan_toy_slides(kind, 61, seed=5)
    labels = [p.label for p in plans]
    assert labels.count("negative") == 31 and labels.count("positive") == 30
    assert [p.slide_id for p in plans[:2]] == ["T001", "T002"]
    counts = [len(p.positive_sites) for p in plans if p.label == "positive"]
    assert set(counts) == {1, 2, 3}
    assert all(
        len(p.positive_sites) == 0 and p.anomaly == "none" for p in plans if p.label == "negative"
    )
    assert all(0 <= s < N_SITES for p in plans for s in p.positive_sites)
    anomalies = [p.anomaly for p in plans if p.label == "positive"]
    expected = {"micro": {"micro": 30}, "macro": {"macro": 30}, "mixed": {"micro": 15, "macro": 15}}
    assert pd.Series(anomalies).value_counts().to_dict() == expected[kind]


def test_cohort_tables_agree_with_each_other_and_the_manifest(cohorts):
    for kind, (root, sites, _) in cohorts.items():
        labels = pd.read_csv(root / "clinical.tsv", sep="\t")
        clinical = pd.read_csv(root / "slides.tsv", sep="\t")
        images = pd.read_csv(root / "images.tsv", sep="\t")
        provenance = json.loads((root / "cohort.json").read_text())
        assert list(labels.columns) == ["patient_id", "disease"]  # only what the manifest reads
        assert list(clinical.columns) == ["patient_id", "label", "anomaly", "n_positive_sites"]
        assert (clinical["patient_id"] == labels["patient_id"]).all()
        assert (clinical["label"] == labels["disease"]).all()
        assert clinical["label"].value_counts().to_dict() == {
            "negative": N_SLIDES[kind] // 2,
            "positive": N_SLIDES[kind] // 2,
        }
        assert images["path"].tolist() == [f"wsi/{p}.svs" for p in clinical["patient_id"]]
        assert (images["modality"] == "WSI").all()
        per_slide = sites.groupby("patient_id")["positive"].sum()
        for row in clinical.itertuples():
            assert per_slide[row.patient_id] == row.n_positive_sites
            assert (row.n_positive_sites == 0) == (row.label == "negative")
            assert 0 <= row.n_positive_sites <= 3
        assert ((sites["anomaly"] == "none") == (sites["positive"] == 0)).all()
        if kind == "micro":
            assert (sites["shape"] == "none").all()
        else:  # a shape around every site; an ellipse exactly where the anomaly is macro
            assert set(sites["shape"]) <= {"circle", "ellipse"}
            assert ((sites["shape"] == "ellipse") == (sites["anomaly"] == "macro")).all()
        assert provenance["seed"] == FIRST_SEED + toy_mil.KINDS.index(kind)
        assert provenance["settings"] == {
            "kind": kind,
            "n_slides": N_SLIDES[kind],
            "n_sites": N_SITES,
            "patch_px": PATCH_PX,
        }
        manifest = build_manifest(
            cohort_root=root,
            rules=ManifestRules(classes=toy_mil.LABELS, required_modalities=("WSI",)),
        )
        assert len(manifest) == N_SLIDES[kind] and set(manifest["width_px"]) == {4352}
    mixed = cohorts["mixed"][1]
    positive = mixed[mixed["positive"] == 1]
    assert positive["patient_id"].nunique() == 1 and positive["anomaly"].nunique() == 1


# -- files -----------------------------------------------------------------------------------
def test_slides_open_in_openslide_at_20x(cohorts):
    root, _, _ = cohorts["micro"]
    slide = openslide.OpenSlide(str(root / "wsi" / "T001.svs"))
    try:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.5
        assert float(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 20
        assert slide.level_count == 4
        assert slide.dimensions == (4352, 2304)
        assert [round(d) for d in slide.level_downsamples] == [1, 2, 4, 8]
    finally:
        slide.close()


def test_same_seed_gives_identical_bytes(tmp_path):
    def write(name: str, seed: int) -> dict[str, bytes]:
        root = toy_mil.write_toy_cohort(
            tmp_path / name,
            kind="mixed",
            n_slides=2,
            seed=seed,
            n_sites=2,
            patch_px=64,
            progress=False,
        )
        return {
            str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    first, second, other = write("a", 3), write("b", 3), write("c", 4)
    assert sorted(first) == [
        "clinical.tsv",
        "cohort.json",
        "images.tsv",
        "sites.tsv",
        "slides.tsv",
        "wsi/T001.svs",
        "wsi/T002.svs",
    ]
    assert first == second
    assert first["wsi/T001.svs"] != other["wsi/T001.svs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary left


# -- the patching stage sees exactly the sites -----------------------------------------------
def test_patching_finds_exactly_the_sites(cohorts):
    for _, sites, found in cohorts.values():
        for slide_id, slide_sites in sites.groupby("patient_id"):
            corners = zip(slide_sites["x_level0_px"], slide_sites["y_level0_px"], strict=True)
            assert found[slide_id] == sorted((int(x), int(y)) for x, y in corners), slide_id
            assert len(found[slide_id]) == N_SITES


# -- scale-specific signals ------------------------------------------------------------------
def test_micro_crosses_show_at_20x_and_wash_out_at_5x(cohorts):
    _, sites, _ = cohorts["micro"]
    positive, negative = sites[sites["positive"] == 1], sites[sites["positive"] == 0]
    assert len(positive) >= 1 and len(negative) >= 5
    assert (positive["n_crosses"] >= 5).all()

    white_20x = np.array([_near_white(p).mean() for p in sites["pixels_20x"]])
    white_5x = np.array([_near_white(p[SITE_5X, SITE_5X]).mean() for p in sites["pixels_5x"]])
    is_positive = sites["positive"].to_numpy() == 1
    # 20x: every positive site has hundreds of near-white pixels, negatives none
    assert white_20x[is_positive].min() > 0.002 and white_20x[~is_positive].max() == 0.0
    # 5x: the site's 64 x 64 pixels hold (almost) no near-white pixel in either class
    assert white_5x.max() <= 2 / 64**2
    assert white_5x[is_positive].mean() < 0.05 * white_20x[is_positive].mean()

    brightest_20x = np.array([p.min(axis=-1).max() for p in sites["pixels_20x"]])
    brightest_5x = np.array([p[SITE_5X, SITE_5X].min(axis=-1).max() for p in sites["pixels_5x"]])
    assert brightest_20x[is_positive].min() >= 240 and brightest_20x[~is_positive].max() <= 215
    assert brightest_5x.max() <= 225  # a cross at 5x is no whiter than pale stroma
    # whole-site colour at 5x: the crosses shift the mean by less than 3 grey levels
    mean_5x = np.array([p[SITE_5X, SITE_5X].reshape(-1, 3).mean(0) for p in sites["pixels_5x"]])
    shift = mean_5x[is_positive].mean(0) - mean_5x[~is_positive].mean(0)
    assert np.abs(shift).max() < 3.0


def _shape_moments(context: np.ndarray) -> tuple[float, float]:
    """Axis ratio and major-axis angle (degrees, clockwise from +x) of the non-glass area."""
    mask = context.min(axis=-1) < 232
    ys, xs = np.nonzero(mask)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    eigenvalues = np.linalg.eigvalsh(cov)
    angle = 0.5 * np.degrees(np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))
    return float(np.sqrt(eigenvalues[1] / eigenvalues[0])), float(angle % 180)


def test_macro_shape_shows_at_5x_only(cohorts):
    _, sites, _ = cohorts["macro"]
    is_ellipse = (sites["shape"] == "ellipse").to_numpy()
    assert ((sites["shape"] == "ellipse") == (sites["positive"] == 1)).all()
    assert is_ellipse.sum() >= 1 and (~is_ellipse).sum() >= 8

    # 5x: the second moments of the non-glass area give the drawn axis ratio and angle
    moments = [_shape_moments(p) for p in sites["pixels_5x"]]
    ratio = np.array([m[0] for m in moments])
    assert ratio[~is_ellipse].max() < 1.03 and ratio[is_ellipse].min() > 1.75
    drawn = sites["shape_semi_major_px"] / sites["shape_semi_minor_px"]
    np.testing.assert_allclose(ratio[is_ellipse], drawn[is_ellipse], rtol=0.02)
    angle = np.array([m[1] for m in moments])
    angle_error = (angle - sites["shape_angle_deg"].to_numpy() + 90) % 180 - 90
    assert np.abs(angle_error[is_ellipse]).max() < 1.0

    # geometry: the base patch lies inside every shape, the shape inside the 5x context
    assert (sites["shape_semi_minor_px"] > PATCH_PX / np.sqrt(2) + 5).all()
    assert (sites["shape_semi_major_px"] < 2 * PATCH_PX - 10).all()

    # 20x: tissue only, and the same colour in both classes
    pixels_20x = np.stack(sites["pixels_20x"].to_list())
    assert pixels_20x.min(axis=-1).max() < 220  # no glass, no shape border inside the patch
    mean_20x = pixels_20x.reshape(len(sites), -1, 3).mean(1)
    shift = mean_20x[is_ellipse].mean(0) - mean_20x[~is_ellipse].mean(0)
    spread = mean_20x[~is_ellipse].std(0)
    assert np.abs(shift).max() < 3.0 and (np.abs(shift) < 2.5 * spread + 0.5).all()
