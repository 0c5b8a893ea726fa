"""Subspace fusion's tissue samples from the pipeline's files: slide features and genes.

A **tissue sample** is one WSI row of the manifest: its slide's patch features (the feature
stores of ``results/{cohort}/features/stores``) and its gene-expression profile. Evaluation
is per sample, splits are by patient (every sample of a patient is in the patient's part).

- **Expression**: ``genes.expression`` (a table :func:`mmdiag.genes.read_expression` reads,
  samples x genes; relative paths are taken in the cohort folder). With
  ``genes.sample_key: slide`` its sample ids are the slides' file stems (``P001-1`` for
  ``wsi/P001-1.svs``); with ``patient`` they are patient ids and every slide of a patient
  takes the patient's profile.
- **Gene space** (:func:`fit_gene_space`), fitted on the training samples only: the
  ``top_variable_fraction`` most variable genes of the table (the paper's top 30 % highly
  variable genes), z-scored with training statistics, then the genes of the two subspace sets
  (``genes.subspaces``: the tumour and microenvironment sets of ``genes.gene_sets``, a GMT
  file). Those genes, in table order, are every model's gene vector; the subspaces and the
  co-attention groups (``genes.groups``, more sets of the GMT file) are index lists into it.
- **Patch set**: ``slides.n_patches`` features per sample (the paper's 2 500), drawn once per
  sample with the split's seed: a random subset when the slide has more patches; when it has
  fewer, every patch as many whole times as fit and a random subset of them for the rest (the
  "biological repeat").
- **Grid**: every patch laid on a ``slides.grid_cells`` map by its position, not by row order
  (:func:`patch_grid`); the cells of a tissue larger than the map are pooled.
- **Survival**: the four time bins are the quartiles of the uncensored times of the training
  patients (each patient once, :func:`mmdiag.training.survival.fit_time_bins`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmdiag.features.store import feature_store_paths, open_feature_store
from mmdiag.genes import ExpressionPreprocessor, read_expression, read_gmt
from mmdiag.training.survival import assign_bins, fit_time_bins

PARTS = ("train", "val", "test")
SAMPLE_KEYS = ("slide", "patient")


@dataclass(frozen=True)
class Sample:
    """One tissue sample: ids, the task label (class or time bin), its inputs, its outcome."""

    sample_id: str
    patient_id: str
    label: int
    patches: np.ndarray  # (N, D)
    grid: np.ndarray  # (D, H, W)
    grid_mask: np.ndarray  # (1, H, W)
    genes: np.ndarray  # (G,)
    time: float = math.nan
    event: float = math.nan


@dataclass(frozen=True)
class GeneSpace:
    """The fitted gene preprocessing and the index lists of the subspaces and groups."""

    preprocessor: ExpressionPreprocessor
    genes: list[str]
    subspaces: dict[str, list[int]]
    groups: dict[str, list[int]]

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        return self.preprocessor.transform(table)[self.genes].to_numpy(np.float32)


# --------------------------------------------------------------------------- the samples


def slide_samples(manifest: pd.DataFrame, manifest_path) -> pd.DataFrame:
    """``sample_id`` (the slide's file stem), ``patient_id``, ``image_id`` of every WSI row."""
    slides = manifest[manifest["modality"] == "WSI"]
    if slides.empty:
        raise ValueError(f"{manifest_path}: no WSI rows; subspace fusion needs slides")
    frame = pd.DataFrame(
        {
            "sample_id": [Path(i).name for i in slides["image_id"]],
            "patient_id": slides["patient_id"].astype(str).to_numpy(),
            "image_id": slides["image_id"].to_numpy(),
        }
    )
    twice = sorted(frame.loc[frame["sample_id"].duplicated(), "sample_id"])
    if twice:
        raise ValueError(f"{manifest_path}: slides share the file stems {twice[:5]}")
    return frame.sort_values(["patient_id", "sample_id"], ignore_index=True)


def sample_expression(
    expression_path: Path, samples: pd.DataFrame, sample_key: str
) -> pd.DataFrame:
    """The expression table with one row per sample (indexed by ``sample_id``); ``ValueError``
    naming the file and the samples it lacks."""
    if sample_key not in SAMPLE_KEYS:
        raise ValueError(f"genes.sample_key must be one of {SAMPLE_KEYS}, got {sample_key!r}")
    table = read_expression(expression_path)
    key = "sample_id" if sample_key == "slide" else "patient_id"
    missing = sorted(set(samples[key]) - set(table.index.astype(str)))
    if missing:
        raise ValueError(
            f"{expression_path}: no expression profile for {len(missing)} {sample_key}s "
            f"(ids are matched to the {sample_key}s' {key}): {missing[:5]}"
        )
    rows = table.loc[samples[key].to_numpy()]
    rows.index = samples["sample_id"].to_numpy()
    return rows


def fit_gene_space(
    train_table: pd.DataFrame, gene_sets_path: Path, gene_settings: Mapping
) -> GeneSpace:
    """Highly variable genes and z-scores fitted on the training samples, restricted to the
    subspace sets; ``ValueError`` when a subspace or group keeps no gene."""
    sets = read_gmt(gene_sets_path)
    fraction = gene_settings["top_variable_fraction"]
    n_top = None if fraction is None else max(1, round(fraction * train_table.shape[1]))
    pre = ExpressionPreprocessor(
        log1p=gene_settings["log1p"], zscore=gene_settings["zscore"], n_top_variable=n_top
    ).fit(train_table)
    subspace_sets = {
        name: set(_gene_set(sets, set_name, gene_sets_path))
        for name, set_name in gene_settings["subspaces"].items()
    }
    wanted = set().union(*subspace_sets.values())
    genes = [gene for gene in pre.genes_ if gene in wanted]

    def indices(members: set[str], what: str) -> list[int]:
        found = [i for i, gene in enumerate(genes) if gene in members]
        if not found:
            raise ValueError(
                f"{gene_sets_path}: {what} keeps no gene among the {len(genes)} selected "
                f"(top {n_top or 'all'} variable genes of the training samples in the subspaces)"
            )
        return found

    subspaces = {name: indices(m, f"subspace {name!r}") for name, m in subspace_sets.items()}
    groups = {
        name: indices(set(_gene_set(sets, name, gene_sets_path)), f"group {name!r}")
        for name in gene_settings.get("groups") or []
    }
    return GeneSpace(pre, genes, subspaces, groups)


def _gene_set(sets: Mapping[str, list[str]], name: str, path: Path) -> list[str]:
    if name not in sets:
        raise ValueError(f"{path}: no gene set {name!r}; it has {sorted(sets)}")
    return sets[name]


# ---------------------------------------------------------------------------- slide views


def slide_features(
    samples: pd.DataFrame, stores_dir: Path, scale: str | None, manifest_path
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per sample, ``(features (N, D), centre_xy (N, 2))`` at ``scale`` (the finest when
    ``None``); ``ValueError`` naming the store or the samples without features."""
    by_image = samples.set_index("image_id")["sample_id"]
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in feature_store_paths([stores_dir]):
        store = open_feature_store(path)
        if store.image_id not in by_image.index:
            raise ValueError(
                f"feature store {path}: image_id {store.image_id!r} is not a slide of "
                f"{manifest_path}"
            )
        if scale is not None and scale not in store.scales:
            raise ValueError(f"feature store {path}: no scale {scale!r}; it has {store.scales}")
        index = 0 if scale is None else store.scales.index(scale)
        if len(store):
            found[by_image[store.image_id]] = (store.features[:, index, :], store.centre_xy)
    missing = sorted(set(samples["sample_id"]) - set(found))
    if missing:
        raise ValueError(
            f"{stores_dir}: no patch features for {len(missing)} slides of {manifest_path}: "
            f"{missing[:5]}"
        )
    return found


def fixed_patch_set(features: np.ndarray, n_patches: int, rng: np.random.Generator) -> np.ndarray:
    """``n_patches`` rows of ``features``: a random subset, or whole repeats plus a subset."""
    count = len(features)
    if count >= n_patches:
        return features[np.sort(rng.choice(count, n_patches, replace=False))]
    repeats, rest = divmod(n_patches, count)
    extra = np.sort(rng.choice(count, rest, replace=False))
    return np.concatenate([np.tile(features, (repeats, 1)), features[extra]])


def patch_grid(
    features: np.ndarray, centre_xy: np.ndarray, grid_cells: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Patches on an ``(H, W)`` map by position: ``(grid (D, H, W), mask (1, H, W))``.

    The patch step is the greatest common divisor of the centres' offsets from the top-left
    patch, so each patch has its own cell; a tissue wider or taller than the map is pooled by
    the least integer factor that fits it (a cell then holds the mean of its patches) and
    centred on the map. Cells without a patch are zero, with mask 0.
    """
    height, width = (int(n) for n in grid_cells)
    offsets = np.asarray(centre_xy, dtype=np.int64) - np.min(centre_xy, axis=0)
    step = int(np.gcd.reduce(offsets.ravel())) or 1
    cells = offsets // step  # (N, 2): column, row
    extent = cells.max(axis=0) + 1
    factor = max(1, math.ceil(extent[0] / width), math.ceil(extent[1] / height))
    cells //= factor
    pooled = -(-extent // factor)
    cols = cells[:, 0] + (width - pooled[0]) // 2
    rows = cells[:, 1] + (height - pooled[1]) // 2
    dim = features.shape[1]
    total = np.zeros((height * width, dim), dtype=np.float64)
    count = np.zeros(height * width, dtype=np.float64)
    flat = rows * width + cols
    np.add.at(total, flat, features)
    np.add.at(count, flat, 1.0)
    grid = total / np.maximum(count, 1.0)[:, None]
    grid = grid.T.reshape(dim, height, width).astype(np.float32)
    mask = (count > 0).reshape(1, height, width).astype(np.float32)
    return grid, mask


# ---------------------------------------------------------------------------- per-part cases


def survival_bins(outcomes: pd.DataFrame, train_patients: Sequence[str], n_bins: int) -> np.ndarray:
    """Bin edges from the training patients' uncensored times (each patient once)."""
    train = outcomes.loc[list(train_patients)]
    return fit_time_bins(train["survival_months"], train["event"], n_bins)


def task_samples(
    base: Sequence[Sample],
    labels: Mapping[str, int],
    outcomes: pd.DataFrame | None = None,
    edges: np.ndarray | None = None,
) -> list[Sample]:
    """The samples of patients with a label (class index, ``-1`` meaning none), labelled; for
    survival (``edges`` given), the patient's time bin, time and event."""
    chosen = []
    for sample in base:
        if edges is not None:
            time = float(outcomes.at[sample.patient_id, "survival_months"])
            event = float(outcomes.at[sample.patient_id, "event"])
            if math.isnan(time) or math.isnan(event):
                continue
            label = int(assign_bins([time], edges)[0])
            chosen.append(replace(sample, label=label, time=time, event=event))
        elif labels.get(sample.patient_id, -1) >= 0:
            chosen.append(replace(sample, label=labels[sample.patient_id]))
    return chosen


def collate(samples: Sequence[Sample], generators=None) -> dict[str, torch.Tensor]:
    """The family's batch (see :mod:`mmdiag.models.genomic`); no augmentation."""
    batch = {
        "patches": torch.from_numpy(np.stack([s.patches for s in samples])),
        "grid": torch.from_numpy(np.stack([s.grid for s in samples])),
        "grid_mask": torch.from_numpy(np.stack([s.grid_mask for s in samples])),
        "genes": torch.from_numpy(np.stack([s.genes for s in samples])),
        "label": torch.tensor([s.label for s in samples], dtype=torch.long),
    }
    if not math.isnan(samples[0].time):
        batch["time"] = torch.tensor([s.time for s in samples], dtype=torch.float32)
        batch["event"] = torch.tensor([s.event for s in samples], dtype=torch.float32)
    return batch
