"""CS-MIL's material per patient: every patch's features at every scale, and its cluster.

The unit of prediction is a slide (the paper: "every WSI is treated as a bag", slide-wise
labels) or, as a config choice, a patient whose slides are pooled into one bag; either way a
:class:`Slide` holds one unit's bag material. Features may be z-scored with the training
split's statistics (:func:`standardise`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mmdiag.data.manifest import read_manifest
from mmdiag.features.store import open_feature_store
from mmdiag.io import read_tsv

UNITS = ("slide", "patient")


@dataclass(frozen=True)
class Slide:
    """One patient's bag material: every patch's features at every scale, and its cluster."""

    patient_id: str
    label: int
    case_id: str  # the slide's image_id, or the patient id when a patient's slides are pooled
    features: np.ndarray  # float32 (n_patches, S, D)
    clusters: np.ndarray  # int (n_patches,)
    image_ids: np.ndarray  # str (n_patches,): the slide of each patch
    patch_index: np.ndarray  # int (n_patches,): row in that slide's feature store


def load_slides(
    manifest_path: Path,
    feature_paths: Sequence[Path],
    clusters_path: Path,
    positive_class: str,
    *,
    cluster_column: str = "cluster",
    unit: str = "slide",
) -> dict[str, Slide]:
    """Every slide with a feature store (``unit="slide"``), or every patient with its slides
    pooled (``"patient"``), keyed by case id; the label is 1 for ``positive_class``.

    ``ValueError`` when a patient's slides disagree on the label and ``unit`` is patient.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    manifest = read_manifest(manifest_path)
    wsi = manifest[manifest["modality"] == "WSI"].set_index("image_id")
    clusters = read_tsv(clusters_path)
    if cluster_column not in clusters.columns:
        raise ValueError(f"{clusters_path}: no column {cluster_column!r}")
    by_case: dict[str, list] = {}
    patients: dict[str, str] = {}
    for path in feature_paths:
        store = open_feature_store(path)
        if store.image_id not in wsi.index:
            raise ValueError(
                f"feature store {path}: image_id {store.image_id!r} not in {manifest_path}"
            )
        rows = clusters[clusters["image_id"] == store.image_id].sort_values("patch_index")
        if len(rows) != len(store):
            raise ValueError(
                f"{clusters_path}: {len(rows)} cluster rows for {store.image_id}, "
                f"its feature store {path} has {len(store)} patches"
            )
        patient = str(wsi.loc[store.image_id, "patient_id"])
        label = int(wsi.loc[store.image_id, "disease"] == positive_class)
        case = store.image_id if unit == "slide" else patient
        by_case.setdefault(case, []).append((store, rows[cluster_column].to_numpy(), label))
        patients[case] = patient
    return {case: _pool(case, patients[case], parts) for case, parts in sorted(by_case.items())}


def _pool(case: str, patient: str, parts: list) -> Slide:
    """One case's bag material: its slides' patches concatenated (one slide for unit slide)."""
    if len({label for _, _, label in parts}) > 1:
        raise ValueError(
            f"patient {patient}: its slides have different labels; predict per slide "
            "(unit: slide) or give its slides one label"
        )
    return Slide(
        patient_id=patient,
        case_id=case,
        label=parts[0][2],
        features=np.concatenate([store.features for store, _, _ in parts]),
        clusters=np.concatenate([clusters for _, clusters, _ in parts]).astype(np.int64),
        image_ids=np.concatenate([[store.image_id] * len(store) for store, _, _ in parts]),
        patch_index=np.concatenate([np.arange(len(store)) for store, _, _ in parts]),
    )


def standardise(parts: Mapping[str, list[Slide]]) -> tuple[dict, np.ndarray, np.ndarray]:
    """z-score every feature with the mean and std of the training slides' patches.

    An affine map the first (1x1) layer could learn itself, so it changes no model; it makes
    optimisation independent of the encoder's output scale (weakly trained encoders give
    features that barely vary between patches).
    """
    train = np.concatenate([slide.features for slide in parts["train"]])
    mean = train.mean(axis=0, keepdims=True)
    std = train.std(axis=0, keepdims=True) + 1e-6
    scaled = {
        part: [replace(s, features=((s.features - mean) / std).astype(np.float32)) for s in slides]
        for part, slides in parts.items()
    }
    return scaled, mean[0], std[0]
