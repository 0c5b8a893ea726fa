"""A seeded synthetic glioma cohort: H&E slides and gene expression per tissue sample.

Knowledge-driven Subspace Fusion (KS-Fusion) fuses the patch features of a whole-slide image
with gene expression split into a tumour-related and a tumour-microenvironment (TME) gene set,
for glioma diagnosis, grading and survival, evaluated per tissue sample (a patient may have
several) with splits by patient. This cohort plants a signal of known strength in each
modality so that such a method can be checked end to end.

Two latent programs per patient, both in ``[0, 1]``: the tumour intensity ``T`` and the TME
intensity ``E``, plus a slide-only necrosis factor ``W`` (uniform in ``[0, 1]``):

- **Diagnosis** needs both programs: the four classes of :data:`CLASSES` are the 2 x 2
  combinations of ``T`` and ``E`` high or low (:data:`CLASS_PROGRAMS`; a synthetic convention,
  not the biology of these tumours). Classes are assigned round-robin over the patients and
  shuffled by the seed (balanced). Within a class a program is uniform on
  :data:`HIGH_RANGE` (high) or :data:`LOW_RANGE` (low), so it varies continuously.
- **Grade** (:data:`GRADES`, ordinal) cuts ``T`` plus ``N(0, grade_noise)`` at
  :data:`GRADE_CUTS`.
- **Survival**: exponential event time with hazard ``BASE_HAZARD_PER_MONTH * exp(BETA_T * T +
  BETA_W * W)``, censored by a uniform follow-up on :data:`CENSOR_RANGE_MONTHS` (about 30 %
  censored); times are rounded to 0.01 months and at least :data:`MIN_TIME_MONTHS`. ``W``
  reaches the slides only, not the genes.

Each patient has ``samples_per_patient`` tissue samples (an inclusive range), each with one
slide and one expression profile; a sample's ``T``, ``E`` and ``W`` are its patient's plus
``N(0, sample_jitter)``, clipped to ``[0, 1]``.

- **Genes** (the stronger modality, ``gene_signal`` and ``gene_noise``): log-scale expression,
  a per-gene baseline plus ``N(0, gene_noise)`` per sample; each gene of the ``tumour`` set
  adds ``gene_signal * loading * T`` and each of the ``microenvironment`` set ``gene_signal *
  loading * E``, with a fixed loading per gene of size uniform on :data:`LOADING_RANGE`, a
  fraction :data:`NEGATIVE_LOADING_FRACTION` of them negative; the other genes carry noise
  only. Four further sets ``pathway_1`` ... ``pathway_4`` (:data:`N_PATHWAYS`) of
  ``pathway_size`` genes each take about half their genes from one program's set (the
  tumour set for odd, the TME set for even numbers) and the rest from all other genes, so
  that a co-attention baseline has several groups. The defaults make a linear model on the
  genes separate the four classes at about 0.9 accuracy.
- **WSI** (the weaker modality, ``wsi_noise``): the slide shows ``T + N(0, wsi_noise)`` and
  ``E + N(0, wsi_noise)`` (clipped to ``[0, 1]``, drawn per slide) on tissue covering most of
  the slide, brain-like parenchyma with sparse small glial nuclei. A **tumour region** (a
  blob of densely packed, large, dark, pleomorphic nuclei at a random place) covers the
  fraction :data:`TUMOUR_AREA_RANGE` of the tissue, growing linearly with the shown ``T``;
  **immune cells** (small round very dark lymphocytes) are scattered over the tissue with a
  density on :data:`IMMUNE_DENSITY_RANGE` growing with the shown ``E``; **necrosis** (pale
  pink, nucleus-free patches outside the tumour region) covers ``NECROSIS_MAX_FRACTION * W``
  of the tissue. Nuisance: per-slide stain (colour and brightness) jitter.

Layout written under ``root`` (the cohort-folder layout of :mod:`mmdiag.data.manifest`)::

    clinical.tsv              patient_id, disease (CLASSES), grade (GRADES), survival_months,
                              event (1 observed, 0 censored)
    images.tsv                patient_id, modality (WSI), path (relative to root)
    wsi/{sample_id}.svs       Aperio-style pyramidal SVS, one per tissue sample
    genes/expression.tsv      one row per sample: sample_id (the slide's file stem, e.g.
                              P001-1 for wsi/P001-1.svs), then one column per gene
    genes/gene_sets.gmt       tumour, microenvironment, pathway_1 ... pathway_4
    cohort.json               provenance: version, settings, seed, planted signal, per patient
                              T, E, W, class, grade, survival and its samples (with the
                              programs each sample's slide shows)

Patients are ``P001``, ``P002``, ...; their samples ``P001-1``, ``P001-2``, ...

Every random draw comes from ``numpy.random.default_rng([seed, stream, index])``
(:func:`mmdiag.synth._draw.stream_rng`), one stream per kind of draw and one index per
patient or sample, so each patient's files depend only on the seed, that patient and the
settings, and the same settings give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

import mmdiag
from mmdiag.data.manifest import ManifestRules
from mmdiag.data.tasks import Task
from mmdiag.genes import write_gmt
from mmdiag.io.atomic import atomic_path, write_json, write_tsv
from mmdiag.synth import wsi
from mmdiag.synth._draw import (
    balanced_labels,
    blend,
    impulse_blobs,
    smooth_noise,
    soft_step,
    stream_rng,
    to_uint8,
)
from mmdiag.synth.tables import gene_names

__all__ = [
    "CLASSES",
    "CLASS_PROGRAMS",
    "GRADES",
    "GliomaSettings",
    "draw_gene_design",
    "make_expression",
    "manifest_rules",
    "plan_classes",
    "plan_patients",
    "plan_samples",
    "render_glioma_slide",
    "render_sample_slide",
    "write_glioma_cohort",
]

log = logging.getLogger(__name__)

#: The diagnosis classes, in the cohort's fixed class order.
CLASSES = ("astrocytoma", "oligodendroglioma", "glioblastoma", "diffuse_midline")
#: Whether each class has the tumour (``T``) and TME (``E``) program high: a synthetic
#: convention that makes the diagnosis need both programs.
CLASS_PROGRAMS = {
    "astrocytoma": {"T": "low", "E": "low"},
    "oligodendroglioma": {"T": "low", "E": "high"},
    "glioblastoma": {"T": "high", "E": "high"},
    "diffuse_midline": {"T": "high", "E": "low"},
}
#: A program's intensity within a class: uniform on one of these ranges.
LOW_RANGE, HIGH_RANGE = (0.0, 0.45), (0.55, 1.0)
#: The ordinal grades, lowest first, and the cut points on ``T + N(0, grade_noise)``.
GRADES = ("G2", "G3", "G4")
GRADE_CUTS = (0.3, 0.7)
#: Survival: hazard per month ``BASE_HAZARD_PER_MONTH * exp(BETA_T * T + BETA_W * W)``.
BASE_HAZARD_PER_MONTH = 1.0 / 120.0
BETA_T, BETA_W = 2.5, 1.0
CENSOR_RANGE_MONTHS = (8.0, 56.0)
MIN_TIME_MONTHS = 0.1
#: Size of a program gene's loading (uniform) and the fraction of negative loadings.
LOADING_RANGE = (0.6, 1.0)
NEGATIVE_LOADING_FRACTION = 0.3
#: Per-gene log-expression baseline: normal with this mean and standard deviation.
BASELINE_MEAN, BASELINE_SD = 6.0, 1.5
N_PATHWAYS = 4
#: Fraction of the tissue the tumour region covers at a shown ``T`` of 0 and of 1.
TUMOUR_AREA_RANGE = (0.04, 0.40)
#: Lymphocytes per (12 µm)² of tissue at a shown ``E`` of 0 and of 1.
IMMUNE_DENSITY_RANGE = (0.02, 0.40)
#: Fraction of the tissue that is necrotic at ``W = 1``.
NECROSIS_MAX_FRACTION = 0.3
#: Nuclei per (12 µm)² and Gaussian radius (µm) of the glial background and the tumour.
GLIAL_DENSITY, GLIAL_SIGMA_UM = 0.35, 1.2
TUMOUR_DENSITY, TUMOUR_SIGMA_UM = 2.4, (1.8, 2.6)
LYMPHOCYTE_SIGMA_UM = 0.9
SIGNAL_DESCRIPTION = {
    "diagnosis": "the 2 x 2 combinations of T and E high or low (CLASS_PROGRAMS)",
    "grade": "T + N(0, grade_noise) cut at GRADE_CUTS",
    "survival": (
        "exponential time, hazard BASE_HAZARD_PER_MONTH * exp(BETA_T * T + BETA_W * W), "
        "uniform censoring on CENSOR_RANGE_MONTHS; W (necrosis) is on the slides only"
    ),
    "genes": (
        "tumour set shifts by gene_signal * loading * T, microenvironment set by "
        "gene_signal * loading * E, N(0, gene_noise) per sample on every gene"
    ),
    "WSI": (
        "tumour region of dense large dark nuclei, area growing with T; scattered "
        "lymphocytes, density growing with E; pale nucleus-free necrosis, area from W; the "
        "slide shows T and E plus N(0, wsi_noise); per-slide stain jitter"
    ),
}

_NUCLEUS_SPACING_UM = 12.0
_DRAW_SCALE = 2
_MAX_SAMPLES = 9
_BACKGROUND_RGB = (246.0, 246.0, 244.0)
_PARENCHYMA_RGB, _LIGHT_PARENCHYMA_RGB = (226.0, 160.0, 196.0), (240.0, 196.0, 218.0)
_NECROSIS_RGB = (247.0, 219.0, 230.0)
_GLIAL_RGB, _TUMOUR_RGB, _LYMPHOCYTE_RGB = (
    (120.0, 80.0, 160.0),
    (88.0, 46.0, 126.0),
    (34.0, 14.0, 58.0),
)
_FLOAT_FIELDS = (
    "gene_signal",
    "gene_noise",
    "wsi_noise",
    "sample_jitter",
    "grade_noise",
    "mpp",
    "objective_power",
)
# Random streams: one independent generator per (stream, patient or sample).
_ASSIGNMENT, _PATIENT, _SAMPLE, _DESIGN, _EXPRESSION, _WSI = range(6)


@dataclass(frozen=True)
class GliomaSettings:
    """What :func:`write_glioma_cohort` writes; the defaults make a small demo cohort.

    Attributes
    ----------
    n_patients
        Patients, at least one per class; classes are assigned round-robin (balanced).
    seed
        Seed of every random draw.
    samples_per_patient
        Inclusive range ``(low, high)`` of tissue samples per patient, ``1 <= low <= high <=
        9``; each sample has one slide and one expression profile.
    n_genes, tumour_genes, microenvironment_genes
        Genes in the table and the sizes of the (disjoint) tumour and TME sets; the rest
        are background genes.
    pathway_size
        Genes in each of the :data:`N_PATHWAYS` pathway sets.
    gene_signal, gene_noise
        Scale of the program shift of a set gene (per unit of loading and of program) and
        the standard deviation of the per-sample expression noise (log scale).
    wsi_noise
        Standard deviation of the noise on the ``T`` and ``E`` a slide shows.
    sample_jitter
        Standard deviation of a sample's ``T``, ``E`` and ``W`` around its patient's.
    grade_noise
        Standard deviation of the noise on ``T`` before the grade cut.
    slide_px, mpp, objective_power
        Level-0 side of the (square) slide, micrometres per pixel and objective power.
    n_levels, downsample, tile_px, jpeg_quality
        SVS pyramid levels, the factor between them, tile side and JPEG quality.
    """

    n_patients: int = 40
    seed: int = 0
    samples_per_patient: tuple[int, int] = (1, 2)
    n_genes: int = 120
    tumour_genes: int = 30
    microenvironment_genes: int = 60
    pathway_size: int = 15
    gene_signal: float = 2.0
    gene_noise: float = 0.5
    wsi_noise: float = 0.2
    sample_jitter: float = 0.03
    grade_noise: float = 0.05
    slide_px: int = 1536
    mpp: float = 0.5
    objective_power: float = 20.0
    n_levels: int = 3
    downsample: int = 4
    tile_px: int = 256
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        """Reject settings that cannot give a valid cohort, naming the setting.

        Numbers are normalised to the fields' types (``20`` to ``20.0``, lists to tuples),
        so a setting spelt either way gives the same cohort, ``cohort.json`` included.
        """
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(
            self, "samples_per_patient", tuple(int(n) for n in self.samples_per_patient)
        )
        if self.n_patients < len(CLASSES):
            raise ValueError(f"n_patients must be >= {len(CLASSES)}, got {self.n_patients}")
        low_high = self.samples_per_patient
        if len(low_high) != 2 or not 1 <= low_high[0] <= low_high[1] <= _MAX_SAMPLES:
            raise ValueError(
                f"samples_per_patient must be (low, high) with 1 <= low <= high <= "
                f"{_MAX_SAMPLES}, got {self.samples_per_patient}"
            )
        if min(self.tumour_genes, self.microenvironment_genes) < 1:
            raise ValueError(
                "tumour_genes and microenvironment_genes must be >= 1, got "
                f"{self.tumour_genes}, {self.microenvironment_genes}"
            )
        if self.tumour_genes + self.microenvironment_genes > self.n_genes:
            raise ValueError(
                "tumour_genes + microenvironment_genes must not exceed n_genes, got "
                f"{self.tumour_genes} + {self.microenvironment_genes} > {self.n_genes}"
            )
        if not 2 <= self.pathway_size <= self.n_genes:
            raise ValueError(f"pathway_size must be in [2, n_genes], got {self.pathway_size}")
        if self.gene_signal < 0:
            raise ValueError(f"gene_signal must be >= 0, got {self.gene_signal}")
        for name in ("gene_noise", "wsi_noise", "sample_jitter", "grade_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.slide_px < 64 or self.mpp <= 0:
            raise ValueError(f"need slide_px >= 64 and mpp > 0, got {self.slide_px}, {self.mpp}")


def plan_classes(settings: GliomaSettings) -> list[str]:
    """Class of each patient: round-robin over :data:`CLASSES`, shuffled by the seed.

    Counts per class differ by at most one; the shuffle keeps the patient order from
    revealing the class.
    """
    return balanced_labels(CLASSES, settings.n_patients, stream_rng(settings.seed, _ASSIGNMENT))


def _grade(tumour: float) -> str:
    return GRADES[int(np.searchsorted(GRADE_CUTS, tumour, side="right"))]


def plan_patients(settings: GliomaSettings) -> list[dict[str, Any]]:
    """Per patient: id, class, ``T``, ``E``, ``W``, grade, survival and number of samples.

    The draws per patient are fixed in number, so one patient's values do not depend on
    the others'.
    """
    width = max(3, len(str(settings.n_patients)))
    patients = []
    for index, disease in enumerate(plan_classes(settings)):
        rng = stream_rng(settings.seed, _PATIENT, index)
        programs = CLASS_PROGRAMS[disease]
        tumour = rng.uniform(*(HIGH_RANGE if programs["T"] == "high" else LOW_RANGE))
        tme = rng.uniform(*(HIGH_RANGE if programs["E"] == "high" else LOW_RANGE))
        necrosis = rng.uniform(0.0, 1.0)
        grade = _grade(tumour + rng.normal(0.0, settings.grade_noise))
        hazard = BASE_HAZARD_PER_MONTH * np.exp(BETA_T * tumour + BETA_W * necrosis)
        event_time = rng.exponential(1.0 / hazard)
        censor_time = rng.uniform(*CENSOR_RANGE_MONTHS)
        n_samples = int(
            rng.integers(settings.samples_per_patient[0], settings.samples_per_patient[1] + 1)
        )
        months = max(round(float(min(event_time, censor_time)), 2), MIN_TIME_MONTHS)
        patients.append(
            {
                "patient_id": f"P{index + 1:0{width}d}",
                "disease": disease,
                "T": float(tumour),
                "E": float(tme),
                "W": float(necrosis),
                "grade": grade,
                "survival_months": months,
                "event": int(event_time <= censor_time),
                "n_samples": n_samples,
            }
        )
    return patients


def plan_samples(settings: GliomaSettings, patients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tissue sample: id, patient, its ``T``, ``E``, ``W`` (patient's plus jitter) and
    the ``T`` and ``E`` its slide shows (plus ``N(0, wsi_noise)``), all clipped to [0, 1]."""
    samples = []
    for index, patient in enumerate(patients):
        for number in range(1, patient["n_samples"] + 1):
            rng = stream_rng(settings.seed, _SAMPLE, index * (_MAX_SAMPLES + 1) + number)
            jitter = rng.normal(0.0, settings.sample_jitter, 3)
            shown = rng.normal(0.0, settings.wsi_noise, 2)
            values = np.clip(
                [patient["T"] + jitter[0], patient["E"] + jitter[1], patient["W"] + jitter[2]],
                0.0,
                1.0,
            )
            samples.append(
                {
                    "sample_id": f"{patient['patient_id']}-{number}",
                    "patient_id": patient["patient_id"],
                    "patient_index": index,
                    "number": number,
                    "T": float(values[0]),
                    "E": float(values[1]),
                    "W": float(values[2]),
                    "wsi_T": float(np.clip(values[0] + shown[0], 0.0, 1.0)),
                    "wsi_E": float(np.clip(values[1] + shown[1], 0.0, 1.0)),
                }
            )
    return samples


def draw_gene_design(settings: GliomaSettings) -> dict[str, Any]:
    """The cohort's gene design: names, baselines, loadings and gene sets.

    Returns ``{"genes", "baseline", "loading", "gene_sets"}``: the gene names
    (``GENE0001``, ...), the per-gene baseline, the per-gene loading (zero outside the two
    program sets) and the gene sets by name (``tumour``, ``microenvironment``, then the
    pathways), each in gene order.
    """
    rng = stream_rng(settings.seed, _DESIGN)
    names = gene_names(settings.n_genes)
    order = rng.permutation(settings.n_genes)
    tumour = np.sort(order[: settings.tumour_genes])
    tme_end = settings.tumour_genes + settings.microenvironment_genes
    tme = np.sort(order[settings.tumour_genes : tme_end])
    baseline = rng.normal(BASELINE_MEAN, BASELINE_SD, settings.n_genes)
    size = rng.uniform(*LOADING_RANGE, settings.n_genes)
    sign = np.where(rng.uniform(size=settings.n_genes) < NEGATIVE_LOADING_FRACTION, -1.0, 1.0)
    loading = np.zeros(settings.n_genes)
    programs = np.concatenate([tumour, tme])
    loading[programs] = (size * sign)[programs]
    gene_sets = {
        "tumour": [names[i] for i in tumour],
        "microenvironment": [names[i] for i in tme],
    }
    for number in range(1, N_PATHWAYS + 1):
        source = tumour if number % 2 else tme
        n_from = min(len(source), (settings.pathway_size + 1) // 2)
        picked = rng.choice(source, n_from, replace=False)
        others = np.setdiff1d(np.arange(settings.n_genes), picked)
        rest = rng.choice(others, settings.pathway_size - n_from, replace=False)
        gene_sets[f"pathway_{number}"] = [names[i] for i in np.sort(np.concatenate([picked, rest]))]
    return {"genes": names, "baseline": baseline, "loading": loading, "gene_sets": gene_sets}


def make_expression(
    settings: GliomaSettings, samples: list[dict[str, Any]], design: dict[str, Any]
) -> pd.DataFrame:
    """The log-expression table: column ``sample_id``, then one column per gene.

    Each sample's noise comes from its own stream, so a sample's profile does not depend on
    the other samples.
    """
    n_genes = settings.n_genes
    genes = design["genes"]
    column = {name: i for i, name in enumerate(genes)}
    tumour = np.zeros(n_genes, bool)
    tumour[[column[g] for g in design["gene_sets"]["tumour"]]] = True
    tme = np.zeros(n_genes, bool)
    tme[[column[g] for g in design["gene_sets"]["microenvironment"]]] = True
    rows = []
    for sample in samples:
        index = sample["patient_index"] * (_MAX_SAMPLES + 1) + sample["number"]
        rng = stream_rng(settings.seed, _EXPRESSION, index)
        program = np.where(tumour, sample["T"], 0.0) + np.where(tme, sample["E"], 0.0)
        values = (
            design["baseline"]
            + settings.gene_signal * design["loading"] * program
            + rng.normal(0.0, settings.gene_noise, n_genes)
        )
        rows.append(values)
    frame = pd.DataFrame(np.round(np.asarray(rows).reshape(-1, n_genes), 4), columns=genes)
    frame.insert(0, "sample_id", [s["sample_id"] for s in samples])
    return frame


def manifest_rules(min_slide_px: int = 256) -> ManifestRules:
    """Manifest rules this cohort satisfies: the classes of :data:`CLASSES`, WSI required,
    ``grade`` an ordinal task.

    The config equivalent is ``classes: [astrocytoma, oligodendroglioma, glioblastoma,
    diffuse_midline]``, ``required_modalities: [WSI]``, ``min_image_px: {WSI: 256}`` and
    ``tasks: {grade: {classes: [G2, G3, G4], ordinal: true, required: true}}``.
    """
    return ManifestRules(
        classes=CLASSES,
        required_modalities=("WSI",),
        min_image_px={"WSI": min_slide_px},
        tasks=(Task("grade", "grade", GRADES, ordinal=True, required=True),),
    )


def render_glioma_slide(
    rng: np.random.Generator,
    size_px: int,
    *,
    mpp: float,
    tumour: float,
    tme: float,
    necrosis: float,
) -> np.ndarray:
    """Render one square H&E-like slide, uint8 ``(size_px, size_px, 3)``.

    ``tumour``, ``tme`` and ``necrosis`` in ``[0, 1]`` set the tumour-region area, the
    lymphocyte density and the necrotic area (see the module docstring). Drawn at
    ``1/_DRAW_SCALE`` of the pixel size and enlarged bilinearly, as
    :func:`mmdiag.synth.radpath.render_radpath_slide` does.
    """
    for name, value in (("tumour", tumour), ("tme", tme), ("necrosis", necrosis)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    draw_px = max(size_px // _DRAW_SCALE, 32)
    small = _draw_slide(
        rng, draw_px, mpp=mpp * size_px / draw_px, tumour=tumour, tme=tme, necrosis=necrosis
    )
    return np.asarray(Image.fromarray(small).resize((size_px, size_px), Image.BILINEAR))


def _scatter(rng, size_px, n, where):
    """``n`` uniform candidate points; those where ``where`` (a bool image) holds."""
    ys, xs = rng.uniform(0, size_px - 1, (2, n))
    keep = where[ys.astype(np.int64), xs.astype(np.int64)]
    return ys[keep], xs[keep]


def _count(density: float, size_px: int, mpp: float) -> int:
    """Points at ``density`` per (12 µm)² over the whole ``size_px``² image."""
    return int(density * (size_px * mpp) ** 2 / _NUCLEUS_SPACING_UM**2)


def _draw_slide(
    rng: np.random.Generator,
    size_px: int,
    *,
    mpp: float,
    tumour: float,
    tme: float,
    necrosis: float,
) -> np.ndarray:
    """The slide of :func:`render_glioma_slide` drawn at ``size_px`` and ``mpp``."""
    stain = rng.uniform(0.92, 1.08, 3)
    brightness = rng.uniform(0.97, 1.03)
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32) / np.float32(size_px)
    centre = rng.uniform(0.48, 0.52, 2)
    semi = rng.uniform(0.44, 0.48, 2)
    radius = np.sqrt(((xx - centre[0]) / semi[0]) ** 2 + ((yy - centre[1]) / semi[1]) ** 2)
    rim = 1.0 - radius + 0.06 * smooth_noise(rng, size_px, size_px, size_px / 8)
    border = np.minimum(np.minimum(xx, 1 - xx), np.minimum(yy, 1 - yy))
    tissue = soft_step(-rim, 0.01) * soft_step(0.015 - border, 0.004)
    inside = tissue > 0.5
    tissue_area = max(float(inside.mean()), 1e-6)

    # Tumour region: a rough blob of the area fraction TUMOUR_AREA_RANGE gives, kept inside.
    area = TUMOUR_AREA_RANGE[0] + (TUMOUR_AREA_RANGE[1] - TUMOUR_AREA_RANGE[0]) * tumour
    blob_r = float(np.sqrt(area * tissue_area / np.pi))
    reach = np.maximum(semi - blob_r - 0.03, 0.0)
    blob_c = centre + rng.uniform(-1.0, 1.0, 2) * reach / np.sqrt(2.0)
    blob_d = np.sqrt((xx - blob_c[0]) ** 2 + (yy - blob_c[1]) ** 2) / blob_r
    blob_d += 0.12 * smooth_noise(rng, size_px, size_px, size_px / 10)
    region = soft_step(blob_d - 1.0, 0.02) * tissue
    in_region = region > 0.5

    # Necrosis: the highest values of a smooth field outside the tumour region.
    field = smooth_noise(rng, size_px, size_px, size_px / 6)
    candidates = inside & ~in_region
    necrotic_fraction = NECROSIS_MAX_FRACTION * necrosis * tissue_area
    if necrotic_fraction > 0 and candidates.any():
        share = min(necrotic_fraction / max(float(candidates.mean()), 1e-6), 1.0)
        level = np.quantile(field[candidates], 1.0 - share)
        dead = soft_step(level - field, 0.05) * candidates
    else:
        dead = np.zeros_like(tissue)
    alive = inside & (dead < 0.5)

    image = np.empty((size_px, size_px, 3), np.float32)
    image[:] = _PARENCHYMA_RGB
    fibres = smooth_noise(rng, size_px, size_px, max(5.0 / mpp, 2.0))
    blend(image, _LIGHT_PARENCHYMA_RGB, soft_step(-fibres, 0.3) * 0.7)
    blend(image, _NECROSIS_RGB, dead)

    glial = _scatter(rng, size_px, _count(GLIAL_DENSITY, size_px, mpp), alive & ~in_region)
    blobs = impulse_blobs((size_px, size_px), *glial, max(GLIAL_SIGMA_UM / mpp, 0.6))
    blend(image, np.clip(np.array(_GLIAL_RGB) * stain, 0, 255), np.clip(1.5 * blobs, 0, 0.9))

    nuclei = np.zeros_like(tissue)
    n_tumour = _count(TUMOUR_DENSITY, size_px, mpp)
    for sigma_um in TUMOUR_SIGMA_UM:  # two nucleus sizes: pleomorphism
        ys, xs = _scatter(rng, size_px, n_tumour // 2, in_region & (dead < 0.5))
        weights = rng.uniform(0.9, 1.5, len(ys))
        nuclei += impulse_blobs((size_px, size_px), ys, xs, max(sigma_um / mpp, 0.7), weights)
    blend(image, np.clip(np.array(_TUMOUR_RGB) * stain, 0, 255), np.clip(1.6 * nuclei, 0, 0.95))

    density = IMMUNE_DENSITY_RANGE[0] + (IMMUNE_DENSITY_RANGE[1] - IMMUNE_DENSITY_RANGE[0]) * tme
    ys, xs = _scatter(rng, size_px, _count(density, size_px, mpp), alive)
    cells = impulse_blobs((size_px, size_px), ys, xs, max(LYMPHOCYTE_SIGMA_UM / mpp, 0.6))
    blend(image, np.clip(np.array(_LYMPHOCYTE_RGB) * stain, 0, 255), np.clip(2.0 * cells, 0, 0.97))

    image *= np.float32(brightness)
    slide = np.empty_like(image)
    slide[:] = _BACKGROUND_RGB
    blend(slide, 0.0, tissue)
    slide += image * tissue[..., None]
    slide += rng.normal(0.0, 2.0, (size_px, size_px, 1)).astype(np.float32)
    return to_uint8(slide)


def render_sample_slide(settings: GliomaSettings, sample: dict[str, Any]) -> np.ndarray:
    """Level-0 pixels of one sample's slide (a row of :func:`plan_samples`)."""
    index = sample["patient_index"] * (_MAX_SAMPLES + 1) + sample["number"]
    return render_glioma_slide(
        stream_rng(settings.seed, _WSI, index),
        settings.slide_px,
        mpp=settings.mpp,
        tumour=sample["wsi_T"],
        tme=sample["wsi_E"],
        necrosis=sample["W"],
    )


def write_glioma_cohort(root: str | Path, settings: GliomaSettings | None = None) -> Path:
    """Write the synthetic glioma cohort folder at ``root`` and return ``root``.

    Parameters
    ----------
    root : path
        Cohort folder to create; an existing folder is replaced only once the new one is
        complete.
    settings : GliomaSettings, optional
        Cohort size, seed, planted-signal knobs and slide geometry (default: the demo
        settings).

    Returns
    -------
    Path
        ``root``, laid out as the module docstring describes.

    Notes
    -----
    Side effects: builds the cohort in a temporary folder beside ``root`` and renames it into
    place (:func:`mmdiag.io.atomic.atomic_path`), so a failure leaves no half-written cohort.
    The same settings give byte-identical files.
    """
    settings = settings or GliomaSettings()
    root, started = Path(root), time.perf_counter()
    patients = plan_patients(settings)
    samples = plan_samples(settings, patients)
    design = draw_gene_design(settings)
    images = []
    with atomic_path(root, is_dir=True) as folder:
        (folder / "wsi").mkdir()
        (folder / "genes").mkdir()
        for sample in samples:
            relative = f"wsi/{sample['sample_id']}.svs"
            wsi.write_svs(
                folder / relative,
                render_sample_slide(settings, sample),
                mpp=settings.mpp,
                objective_power=settings.objective_power,
                n_levels=settings.n_levels,
                downsample=settings.downsample,
                tile_px=settings.tile_px,
                jpeg_quality=settings.jpeg_quality,
            )
            images.append({"patient_id": sample["patient_id"], "modality": "WSI", "path": relative})
        clinical = pd.DataFrame(patients)[
            ["patient_id", "disease", "grade", "survival_months", "event"]
        ]
        write_tsv(clinical, folder / "clinical.tsv")
        write_tsv(pd.DataFrame(images), folder / "images.tsv")
        write_tsv(make_expression(settings, samples, design), folder / "genes/expression.tsv")
        write_gmt(design["gene_sets"], folder / "genes/gene_sets.gmt", descriptions=_SET_TEXT)
        write_json(_provenance(settings, patients, samples), folder / "cohort.json")
    log.info(
        "wrote glioma cohort %s: %d patients, %d samples in %.1f s",
        root,
        len(patients),
        len(samples),
        time.perf_counter() - started,
    )
    return root


_SET_TEXT = {
    "tumour": "tumour-related genes, shifted by the tumour program T",
    "microenvironment": "tumour-microenvironment genes, shifted by the TME program E",
    **{
        f"pathway_{n}": (
            f"pathway {n}: half {'tumour' if n % 2 else 'microenvironment'} genes, "
            "half any other genes"
        )
        for n in range(1, N_PATHWAYS + 1)
    },
}


def _provenance(
    settings: GliomaSettings,
    patients: list[dict[str, Any]],
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_patient.setdefault(sample["patient_id"], []).append(
            {
                "sample_id": sample["sample_id"],
                **{key: round(sample[key], 6) for key in ("T", "E", "W", "wsi_T", "wsi_E")},
            }
        )
    return {
        "mmdiag_version": mmdiag.__version__,
        "generator": "mmdiag.synth.glioma.write_glioma_cohort",
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "classes": list(CLASSES),
        "grades": list(GRADES),
        "planted_signal": {
            "description": SIGNAL_DESCRIPTION,
            "class_programs": CLASS_PROGRAMS,
            "low_range": list(LOW_RANGE),
            "high_range": list(HIGH_RANGE),
            "grade_cuts": list(GRADE_CUTS),
            "base_hazard_per_month": BASE_HAZARD_PER_MONTH,
            "beta_t": BETA_T,
            "beta_w": BETA_W,
            "censor_range_months": list(CENSOR_RANGE_MONTHS),
            "loading_range": list(LOADING_RANGE),
            "negative_loading_fraction": NEGATIVE_LOADING_FRACTION,
            "tumour_area_range": list(TUMOUR_AREA_RANGE),
            "immune_density_range": list(IMMUNE_DENSITY_RANGE),
            "necrosis_max_fraction": NECROSIS_MAX_FRACTION,
        },
        "patients": [
            {
                "patient_id": p["patient_id"],
                "disease": p["disease"],
                "grade": p["grade"],
                **{key: round(p[key], 6) for key in ("T", "E", "W")},
                "survival_months": p["survival_months"],
                "event": p["event"],
                "samples": by_patient[p["patient_id"]],
            }
            for p in patients
        ],
    }
