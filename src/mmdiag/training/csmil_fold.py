"""Train and test one CS-MIL variant on one split, from the cohort's features and clusters.

Per split (paper, Sec. 4): a model is trained on bags drawn from the training slides' patches
(evenly from each patient's phenotype clusters, :mod:`mmdiag.training.csmil_bags`) with Adam
(lr 5e-4, weight decay 1e-4) and binary cross-entropy; after every epoch the loss on fixed
validation bags is measured and the weights of the epoch with the lowest validation loss are
kept (the last epoch's when the split has no validation part). Each test slide is scored by
the mean probability of ``test_bags`` random bags (median and max are saved too), and the
instance and scale attention of the test bags is averaged per patch for attention maps.

Side effects: writes, atomically, ``out_dir`` = ``results/{method}/{variant}/fold_{k}/``
holding ``model.safetensors``, ``predictions.tsv``, ``metrics.tsv`` (ACC, AUC, AP, ...),
``train_log.tsv``, ``attention.tsv`` and ``config.yaml``.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score
from torch import nn

import mmdiag
from mmdiag.data.manifest import read_manifest
from mmdiag.data.splits import load_splits
from mmdiag.evaluation.metrics import classification_metrics
from mmdiag.features.store import open_feature_store
from mmdiag.io import sha256_file
from mmdiag.models import create_model
from mmdiag.training.csmil_bags import aggregate_bag_probabilities, collate_bags, sample_bags
from mmdiag.training.fold_outputs import write_fold_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slide:
    """One patient's bag material: every patch's features at every scale, and its cluster."""

    patient_id: str
    label: int
    features: np.ndarray  # float32 (n_patches, S, D)
    clusters: np.ndarray  # int (n_patches,)
    image_ids: np.ndarray  # str (n_patches,): the slide of each patch
    patch_index: np.ndarray  # int (n_patches,): row in that slide's feature store


def load_slides(
    manifest_path: Path,
    feature_paths: Sequence[Path],
    clusters_path: Path,
    classes: Sequence[str],
    positive_class: str,
    *,
    cluster_column: str = "cluster",
) -> dict[str, Slide]:
    """Every patient with a feature store, keyed by patient id (a patient's slides pooled)."""
    manifest = read_manifest(manifest_path)
    if positive_class not in classes or len(classes) != 2:
        raise ValueError(
            f"CS-MIL needs two classes with {positive_class!r} among them; "
            f"the manifest allows {list(classes)}"
        )
    wsi = manifest[manifest["modality"] == "WSI"].set_index("image_id")
    clusters = pd.read_csv(clusters_path, sep="\t", dtype={"patient_id": str, "image_id": str})
    if cluster_column not in clusters.columns:
        raise ValueError(f"{clusters_path}: no column {cluster_column!r}")
    by_patient: dict[str, list] = {}
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
        by_patient.setdefault(patient, []).append((store, rows[cluster_column].to_numpy(), label))
    return {patient: _pool(patient, parts) for patient, parts in sorted(by_patient.items())}


def _pool(patient: str, parts: list) -> Slide:
    return Slide(
        patient_id=patient,
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


def draw_bags(slide: Slide, n_bags: int, bag_size: int, rng, *, stratified: bool):
    """``n_bags`` (indices, mask) pairs of one slide; clusters ignored unless ``stratified``."""
    indices, masks = sample_bags(slide.clusters, bag_size, n_bags, rng, stratified=stratified)
    return list(zip(indices, masks, strict=True))


def _batch(slides: Sequence[Slide], bags: Sequence[tuple]) -> dict[str, torch.Tensor]:
    items = [
        (slide.features, indices, mask, float(slide.label))
        for slide, (indices, mask) in zip(slides, bags, strict=True)
    ]
    return collate_bags(items)


@torch.no_grad()
def bag_probabilities(model: nn.Module, slide: Slide, bags: Sequence[tuple], batch_size: int):
    """Sigmoid probability of each bag, and the bags' attention (eval mode)."""
    model.eval()
    probabilities, attentions = [], []
    for start in range(0, len(bags), batch_size):
        chunk = bags[start : start + batch_size]
        batch = _batch([slide] * len(chunk), chunk)
        probabilities.append(torch.sigmoid(model(batch)))
        attentions.append(model.attention(batch))
    joined = {key: torch.cat([a[key] for a in attentions]).numpy() for key in attentions[0]}
    return torch.cat(probabilities).numpy(), joined


@torch.no_grad()
def validation_loss(model: nn.Module, slides, bags_per_slide, batch_size: int) -> float:
    """Mean binary cross-entropy over fixed validation bags."""
    model.eval()
    total, count = 0.0, 0
    for slide, bags in zip(slides, bags_per_slide, strict=True):
        for start in range(0, len(bags), batch_size):
            chunk = bags[start : start + batch_size]
            loss, _ = model.loss(_batch([slide] * len(chunk), chunk))
            total += loss.item() * len(chunk)
            count += len(chunk)
    return total / max(count, 1)


def train_variant(
    model: nn.Module,
    train: Sequence[Slide],
    val: Sequence[Slide],
    settings: Mapping,
    rng: np.random.Generator,
    *,
    stratified: bool,
) -> list[dict]:
    """Train in place, keep the lowest-validation-loss weights; return the epoch log."""
    train_settings, bag_settings = settings["train"], settings["bags"]
    size, batch_size = bag_settings["size"], train_settings["batch_size"]
    optimiser = torch.optim.Adam(
        model.parameters(), lr=train_settings["lr"], weight_decay=train_settings["weight_decay"]
    )
    val_bags = [
        draw_bags(s, bag_settings["val_bags"], size, rng, stratified=stratified) for s in val
    ]
    best_loss, best_state, history = float("inf"), None, []
    for epoch in range(1, train_settings["epochs"] + 1):
        started = time.perf_counter()
        items = [
            (slide, bag)
            for slide in train
            for bag in draw_bags(
                slide, bag_settings["train_bags_per_slide"], size, rng, stratified=stratified
            )
        ]
        order = rng.permutation(len(items))
        model.train()
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            chosen = [items[i] for i in order[start : start + batch_size]]
            loss, _ = model.loss(_batch([s for s, _ in chosen], [b for _, b in chosen]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum += loss.item() * len(chosen)
        row = {"epoch": epoch, "train_loss": loss_sum / len(items)}
        if val:
            row["val_loss"] = validation_loss(model, val, val_bags, batch_size=64)
            if row["val_loss"] < best_loss:
                best_loss, best_state = row["val_loss"], copy.deepcopy(model.state_dict())
                row["selected"] = True
        row["seconds"] = time.perf_counter() - started
        history.append(row)
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def test_variant(model, test: Sequence[Slide], settings: Mapping, rng, *, stratified: bool):
    """Slide scores (mean, median, max over test bags) and per-patch mean attention."""
    bag_settings = settings["bags"]
    scores, attention_rows = [], []
    for slide in test:
        bags = draw_bags(
            slide, bag_settings["test_bags"], bag_settings["size"], rng, stratified=stratified
        )
        probabilities, attention = bag_probabilities(model, slide, bags, batch_size=64)
        scores.append(aggregate_bag_probabilities(probabilities))
        attention_rows.append(patch_attention(slide, bags, attention))
    return scores, pd.concat(attention_rows, ignore_index=True)


def patch_attention(slide: Slide, bags, attention: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Mean instance (and per-scale) attention of each patch over the bags that drew it."""
    n = len(slide.features)
    sums, counts = np.zeros(n), np.zeros(n)
    scale = attention.get("scale")  # (bags, N, S) for cross-scale models
    scale_sums = np.zeros((n, scale.shape[-1])) if scale is not None else None
    for b, (indices, mask) in enumerate(bags):
        real = indices[mask]
        np.add.at(sums, real, attention["instance"][b][mask])
        np.add.at(counts, real, 1)
        if scale is not None:
            np.add.at(scale_sums, real, scale[b][mask])
    seen = counts > 0
    frame = pd.DataFrame(
        {
            "patient_id": slide.patient_id,
            "image_id": slide.image_ids,
            "patch_index": slide.patch_index,
            "n_bags": counts.astype(int),
            "instance_attention": np.where(seen, sums / np.maximum(counts, 1), np.nan),
        }
    )
    if scale_sums is not None:
        for s in range(scale_sums.shape[1]):
            frame[f"scale_attention_{s}"] = np.where(
                seen, scale_sums[:, s] / np.maximum(counts, 1), np.nan
            )
    return frame


def binary_metrics(y_true: np.ndarray, prob_positive: np.ndarray) -> dict[str, float]:
    """ACC, AUC, PRE, REC, SPE, F1 (macro, as every method) and AP of the positive class."""
    prob = np.column_stack([1 - prob_positive, prob_positive])
    metrics = classification_metrics(y_true, prob, n_classes=2)
    single_class = len(np.unique(y_true)) < 2
    metrics["AP"] = (
        float("nan") if single_class else float(average_precision_score(y_true, prob_positive))
    )
    return metrics


def run_csmil_fold(
    *,
    manifest_path: Path,
    splits_path: Path,
    feature_paths: Sequence[Path],
    clusters_path: Path,
    fold: int,
    variant: str,
    method: str,
    method_settings: Mapping,
    classes: Sequence[str],
    out_dir: Path,
) -> dict[str, float]:
    """Train ``variant`` on split ``fold``, test it, write ``out_dir``; return its metrics."""
    started = time.perf_counter()
    spec = method_settings["variants"][variant]
    stratified = spec["clustering"]
    cluster_column = f"cluster_{spec['cluster_scale']}" if spec["cluster_scale"] else "cluster"
    slides = load_slides(
        manifest_path,
        feature_paths,
        clusters_path,
        classes,
        method_settings["positive_class"],
        cluster_column=cluster_column,
    )
    parts = _split_parts(load_splits(splits_path), fold, splits_path, slides)
    scaling = None
    if method_settings["standardise_features"]:
        parts, mean, std = standardise(parts)
        scaling = {"feature_mean": torch.from_numpy(mean), "feature_std": torch.from_numpy(std)}
    seed = method_settings["train"]["seed"]
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, fold])
    in_dim = next(iter(slides.values())).features.shape[-1]
    model = create_model(spec["model"], in_dim=in_dim, **spec["options"])
    history = train_variant(
        model, parts["train"], parts["val"], method_settings, rng, stratified=stratified
    )
    scores, attention = test_variant(
        model, parts["test"], method_settings, rng, stratified=stratified
    )
    predictions = predictions_frame(parts["test"], scores, fold, variant, classes)
    metrics = binary_metrics(
        predictions["y_true"].to_numpy(), predictions[f"prob_{classes[1]}"].to_numpy()
    )
    resolved = {
        "method": method,
        "variant": variant,
        "fold": fold,
        "model": spec["model"],
        "variant_settings": dict(spec),
        "bags": dict(method_settings["bags"]),
        "standardise_features": method_settings["standardise_features"],
        "train": dict(method_settings["train"]),
        "classes": list(classes),
        "n_slides": {k: len(v) for k, v in parts.items()},
        "inputs": {
            "manifest_sha256": sha256_file(manifest_path),
            "splits_sha256": sha256_file(splits_path),
            "clusters_sha256": sha256_file(clusters_path),
        },
        "versions": {
            "mmdiag": mmdiag.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_csmil_fold(
        out_dir, model, predictions, metrics, history, attention, resolved, method, scaling
    )
    log.info(
        "%s %s fold %d: %s",
        method,
        variant,
        fold,
        " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    return metrics


def _split_parts(splits: Mapping, fold: int, path: Path, slides: Mapping[str, Slide]):
    folds = splits["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"{path}: fold {fold} does not exist ({len(folds)} folds)")
    parts = {}
    for part in ("train", "val", "test"):
        patients = folds[fold].get(part, [])
        missing = [p for p in patients if p not in slides]
        if missing and part != "val":
            raise ValueError(f"{path}: {part} patients {missing[:5]} have no feature store")
        parts[part] = [slides[p] for p in patients if p in slides]
    return parts


def predictions_frame(test, scores, fold: int, variant: str, classes) -> pd.DataFrame:
    """One row per test slide: the mean-bag probability, and the median and max bag scores."""
    mean = np.array([s.mean for s in scores])
    return pd.DataFrame(
        {
            "patient_id": [s.patient_id for s in test],
            "fold": fold,
            "variant": variant,
            "y_true": [s.label for s in test],
            "y_pred": (mean >= 0.5).astype(int),
            f"prob_{classes[0]}": 1 - mean,
            f"prob_{classes[1]}": mean,
            "score_median": [s.median for s in scores],
            "score_max": [s.max for s in scores],
        }
    )


def write_csmil_fold(
    out_dir, model, predictions, metrics, history, attention, resolved, method, scaling=None
):
    """The fold folder, with ``attention.tsv`` and (when the features were standardised)
    ``feature_scaling.safetensors``: the training split's mean and std."""
    write_fold_folder(
        out_dir,
        method=method,
        predictions=predictions,
        metrics=metrics,
        resolved=resolved,
        model=model,
        model_metadata={"model": resolved["model"]},
        history=history,
        tables={"attention.tsv": attention},
        tensors={"feature_scaling.safetensors": scaling} if scaling is not None else None,
    )
