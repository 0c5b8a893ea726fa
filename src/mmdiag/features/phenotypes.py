"""Phenotype clusters: k-means over each patient's 20x patch features (CS-MIL, Sec. 2.2).

CS-MIL groups a patient's patches into ``k`` = 8 phenotypes with k-means on the features of
the finest scale and reuses each patch's cluster for its 10x and 5x context (a location has
one cluster, whatever the scale). Bags are then drawn evenly from the clusters. The authors
run scikit-learn's ``KMeans(8, random_state=0)``; so does this module, with a fixed seed.

The table's ``cluster`` column is the 20x clustering; ``cluster_<scale>`` columns repeat the
clustering on each scale's own features, for the single-scale baselines of Table 1 ("Phenotype
clustering was performed within the single-scale features at three resolutions").

A patient with fewer patches than ``k`` gets one cluster per patch (k-means cannot make more
clusters than points); the table records the ``k`` actually used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from mmdiag.data.manifest import read_manifest
from mmdiag.features.store import FeatureStore, feature_store_paths, open_feature_store

log = logging.getLogger(__name__)

CLUSTER_COLUMNS = ["patient_id", "image_id", "patch_index", "patch_id", "cluster", "k"]


def kmeans_labels(features: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster ids 0..k-1 of the rows of ``features``, k = min(n_clusters, rows)."""
    n_rows = len(features)
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n_clusters, n_rows)
    model = KMeans(n_clusters=k, random_state=seed, n_init=10)
    return model.fit_predict(np.asarray(features, dtype=np.float64)).astype(np.int64)


def cluster_patients(
    feature_paths: Sequence[str | Path],
    patient_of_image: Mapping[str, str],
    *,
    n_clusters: int = 8,
    seed: int = 0,
    scale: str | None = None,
) -> pd.DataFrame:
    """One row per patch of every slide: its patient's k-means cluster on ``scale`` features.

    ``scale`` defaults to each store's finest scale (20x). A patient's slides are clustered
    together. Raises ``ValueError`` naming the store whose image_id the manifest lacks.
    """
    stores = [open_feature_store(path) for path in feature_paths]
    scales = stores[0].scales if stores else []
    by_patient: dict[str, list[FeatureStore]] = {}
    for store in stores:
        if store.image_id not in patient_of_image:
            raise ValueError(
                f"feature store {store.path}: image_id {store.image_id!r} is not in the manifest"
            )
        by_patient.setdefault(patient_of_image[store.image_id], []).append(store)
    tables = [
        _cluster_one_patient(patient, slides, n_clusters, seed, scale)
        for patient, slides in sorted(by_patient.items())
    ]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return table.reindex(columns=CLUSTER_COLUMNS + [f"cluster_{s}" for s in scales])


def cluster_cohort(
    feature_paths: Sequence[str | Path], manifest_path: Path, *, n_clusters: int, seed: int
) -> pd.DataFrame:
    """:func:`cluster_patients` for the feature stores (or folders of them) of a cohort,
    patients taken from its manifest."""
    manifest = read_manifest(manifest_path)
    patient_of_image = dict(zip(manifest["image_id"], manifest["patient_id"], strict=True))
    return cluster_patients(
        feature_store_paths(feature_paths), patient_of_image, n_clusters=n_clusters, seed=seed
    )


def _cluster_one_patient(patient, slides, n_clusters, seed, scale) -> pd.DataFrame:
    slides = sorted(slides, key=lambda store: store.image_id)
    scales = slides[0].scales
    if any(store.scales != scales for store in slides):
        raise ValueError(f"patient {patient}: feature stores disagree on their scales")
    per_scale = {
        name: kmeans_labels(np.concatenate([s.features[:, i] for s in slides]), n_clusters, seed)
        for i, name in enumerate(scales)
    }
    features = np.concatenate([s.features[:, 0] for s in slides])
    labels = per_scale[scale or scales[0]]
    if len(features) < n_clusters:
        log.warning(
            "patient %s: %d patches < k=%d; one cluster per patch",
            patient,
            len(features),
            n_clusters,
        )
    rows = pd.DataFrame(
        {
            "patient_id": patient,
            "image_id": np.concatenate([[s.image_id] * len(s) for s in slides]),
            "patch_index": np.concatenate([np.arange(len(s)) for s in slides]),
            "patch_id": np.concatenate([s.patch_id for s in slides]),
            "cluster": labels,
            "k": min(n_clusters, len(features)),
            **{f"cluster_{name}": values for name, values in per_scale.items()},
        }
    )
    return rows
