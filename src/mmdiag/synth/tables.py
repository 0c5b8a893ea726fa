"""Synthetic clinical and gene-expression tables.

Planted signal:

* Gene expression is log-scale: a per-gene baseline plus noise. The ``tumour`` gene set
  loads on a latent per-patient risk factor, so its mean z-score is a risk score.
* The ``microenvironment`` gene set shifts with disease: each of its genes gets a fixed
  random offset per disease.
* Survival time is exponential with hazard ``BASELINE_HAZARD_PER_MONTH[disease] *
  exp(RISK_LOG_HAZARD * risk)``, where ``risk`` is the standardised mean of the tumour
  genes computed from the written table; follow-up is censored uniformly in
  ``CENSOR_RANGE_MONTHS``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

BASELINE_HAZARD_PER_MONTH = {"IgAN": 1 / 120, "MN": 1 / 80, "LN": 1 / 45}
RISK_LOG_HAZARD = 0.9
CENSOR_RANGE_MONTHS = (12.0, 120.0)
MICROENVIRONMENT_SHIFT = 1.0


def gene_names(n_genes: int) -> list[str]:
    """``GENE0001``, ``GENE0002``, …"""
    return [f"GENE{index:04d}" for index in range(1, n_genes + 1)]


def draw_gene_sets(
    rng: np.random.Generator,
    n_genes: int,
    tumour_set_size: int,
    microenvironment_set_size: int,
) -> dict[str, list[str]]:
    """Pick the disjoint ``tumour`` and ``microenvironment`` gene sets."""
    if tumour_set_size + microenvironment_set_size > n_genes:
        raise ValueError(
            "tumour_set_size + microenvironment_set_size must not exceed n_genes, got "
            f"{tumour_set_size} + {microenvironment_set_size} > {n_genes}"
        )
    names = gene_names(n_genes)
    order = rng.permutation(n_genes)
    tumour = sorted(order[:tumour_set_size])
    micro = sorted(order[tumour_set_size : tumour_set_size + microenvironment_set_size])
    return {
        "tumour": [names[i] for i in tumour],
        "microenvironment": [names[i] for i in micro],
    }


def make_expression(
    rng: np.random.Generator,
    patient_ids: Sequence[str],
    diseases: Sequence[str],
    gene_sets: dict[str, list[str]],
    n_genes: int,
) -> pd.DataFrame:
    """Return the log-expression table (first column ``patient_id``, then genes)."""
    names = gene_names(n_genes)
    n_patients = len(patient_ids)
    baseline = rng.normal(6.0, 1.5, n_genes)
    values = baseline + rng.normal(0.0, 0.5, (n_patients, n_genes))
    column = {name: index for index, name in enumerate(names)}

    tumour = [column[g] for g in gene_sets["tumour"]]
    latent_risk = rng.normal(0.0, 1.0, n_patients)
    loading = rng.uniform(0.6, 1.0, len(tumour))
    values[:, tumour] += latent_risk[:, None] * loading[None, :]

    micro = [column[g] for g in gene_sets["microenvironment"]]
    shift = {
        disease: rng.normal(0.0, MICROENVIRONMENT_SHIFT, len(micro))
        for disease in BASELINE_HAZARD_PER_MONTH
    }
    for row, disease in enumerate(diseases):
        values[row, micro] += shift[disease]

    frame = pd.DataFrame(np.round(values, 4), columns=names)
    frame.insert(0, "patient_id", list(patient_ids))
    return frame


def risk_score(expression: pd.DataFrame, tumour_genes: Sequence[str]) -> np.ndarray:
    """Standardised mean z-score of the tumour genes (the planted survival risk)."""
    block = expression[list(tumour_genes)].to_numpy(dtype=float)
    z = (block - block.mean(axis=0)) / (block.std(axis=0) + 1e-9)
    score = z.mean(axis=1)
    return (score - score.mean()) / (score.std() + 1e-9)


def make_clinical(
    rng: np.random.Generator,
    patient_ids: Sequence[str],
    diseases: Sequence[str],
    mn_stages: Sequence[str],
    risk: np.ndarray,
) -> pd.DataFrame:
    """Return ``clinical.tsv``: disease, MN stage, survival months and event indicator."""
    hazard = np.array([BASELINE_HAZARD_PER_MONTH[d] for d in diseases])
    hazard = hazard * np.exp(RISK_LOG_HAZARD * np.asarray(risk))
    event_time = rng.exponential(1.0 / hazard)
    censor_time = rng.uniform(*CENSOR_RANGE_MONTHS, len(patient_ids))
    return pd.DataFrame(
        {
            "patient_id": list(patient_ids),
            "disease": list(diseases),
            "mn_stage": list(mn_stages),
            "survival_months": np.round(np.minimum(event_time, censor_time), 2),
            "event": (event_time <= censor_time).astype(int),
        }
    )


def format_gmt(gene_sets: dict[str, list[str]]) -> str:
    """Return gene sets in GMT format: ``name<TAB>description<TAB>gene...`` per line."""
    descriptions = {
        "tumour": "genes loading on the planted survival risk",
        "microenvironment": "genes shifted by disease",
    }
    lines = [
        "\t".join([name, descriptions.get(name, name), *genes]) for name, genes in gene_sets.items()
    ]
    return "\n".join(lines) + "\n"
