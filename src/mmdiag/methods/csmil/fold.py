"""Train and test one CS-MIL variant on one split, from the cohort's features and clusters.

Per split (paper, Sec. 4): a model is trained on bags drawn from the training slides' patches
(evenly from each patient's phenotype clusters, :mod:`mmdiag.methods.csmil.bags`) with Adam
(lr 5e-4, weight decay 1e-4) and binary cross-entropy; after every epoch the loss on fixed
validation bags is measured and the weights of the epoch with the lowest validation loss are
kept (the last epoch's when the split has no validation part). Each test slide is scored by
the mean probability of ``test_bags`` random bags (median and max are saved too), and the
instance and scale attention of the test bags is averaged per patch for attention maps.

Side effects: writes, atomically, ``out_dir`` = ``results/{method}/{variant}/fold_{k}/``
holding ``model.safetensors``, ``predictions.tsv``, ``metrics.tsv`` (ACC, AUC, AP, ...),
``train_log.tsv``, ``attention.tsv`` and ``config.yaml``.

Training saves its state after every epoch (weights, Adam's moments, the kept best weights,
the bag-drawing generator and the log; :mod:`mmdiag.training.resume`) in the hidden folder
``.fold_{k}.resume`` beside the fold folder; a rerun after a kill continues after the last
saved epoch with the result of an uninterrupted run, and the folder is removed once the fold
folder is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmdiag.data.splits import load_fold, training_seed
from mmdiag.evaluation.metrics import CLASSIFICATION_METRICS
from mmdiag.io import sha256_path
from mmdiag.methods.csmil.bags import aggregate_bag_probabilities, collate_bags, sample_bags
from mmdiag.methods.csmil.data import Slide, load_slides, standardise
from mmdiag.methods.csmil.settings import binary_classes, cluster_column, stratified_bags
from mmdiag.models import create_model
from mmdiag.training.fold_outputs import (
    fold_metrics,
    predictions_frame,
    provenance,
    write_fold_folder,
)
from mmdiag.training.resume import (
    EpochState,
    TrainerParts,
    clear_state,
    fingerprint,
    state_dir_beside,
    training_settings,
    weights_digest,
)

log = logging.getLogger(__name__)

#: What CS-MIL reports per split: AUC and AP (Tables 1-5), with the macro metrics beside them.
METRICS = (*CLASSIFICATION_METRICS, "AP")


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
    resume_dir: Path | None = None,
    resume_key: Mapping | None = None,
    description: str = "CS-MIL",
) -> list[dict]:
    """Train in place, keep the lowest-validation-loss weights; return the epoch log.

    With ``resume_dir`` the state is saved there after every epoch and a saved state of the
    same run (settings, cases, initial weights, ``rng``'s state and ``resume_key``) is resumed;
    ``rng`` then continues from the saved epoch, so what the caller draws next is unchanged.
    """
    train_settings, bag_settings = settings["train"], settings["bags"]
    key = ""
    if resume_dir is not None:
        key = _fingerprint(model, train, val, settings, rng, stratified, resume_key)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=train_settings["lr"], weight_decay=train_settings["weight_decay"]
    )
    size = bag_settings["size"]
    val_bags = [
        draw_bags(s, bag_settings["val_bags"], size, rng, stratified=stratified) for s in val
    ]
    parts = TrainerParts(model, optimiser, numpy_rngs={"bags": rng})
    state = EpochState(resume_dir, key, parts, description=description)
    best = _BestEpoch()
    history = state.restore_history(best)
    for epoch in range(len(history) + 1, train_settings["epochs"] + 1):
        started = time.perf_counter()
        loss = _train_epoch(model, optimiser, train, settings, rng, stratified)
        row = {"epoch": epoch, "train_loss": loss}
        if val:
            row["val_loss"] = validation_loss(model, val, val_bags, batch_size=64)
            if best.update(row["val_loss"], model):
                row["selected"] = True
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        state.save(history, extra=best.values(), extra_tensors=best.tensors())
    if best.state is not None:
        model.load_state_dict(best.state)
    return history


def _train_epoch(model, optimiser, train, settings: Mapping, rng, stratified: bool) -> float:
    """One epoch on freshly drawn bags, in an order drawn from ``rng``; the mean loss."""
    bag_settings, batch_size = settings["bags"], settings["train"]["batch_size"]
    items = [
        (slide, bag)
        for slide in train
        for bag in draw_bags(
            slide,
            bag_settings["train_bags_per_slide"],
            bag_settings["size"],
            rng,
            stratified=stratified,
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
        clip_gradients = getattr(model, "clip_gradients", None)
        if clip_gradients is not None:  # a model's own clipping (DTFD-MIL's, per module)
            clip_gradients()
        optimiser.step()
        loss_sum += loss.item() * len(chosen)
    return loss_sum / len(items)


class _BestEpoch:
    """The lowest validation loss so far and a copy of its weights."""

    def __init__(self) -> None:
        self.loss = float("inf")
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, loss: float, model: nn.Module) -> bool:
        """Keep the weights when ``loss`` is the lowest so far; whether it was."""
        if not loss < self.loss:
            return False
        self.loss = loss
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def values(self) -> dict:
        return {"best_loss": self.loss}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {} if self.state is None else {"best": self.state}

    def load(self, values: Mapping, state: dict[str, torch.Tensor] | None) -> None:
        self.loss, self.state = float(values["best_loss"]), state


def _fingerprint(model, train, val, settings: Mapping, rng, stratified, resume_key) -> str:
    """What identifies a CS-MIL training run for resuming."""
    return fingerprint(
        {
            "trainer": "csmil",
            "train_settings": settings["train"],
            "bags": settings["bags"],
            "stratified": stratified,
            "cases": {"train": [s.case_id for s in train], "val": [s.case_id for s in val]},
            "initial_weights": weights_digest(model),
            "rng": rng.bit_generator.state,
            "key": resume_key,
        }
    )


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
    stratified = stratified_bags(spec)
    classes = binary_classes(classes, method_settings["positive_class"])
    slides = load_slides(
        manifest_path,
        feature_paths,
        clusters_path,
        method_settings["positive_class"],
        cluster_column=cluster_column(spec),
        unit=method_settings["unit"],
    )
    parts = _split_parts(splits_path, fold, slides)
    scaling = None
    if method_settings["standardise_features"]:
        parts, mean, std = standardise(parts)
        scaling = {"feature_mean": torch.from_numpy(mean), "feature_std": torch.from_numpy(std)}
    # a seed-repeated split trains the same partition with seeds seed, seed+1, ...
    seed = training_seed(load_fold(splits_path, fold), method_settings["train"]["seed"])
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, fold])
    in_dim = next(iter(slides.values())).features.shape[-1]
    model = create_model(spec["model"], in_dim=in_dim, **spec["options"])
    inputs = {
        "manifest": manifest_path,
        "splits": splits_path,
        "clusters": clusters_path,
        **{f"features:{p}": p for p in feature_paths},
    }
    state_dir = state_dir_beside(out_dir)
    history = train_variant(
        model,
        parts["train"],
        parts["val"],
        method_settings,
        rng,
        stratified=stratified,
        resume_dir=state_dir,
        resume_key={
            "method": method,
            "variant": variant,
            "fold": fold,
            "method_settings": training_settings(method_settings, variant),
            "inputs": {name: sha256_path(path) for name, path in inputs.items()},
        },
        description=f"{method}/{variant}/fold {fold}",
    )
    scores, attention = test_variant(
        model, parts["test"], method_settings, rng, stratified=stratified
    )
    predictions = slide_predictions(parts["test"], scores, fold, variant, classes)
    metrics = fold_metrics(predictions, classes, METRICS)
    resolved = provenance(
        method=method,
        variant=variant,
        fold=fold,
        method_settings=method_settings,
        classes=classes,
        inputs=inputs,
        n_cases={k: len(v) for k, v in parts.items()},
        seconds=round(time.perf_counter() - started, 2),
    )
    write_fold_folder(
        out_dir,
        method=method,
        predictions=predictions,
        metrics=metrics,
        resolved=resolved,
        model=model,
        history=history,
        tables={"attention.tsv": attention},
        tensors={"feature_scaling.safetensors": scaling} if scaling is not None else None,
    )
    clear_state(state_dir)
    log.info(
        "%s %s fold %d: %s",
        method,
        variant,
        fold,
        " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    return metrics


def _split_parts(splits_path: Path, fold: int, slides: Mapping[str, Slide]):
    """The cases (slides, or pooled patients) of the split's train/val/test patients, in the
    split's patient order (validation patients may lack a slide)."""
    split = load_fold(splits_path, fold)
    cases_of: dict[str, list[Slide]] = {}
    for slide in slides.values():
        cases_of.setdefault(slide.patient_id, []).append(slide)
    parts = {}
    for part in ("train", "val", "test"):
        patients = split.get(part, [])
        missing = [p for p in patients if p not in cases_of]
        if missing and part != "val":
            raise ValueError(f"{splits_path}: {part} patients {missing[:5]} have no feature store")
        parts[part] = [case for p in patients for case in cases_of.get(p, [])]
    return parts


def slide_predictions(test, scores, fold: int, variant: str, classes) -> pd.DataFrame:
    """One row per test case (slide, or pooled patient; ``case_id``): the mean-bag
    probability, and the median and max bag scores.

    Threshold convention: ``y_pred`` is the positive class where its mean probability is at
    least 0.5 (a slide at exactly 0.5 is called positive); ACC, PRE, REC, SPE and F1 are
    computed from it, AUC and AP from the probability.
    """
    mean = np.array([s.mean for s in scores])
    return predictions_frame(
        [s.patient_id for s in test],
        fold=fold,
        variant=variant,
        y_true=[s.label for s in test],
        prob=np.column_stack([1 - mean, mean]),
        classes=classes,
        y_pred=(mean >= 0.5).astype(int),
        extra={
            "case_id": [s.case_id for s in test],
            "score_median": [s.median for s in scores],
            "score_max": [s.max for s in scores],
        },
    )
