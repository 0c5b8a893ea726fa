"""Write a complete, seeded synthetic demo cohort folder.

Layout written under ``root`` (read by the manifest builder)::

    clinical.tsv        patient_id, disease, mn_stage, survival_months, event
    images.tsv          patient_id, modality (OM|IM|TEM|WSI|CT), path (relative to root)
    om/{pid}.jpg        PASM-like optical micrograph (RGB JPEG)
    im/{pid}.jpg        immunofluorescence micrograph (RGB JPEG)
    tem/{pid}_{i:02d}.tif   8-bit TEM image with a legend strip at the bottom
    wsi/{pid}.svs       Aperio-style pyramidal SVS (first ``wsi.n_patients`` patients)
    ct/{pid}.nii.gz     NIfTI CT volume, int16 HU (first ``ct.n_patients`` patients)
    genes/expression.tsv, genes/gene_sets.gmt
    cohort.json         provenance: version, settings, seed, planted signal, shown patterns

Every random draw comes from ``numpy.random.default_rng([seed, stream, patient])``, so
each patient's images depend only on the seed and that patient, and the same settings
give byte-identical files.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from rich.progress import track

import mmdiag
from mmdiag.io.atomic import atomic_path, write_json, write_tsv
from mmdiag.synth import renal, tables, volumes, wsi
from mmdiag.synth._draw import stream_rng

logger = logging.getLogger(__name__)

MODALITIES = ("OM", "IM", "TEM", "WSI", "CT")
MICROGRAPH_JPEG_QUALITY = 92

# Random streams: one independent generator per (stream, patient).
_ASSIGNMENT, _PATIENT, _OM, _IM, _TEM, _WSI, _CT, _GENES, _CLINICAL = range(9)


@dataclass(frozen=True)
class PatientPlan:
    """What one synthetic patient is, and which class pattern each modality shows."""

    index: int
    patient_id: str
    disease: str
    mn_stage: str  # "" unless disease == "MN"
    tem_stage: str  # stage of MN-type deposits wherever TEM shows them
    n_tem: int
    shown: dict[str, str] = field(default_factory=dict)


def plan_patients(settings: dict[str, Any]) -> list[PatientPlan]:
    """Assign diseases (balanced round-robin, shuffled), stages and shown patterns."""
    seed, n_patients = int(settings["seed"]), int(settings["n_patients"])
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    tem_low, tem_high = (int(n) for n in settings["tem_per_patient"])
    if not 1 <= tem_low <= tem_high:
        raise ValueError(f"tem_per_patient must be 1 <= low <= high, got {[tem_low, tem_high]}")
    reliability = settings["modality_reliability"]
    diseases = [renal.DISEASES[i % len(renal.DISEASES)] for i in range(n_patients)]
    diseases = [diseases[i] for i in stream_rng(seed, _ASSIGNMENT).permutation(n_patients)]
    width = max(3, len(str(n_patients)))

    plans = []
    for index, disease in enumerate(diseases):
        rng = stream_rng(seed, _PATIENT, index)
        stage = renal.MN_STAGES[int(rng.integers(len(renal.MN_STAGES)))]
        shown = {
            modality: renal.draw_shown_pattern(rng, disease, float(reliability[modality]))
            for modality in ("OM", "IM", "TEM")
        }
        plans.append(
            PatientPlan(
                index=index,
                patient_id=f"P{index + 1:0{width}d}",
                disease=disease,
                mn_stage=stage if disease == "MN" else "",
                tem_stage=stage,
                n_tem=int(rng.integers(tem_low, tem_high + 1)),
                shown=shown,
            )
        )
    return plans


def _save_jpeg(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels, mode="RGB").save(
        path, format="JPEG", quality=MICROGRAPH_JPEG_QUALITY, optimize=False
    )


def _write_patient(folder: Path, plan: PatientPlan, settings: dict[str, Any]) -> list[dict]:
    """Render and write every image of one patient; return their ``images.tsv`` rows."""
    seed, pid, index = int(settings["seed"]), plan.patient_id, plan.index
    rows: list[dict] = []

    def add(modality: str, relative: str) -> Path:
        rows.append({"patient_id": pid, "modality": modality, "path": relative})
        return folder / relative

    om_w, om_h = (int(n) for n in settings["om_size_px"])
    om = renal.render_om(stream_rng(seed, _OM, index), plan.shown["OM"], om_w, om_h)
    _save_jpeg(add("OM", f"om/{pid}.jpg"), om)

    im_w, im_h = (int(n) for n in settings["im_size_px"])
    im = renal.render_im(stream_rng(seed, _IM, index), plan.shown["IM"], im_w, im_h)
    _save_jpeg(add("IM", f"im/{pid}.jpg"), im)

    tem_rng = stream_rng(seed, _TEM, index)
    for number in range(1, plan.n_tem + 1):
        tem = renal.render_tem(
            tem_rng,
            plan.shown["TEM"],
            int(settings["tem_size_px"]),
            int(settings["tem_legend_px"]),
            mn_stage=plan.tem_stage,
        )
        tifffile.imwrite(
            add("TEM", f"tem/{pid}_{number:02d}.tif"),
            tem,
            photometric="minisblack",
            compression="zlib",
            metadata=None,
        )

    slide = settings["wsi"]
    if index < int(slide["n_patients"]):
        mpp = float(slide["mpp"])
        pixels = wsi.render_wsi(
            stream_rng(seed, _WSI, index),
            int(slide["width_px"]),
            int(slide["height_px"]),
            mpp=mpp,
            disease=plan.disease,
        )
        wsi.write_svs(
            add("WSI", f"wsi/{pid}.svs"),
            pixels,
            mpp=mpp,
            objective_power=float(slide["objective_power"]),
            n_levels=int(slide["n_levels"]),
            downsample=int(slide["downsample"]),
            tile_px=int(slide["tile_px"]),
            jpeg_quality=int(slide["jpeg_quality"]),
        )

    ct = settings["ct"]
    if index < int(ct["n_patients"]):
        volume, _ = volumes.render_ct(
            stream_rng(seed, _CT, index), ct["shape_vox"], ct["spacing_mm"], disease=plan.disease
        )
        volumes.write_nifti(add("CT", f"ct/{pid}.nii.gz"), volume, ct["spacing_mm"])
    return rows


def write_synthetic_cohort(root: Path, settings: dict, *, progress: bool = True) -> Path:
    """Write a complete synthetic cohort folder at ``root`` and return ``root``.

    Parameters
    ----------
    root : Path
        Cohort folder to create; an existing folder is replaced only once the new one is
        complete.
    settings : dict
        Validated synthetic-cohort settings (``seed``, ``n_patients``, image sizes,
        ``modality_reliability``, ``wsi``, ``ct``, ``genes``); see ``config/config.yaml``.
    progress : bool, keyword-only
        Show a progress bar over patients.

    Returns
    -------
    Path
        ``root``.

    Notes
    -----
    Side effects: builds the cohort in a temporary folder beside ``root`` and renames it
    into place, so a failure leaves no half-written cohort. Same settings give
    byte-identical files. The planted class signal is described in
    :mod:`mmdiag.synth.renal` and recorded in ``cohort.json``.
    """
    root = Path(root)
    started = time.perf_counter()
    seed = int(settings["seed"])
    plans = plan_patients(settings)
    with atomic_path(root, is_dir=True) as folder:
        for sub in ("om", "im", "tem", "wsi", "ct", "genes"):
            (folder / sub).mkdir()
        rows: list[dict] = []
        for plan in track(
            plans, description="Synthetic cohort", total=len(plans), disable=not progress
        ):
            rows.extend(_write_patient(folder, plan, settings))
        images = pd.DataFrame(rows, columns=["patient_id", "modality", "path"])
        write_tsv(images, folder / "images.tsv")

        gene_settings = settings["genes"]
        n_genes = int(gene_settings["n_genes"])
        patient_ids = [plan.patient_id for plan in plans]
        diseases = [plan.disease for plan in plans]
        gene_sets = tables.draw_gene_sets(
            stream_rng(seed, _GENES),
            n_genes,
            int(gene_settings["tumour_set_size"]),
            int(gene_settings["microenvironment_set_size"]),
        )
        expression = tables.make_expression(
            stream_rng(seed, _GENES, 1), patient_ids, diseases, gene_sets, n_genes
        )
        write_tsv(expression, folder / "genes" / "expression.tsv")
        (folder / "genes" / "gene_sets.gmt").write_text(tables.format_gmt(gene_sets))

        clinical = tables.make_clinical(
            stream_rng(seed, _CLINICAL),
            patient_ids,
            diseases,
            [plan.mn_stage for plan in plans],
            tables.risk_score(expression, gene_sets["tumour"]),
        )
        write_tsv(clinical, folder / "clinical.tsv")
        write_json(_provenance(settings, plans), folder / "cohort.json")

    counts = Counter(images["modality"])
    logger.info(
        "wrote synthetic cohort %s: %d patients (%s), %d images (%s) in %.1f s",
        root,
        len(plans),
        ", ".join(f"{d} {diseases.count(d)}" for d in renal.DISEASES),
        len(images),
        ", ".join(f"{m} {counts.get(m, 0)}" for m in MODALITIES),
        time.perf_counter() - started,
    )
    return root


def _provenance(settings: dict[str, Any], plans: list[PatientPlan]) -> dict[str, Any]:
    return {
        "mmdiag_version": mmdiag.__version__,
        "generator": "mmdiag.synth.write_synthetic_cohort",
        "seed": int(settings["seed"]),
        "settings": settings,
        "planted_signal": renal.SIGNAL_DESCRIPTION,
        "patients": [
            {
                "patient_id": plan.patient_id,
                "disease": plan.disease,
                "mn_stage": plan.mn_stage,
                "shown_pattern": plan.shown,
                "n_tem": plan.n_tem,
            }
            for plan in plans
        ],
    }
