"""Toy whole-slide MIL benchmark with scale-specific anomalies (CS-MIL, Table 5).

After the simulation of Deng et al., "Cross-scale Multi-instance Learning for Pathological
Image Diagnosis" (Medical Image Analysis, journal extension of MICCAI 2022; authors' code at
github.com/hrlblab/CS-MIL), section 5.3: a *micro-anomaly* dataset whose signal (small white
crosses) is only visible at 20x, and a *macro-anomaly* dataset whose signal (an ellipse
instead of a circle) is only recognisable with the large field of view of 5x.

Departure from the paper: the authors cut their toy patches from normal Unitopatho tissue and
released patch folders; here whole slides are synthesised, so the toy cohort runs through
the same patching, embedding and MIL stages as a real cohort.

Slide layout (level 0 at 0.5 µm/px, i.e. 20x; ``p = patch_px``)::

    +--------------------------------------------------------------+
    |  .5p margin of glass                                         |
    |   +-- 4p cell --+-- 4p cell --+ ...   one cell per site,     |
    |   |    .----.   |             |       row-major, up to       |
    |   |   ( [##] )  |    [##]     |       ceil(sqrt(2 n)) wide   |
    |   |    '----'   |             |                              |
    |   +-------------+-------------+                              |

* Each *site* ``[##]`` is a ``p x p`` square of H&E-like tissue whose top-left corner lies
  at ``(2p + 4p * column, 2p + 4p * row)``: a multiple of ``p``, so the patching grid cuts
  exactly one base patch per site. Its 5x context (the ``4p`` square sharing its centre)
  is its cell; cells tile the slide without overlap and all lie inside it.
* Outside the sites the slide is white glass, except for the macro shapes, which are drawn
  as a *desaturated* (grey-lavender) version of the same tissue texture: HSV saturation
  about 4 on the 0..255 scale, against 50-75 in the sites and 2 on glass. Tissue detection
  thresholds saturation (Otsu, floor 10; Otsu falls near 16 on these slides), so it sees
  only the sites: a slide of ``n_sites`` sites gives exactly ``n_sites`` base patches with
  the repository's patching defaults (``min_tissue`` 0.5, thumbnail at 8 µm/px). On a
  sample macro slide any fixed ``saturation_threshold`` from 4 to 65 gave the same 8
  patches; below 4 the shapes count as tissue.
* ``kind="micro"``: a positive site carries 5-9 white crosses (``+``, each bar 10-14 px
  long and 2 px wide) scattered over its square; a negative site none. At 20x they are
  sharp; once the ``4p`` context is reduced 4x to ``p`` pixels a cross is a faint 3-4 px
  speck, at most 44 % white (bars are placed to straddle the reduction grid), only a few
  grey levels brighter than the palest stroma fibres.
* ``kind="macro"``: every site is the centre of a large shape: a circle of radius
  1.13-1.25 ``p`` (negative) or an ellipse of the same area with axis ratio 1.8-2.2 and a
  uniformly random orientation (positive). The minor semi-axis (at least 0.76 ``p``)
  exceeds the half-diagonal of the site (0.71 ``p``), so the base patch sees only tissue
  and the two classes look alike at 20x; the major semi-axis (at most 1.86 ``p``) stays
  inside the ``4p`` context, so at 5x the whole shape is visible. The 10x context (``2p``)
  shows part of an ellipse's rim but of a circle only the corners, so 10x separates the
  classes in part, as in the paper's Table 5 (single-scale 10x and 5x models both reach an
  AUC near 1 on its macro-anomaly set).
* ``kind="mixed"``: every site sits in a shape as in ``"macro"``; a positive slide carries
  either micro or macro positive sites (alternating over the positive slides, which are in
  shuffled order), so a classifier needs both 20x and 5x.

Bags: a positive slide holds 1-3 positive sites (uniform), a negative slide none; labels
``"negative"`` / ``"positive"`` are balanced (round-robin, shuffled).

Cohort folder written by :func:`write_toy_cohort`::

    wsi/{slide_id}.svs   Aperio-style pyramidal SVS, mpp 0.5, AppMag 20, 4 levels (x2)
    clinical.tsv         patient_id, disease (the slide's label: what the manifest reads)
    slides.tsv           patient_id, label (= disease), anomaly (none|micro|macro),
                         n_positive_sites (the design of each slide, for inspection)
    images.tsv           patient_id, modality (WSI), path (relative to the folder)
    sites.tsv            patient_id, site, x_level0_px, y_level0_px, size_level0_px,
                         positive (0/1), anomaly, shape (none|circle|ellipse),
                         shape_semi_major_px, shape_semi_minor_px, shape_angle_deg,
                         n_crosses
    cohort.json          provenance: version, settings, seed, design, slides

Every random draw comes from ``numpy.random.default_rng([seed, stream, slide])``, so the same
arguments give byte-identical files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import track

import mmdiag
from mmdiag.io.atomic import atomic_path, write_json, write_tsv
from mmdiag.synth._draw import (
    blend,
    impulse_blobs,
    smooth_noise,
    soft_step,
    stream_rng,
    to_uint8,
)
from mmdiag.synth.wsi import write_svs

logger = logging.getLogger(__name__)

KINDS = ("micro", "macro", "mixed")
LABELS = ("negative", "positive")
CONTEXT_FACTOR = 4  # the 5x context covers 4 base-patch sides
MPP = 0.5
OBJECTIVE_POWER = 20.0
SVS_LEVELS, SVS_DOWNSAMPLE, SVS_TILE_PX, SVS_JPEG_QUALITY = 4, 2, 256, 90
MAX_POSITIVE_SITES = 3

_GLASS_RGB = (246.0, 246.0, 244.0)
_STROMA_RGB, _PALE_STROMA_RGB, _NUCLEUS_RGB = (230, 150, 188), (246, 205, 224), (78, 42, 118)
_CROSS_RGB = (250.0, 250.0, 248.0)
_FIBRE_CELL_UM, _NUCLEUS_SPACING_UM, _NUCLEUS_SIGMA_UM = 6.0, 12.0, 1.6
_CROSSES_PER_SITE = (5, 9)
_CROSS_BAR_PX = (10, 14)  # length of each bar of a "+", level-0 pixels
_CROSS_WIDTH_PX = 2
_CROSS_GRID_PX = 4  # bar centre lines on this grid: see _draw_crosses
_CIRCLE_RADIUS = (1.13, 1.25)  # in base-patch sides
_ELLIPSE_AXIS_RATIO = (1.8, 2.2)
_SHAPE_EDGE_PX = 1.5
# Shape tone: the texture's luminance pulled towards white, barely tinted (saturation ~2 %).
_SHAPE_LUMA_GAIN, _SHAPE_TINT = 0.55, (1.0, 0.985, 1.0)

# Random streams: one independent generator per (stream, slide).
_ASSIGNMENT, _PLAN, _SLIDE = range(3)


@dataclass(frozen=True)
class ToySite:
    """One site of a toy slide: where its base patch lies and what it shows."""

    site: int
    x_level0_px: int
    y_level0_px: int
    size_level0_px: int
    positive: int
    anomaly: str  # none | micro | macro
    shape: str  # none | circle | ellipse
    shape_semi_major_px: float  # circle: both semi-axes are the radius
    shape_semi_minor_px: float
    shape_angle_deg: float  # major axis, clockwise from +x (image axes, y down)
    n_crosses: int


SITE_COLUMNS = tuple(f.name for f in fields(ToySite))


# -- geometry --------------------------------------------------------------------------------
def slide_layout(n_sites: int, patch_px: int) -> tuple[int, int, list[tuple[int, int]]]:
    """Return ``(width_px, height_px, site top-left corners)`` of a toy slide, level 0.

    Sites sit on a grid of ``4 * patch_px`` cells, ``ceil(sqrt(2 * n_sites))`` wide (at most
    ``n_sites``), each site centred in its cell; a ``patch_px / 2`` glass margin surrounds
    the cells, so every 5x context lies inside the slide and touches no other.
    """
    _check_n_sites(n_sites)
    _check_patch_px(patch_px)
    n_cols = min(n_sites, math.ceil(math.sqrt(2 * n_sites)))
    n_rows = math.ceil(n_sites / n_cols)
    pitch = CONTEXT_FACTOR * patch_px
    offset = (CONTEXT_FACTOR // 2) * patch_px  # margin p/2 + (4p - p) / 2 = 2p
    corners = [
        (offset + pitch * (i % n_cols), offset + pitch * (i // n_cols)) for i in range(n_sites)
    ]
    return n_cols * pitch + patch_px, n_rows * pitch + patch_px, corners


def _check_n_sites(n_sites: int) -> None:
    if int(n_sites) != n_sites or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")


def _check_patch_px(patch_px: int) -> None:
    # multiple of 16: the 5x context corner (site corner - 1.5 p) lies on the 4x-reduced grid
    if int(patch_px) != patch_px or patch_px < 64 or patch_px % 16:
        raise ValueError(f"patch_px must be a multiple of 16 and >= 64, got {patch_px!r}")


# -- drawing ---------------------------------------------------------------------------------
def _he_texture(rng: np.random.Generator, height_px: int, width_px: int) -> np.ndarray:
    """H&E-like tissue (eosin stroma with fibres, haematoxylin nuclei); float32 (H, W, 3)."""
    fibres = smooth_noise(rng, height_px, width_px, _FIBRE_CELL_UM / MPP)
    image = np.empty((height_px, width_px, 3), np.float32)
    image[:] = _STROMA_RGB
    blend(image, _PALE_STROMA_RGB, soft_step(-fibres, 0.3) * 0.8)
    spacing_px = _NUCLEUS_SPACING_UM / MPP
    n_nuclei = int(height_px * width_px / spacing_px**2)
    nuclei = impulse_blobs(
        (height_px, width_px),
        rng.uniform(0, height_px - 1, n_nuclei),
        rng.uniform(0, width_px - 1, n_nuclei),
        sigma_px=_NUCLEUS_SIGMA_UM / MPP,
        weights=rng.uniform(0.8, 1.4, n_nuclei),
    )
    blend(image, _NUCLEUS_RGB, np.clip(1.7 * nuclei, 0.0, 0.95))
    image += rng.normal(0.0, 2.0, (height_px, width_px, 1)).astype(np.float32)
    return image


def _desaturate(texture: np.ndarray) -> np.ndarray:
    """The shape tone: the texture's luminance, lightened and barely tinted (saturation ~2 %)."""
    luma = texture @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = _SHAPE_LUMA_GAIN * luma + (1.0 - _SHAPE_LUMA_GAIN) * 255.0
    return grey[..., None] * np.asarray(_SHAPE_TINT, np.float32)


def _shape_alpha(
    height_px: int, width_px: int, major_px: float, minor_px: float, angle_rad: float
) -> np.ndarray:
    """Anti-aliased filled ellipse centred in a ``height_px x width_px`` box; float32 in [0, 1].

    The major axis is turned ``angle_rad`` from the x axis (clockwise on screen, y down).
    """
    yy, xx = np.mgrid[0:height_px, 0:width_px].astype(np.float32)
    yy -= np.float32((height_px - 1) / 2.0)
    xx -= np.float32((width_px - 1) / 2.0)
    u = xx * math.cos(angle_rad) + yy * math.sin(angle_rad)
    v = -xx * math.sin(angle_rad) + yy * math.cos(angle_rad)
    radial = np.sqrt((u / major_px) ** 2 + (v / minor_px) ** 2)
    # distance to the rim, approximately, in pixels (exact on a circle)
    return soft_step((radial - 1.0) * math.sqrt(major_px * minor_px), _SHAPE_EDGE_PX)


def _half_extent_px(
    major_px: float, minor_px: float, angle_rad: float, limit_px: int
) -> tuple[int, int]:
    """Half width and height of the box around a turned ellipse, in whole pixels.

    Includes an anti-aliasing margin and is capped at ``limit_px``. Texture is rendered only
    inside this box, which halves the time per macro slide.
    """
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    half_x = math.hypot(major_px * cos, minor_px * sin)
    half_y = math.hypot(major_px * sin, minor_px * cos)
    margin = 4.0 * _SHAPE_EDGE_PX
    return min(limit_px, math.ceil(half_x + margin)), min(limit_px, math.ceil(half_y + margin))


def _draw_crosses(rng: np.random.Generator, site: np.ndarray) -> int:
    """Paint 5-9 white ``+`` crosses inside the site square, in place; return their count.

    A bar is 2 px wide and its centre line lies on a multiple of 4 px (site corners are
    multiples of 16 px, so also in level-0 and 5x-context coordinates): every 2x and 4x
    area reduction of the patch grid splits the bar over two output pixels. At 5x a cross
    is then at most 44 % white (7 of 16 pixels, at its centre) instead of 75 %.
    """
    side_px = site.shape[0]
    count = int(rng.integers(_CROSSES_PER_SITE[0], _CROSSES_PER_SITE[1] + 1))
    half_width = _CROSS_WIDTH_PX // 2
    for _ in range(count):
        bar = int(rng.integers(_CROSS_BAR_PX[0], _CROSS_BAR_PX[1] + 1))
        low, high = -(-bar // _CROSS_GRID_PX), (side_px - bar) // _CROSS_GRID_PX
        cy, cx = (_CROSS_GRID_PX * int(v) for v in rng.integers(low, high, size=2))
        y0, x0 = cy - bar // 2, cx - bar // 2
        site[cy - half_width : cy + half_width, x0 : x0 + bar] = _CROSS_RGB
        site[y0 : y0 + bar, cx - half_width : cx + half_width] = _CROSS_RGB
    return count


def _render_cell(
    rng: np.random.Generator, patch_px: int, *, with_shape: bool, ellipse: bool, crosses: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one ``4p`` context cell (glass, optional shape, site in the middle); uint8."""
    side_px = CONTEXT_FACTOR * patch_px
    centre, half_site = side_px // 2, patch_px // 2
    cell = np.empty((side_px, side_px, 3), np.float32)
    cell[:] = _GLASS_RGB
    cell += rng.normal(0.0, 1.5, (side_px, side_px, 1)).astype(np.float32)
    drawn: dict[str, Any] = {"shape": "none", "shape_angle_deg": 0.0}
    drawn |= {"shape_semi_major_px": 0.0, "shape_semi_minor_px": 0.0}
    if with_shape:
        radius = rng.uniform(*_CIRCLE_RADIUS) * patch_px
        ratio = rng.uniform(*_ELLIPSE_AXIS_RATIO) if ellipse else 1.0
        angle = rng.uniform(0.0, math.pi) if ellipse else 0.0
        major, minor = radius * math.sqrt(ratio), radius / math.sqrt(ratio)  # same area
        half_x, half_y = _half_extent_px(major, minor, angle, centre)
        box = np.s_[centre - half_y : centre + half_y, centre - half_x : centre + half_x]
        texture = _he_texture(rng, 2 * half_y, 2 * half_x)
        alpha = _shape_alpha(2 * half_y, 2 * half_x, major, minor, angle)
        cell[box] += (_desaturate(texture) - cell[box]) * alpha[..., None]
        site = texture[
            half_y - half_site : half_y + half_site, half_x - half_site : half_x + half_site
        ]
        drawn = {
            "shape": "ellipse" if ellipse else "circle",
            "shape_semi_major_px": round(major, 2),
            "shape_semi_minor_px": round(minor, 2),
            "shape_angle_deg": round(math.degrees(angle), 2),
        }
    else:
        site = _he_texture(rng, patch_px, patch_px)
    n_crosses = _draw_crosses(rng, site) if crosses else 0
    cell[centre - half_site : centre + half_site, centre - half_site : centre + half_site] = site
    return to_uint8(cell), {**drawn, "n_crosses": n_crosses}


def render_toy_slide(
    kind: str,
    positive_sites: Sequence[int],
    rng: np.random.Generator,
    *,
    positive_anomaly: str | None = None,
    n_sites: int = 8,
    patch_px: int = 256,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Render one toy slide at 0.5 µm/px and describe its sites.

    Parameters
    ----------
    kind : {"micro", "macro", "mixed"}
        The dataset; see the module docstring.
    positive_sites : sequence of int
        Indices (0 .. n_sites - 1) of the sites that carry the anomaly; empty for a negative
        slide.
    rng : numpy.random.Generator
        Source of every random draw (texture, shapes, crosses).
    positive_anomaly : {"micro", "macro"}, optional, keyword-only
        The anomaly of the positive sites; defaults to ``kind`` and is required for
        ``kind="mixed"`` when ``positive_sites`` is not empty.
    n_sites, patch_px : int, keyword-only
        Number of sites and side of a site (a base patch) in level-0 pixels.

    Returns
    -------
    image : numpy.ndarray
        uint8 RGB (H, W, 3), level 0; size from :func:`slide_layout`.
    sites : pandas.DataFrame
        One row per site with the columns of :data:`SITE_COLUMNS`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    width_px, height_px, corners = slide_layout(n_sites, patch_px)
    positives = {int(i) for i in positive_sites}
    if len(positives) != len(positive_sites) or not positives <= set(range(n_sites)):
        raise ValueError(
            f"positive_sites must be distinct indices in [0, {n_sites}), got {positive_sites!r}"
        )
    anomaly = positive_anomaly
    if anomaly is None and kind != "mixed":
        anomaly = kind
    allowed = ("micro", "macro") if kind == "mixed" else (kind,)
    if positives and anomaly not in allowed:
        raise ValueError(
            f"positive_anomaly must be one of {allowed} for kind {kind!r}, got {positive_anomaly!r}"
        )

    image = np.empty((height_px, width_px, 3), np.uint8)
    image[:] = np.asarray(_GLASS_RGB, np.uint8)
    rows = []
    margin = (CONTEXT_FACTOR - 1) * patch_px // 2
    for index, (x0, y0) in enumerate(corners):
        site_anomaly = anomaly if index in positives else "none"
        cell, drawn = _render_cell(
            rng,
            patch_px,
            with_shape=kind != "micro",
            ellipse=site_anomaly == "macro",
            crosses=site_anomaly == "micro",
        )
        image[
            y0 - margin : y0 - margin + cell.shape[0], x0 - margin : x0 - margin + cell.shape[1]
        ] = cell
        rows.append(
            ToySite(
                site=index,
                x_level0_px=x0,
                y_level0_px=y0,
                size_level0_px=patch_px,
                positive=int(index in positives),
                anomaly=site_anomaly,
                **drawn,
            )
        )
    return image, pd.DataFrame([asdict(row) for row in rows], columns=list(SITE_COLUMNS))


# -- cohort ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToySlidePlan:
    """What one toy slide is: its id, label, anomaly and positive sites."""

    index: int
    slide_id: str
    label: str
    anomaly: str  # none | micro | macro
    positive_sites: tuple[int, ...]


def plan_toy_slides(kind: str, n_slides: int, seed: int, *, n_sites: int = 8) -> list[ToySlidePlan]:
    """Assign balanced labels (round-robin, shuffled), anomalies and positive sites."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if int(n_slides) != n_slides or n_slides < 1:
        raise ValueError(f"n_slides must be an integer >= 1, got {n_slides!r}")
    _check_n_sites(n_sites)
    order = stream_rng(seed, _ASSIGNMENT).permutation(n_slides)
    labels = [LABELS[int(order[i]) % 2] for i in range(n_slides)]
    width = max(3, len(str(n_slides)))
    plans, n_positive = [], 0
    for index, label in enumerate(labels):
        rng = stream_rng(seed, _PLAN, index)
        anomaly, sites = "none", ()
        if label == "positive":
            anomaly = kind if kind != "mixed" else ("micro", "macro")[n_positive % 2]
            n_positive += 1
            count = int(rng.integers(1, min(MAX_POSITIVE_SITES, n_sites) + 1))
            sites = tuple(sorted(int(i) for i in rng.choice(n_sites, count, replace=False)))
        plans.append(ToySlidePlan(index, f"T{index + 1:0{width}d}", label, anomaly, sites))
    return plans


def write_toy_cohort(
    root: str | Path,
    *,
    kind: str,
    n_slides: int,
    seed: int,
    n_sites: int = 8,
    patch_px: int = 256,
    progress: bool = True,
) -> Path:
    """Write a toy micro/macro/mixed-anomaly slide cohort at ``root`` and return ``root``.

    Parameters
    ----------
    root : str or Path
        Cohort folder to create; an existing folder is replaced only once the new one is
        complete.
    kind : {"micro", "macro", "mixed"}, keyword-only
        The dataset; see the module docstring.
    n_slides : int, keyword-only
        Number of slides (one per patient); labels are balanced (an odd count has one more
        negative).
    seed : int, keyword-only
        Seed of every random draw.
    n_sites, patch_px : int, keyword-only
        Sites (base patches) per slide and their side in level-0 pixels at 0.5 µm/px.
    progress : bool, keyword-only
        Show a progress bar over slides.

    Returns
    -------
    Path
        ``root``.

    Notes
    -----
    Side effects: builds the folder (layout in the module docstring) under a temporary name
    beside ``root`` and renames it into place. The same arguments give byte-identical files.
    """
    root = Path(root)
    started = time.perf_counter()
    plans = plan_toy_slides(kind, n_slides, seed, n_sites=n_sites)
    _check_patch_px(patch_px)
    with atomic_path(root, is_dir=True) as folder:
        (folder / "wsi").mkdir()
        site_tables = []
        for plan in track(plans, description=f"Toy {kind} cohort", disable=not progress):
            site_tables.append(_write_slide(folder, plan, kind, seed, n_sites, patch_px))
        write_tsv(pd.concat(site_tables, ignore_index=True), folder / "sites.tsv")
        slides = _slide_table(plans)
        write_tsv(slides[["patient_id", "disease"]], folder / "clinical.tsv")
        write_tsv(slides.drop(columns="disease"), folder / "slides.tsv")
        images = pd.DataFrame(
            {
                "patient_id": [p.slide_id for p in plans],
                "modality": "WSI",
                "path": [f"wsi/{p.slide_id}.svs" for p in plans],
            }
        )
        write_tsv(images, folder / "images.tsv")
        settings = {
            "kind": kind,
            "n_slides": int(n_slides),
            "n_sites": int(n_sites),
            "patch_px": int(patch_px),
        }
        write_json(_provenance(settings, int(seed), plans), folder / "cohort.json")
    logger.info(
        "wrote toy %s cohort %s: %d slides (%d positive) in %.1f s",
        kind,
        root,
        len(plans),
        sum(p.label == "positive" for p in plans),
        time.perf_counter() - started,
    )
    return root


def _write_slide(
    folder: Path, plan: ToySlidePlan, kind: str, seed: int, n_sites: int, patch_px: int
) -> pd.DataFrame:
    """Render and write one slide's SVS; return its rows of ``sites.tsv``."""
    image, sites = render_toy_slide(
        kind,
        plan.positive_sites,
        stream_rng(seed, _SLIDE, plan.index),
        positive_anomaly=plan.anomaly if plan.positive_sites else None,
        n_sites=n_sites,
        patch_px=patch_px,
    )
    write_svs(
        folder / "wsi" / f"{plan.slide_id}.svs",
        image,
        mpp=MPP,
        objective_power=OBJECTIVE_POWER,
        n_levels=SVS_LEVELS,
        downsample=SVS_DOWNSAMPLE,
        tile_px=SVS_TILE_PX,
        jpeg_quality=SVS_JPEG_QUALITY,
    )
    sites.insert(0, "patient_id", plan.slide_id)
    return sites


def _slide_table(plans: list[ToySlidePlan]) -> pd.DataFrame:
    """One row per slide: its label (as ``disease`` for the manifest) and its design."""
    return pd.DataFrame(
        {
            "patient_id": [p.slide_id for p in plans],
            "label": [p.label for p in plans],
            "disease": [p.label for p in plans],
            "anomaly": [p.anomaly for p in plans],
            "n_positive_sites": [len(p.positive_sites) for p in plans],
        }
    )


def _provenance(settings: dict[str, Any], seed: int, plans: list[ToySlidePlan]) -> dict:
    return {
        "mmdiag_version": mmdiag.__version__,
        "generator": "mmdiag.synth.toy_mil.write_toy_cohort",
        "seed": seed,
        "settings": settings,
        "slide": {
            "mpp": MPP,
            "objective_power": OBJECTIVE_POWER,
            "n_levels": SVS_LEVELS,
            "downsample": SVS_DOWNSAMPLE,
            "tile_px": SVS_TILE_PX,
            "jpeg_quality": SVS_JPEG_QUALITY,
        },
        "design": {
            "micro": "positive sites carry 5-9 white crosses (bars 10-14 px x 2 px): 20x only",
            "macro": "sites centred in a circle (negative) or an equal-area ellipse "
            "(axis ratio 1.8-2.2, positive) drawn in desaturated tissue: 5x only",
            "mixed": "shapes around every site; positive slides carry micro or macro sites",
            "positive_sites_per_positive_slide": [1, MAX_POSITIVE_SITES],
        },
        "slides": [
            {
                "patient_id": p.slide_id,
                "label": p.label,
                "anomaly": p.anomaly,
                "positive_sites": list(p.positive_sites),
            }
            for p in plans
        ],
    }
