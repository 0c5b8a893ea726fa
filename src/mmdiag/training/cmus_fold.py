"""Train and evaluate one CMUS variant on one fold, and write the fold's files.

Side effects: writes, atomically, the folder ``results/{method}/{variant}/fold_{k}/`` holding
``model.safetensors`` (trained variants), ``predictions.tsv``, ``metrics.tsv``,
``train_log.tsv`` and ``config.yaml`` (the resolved settings, library versions and input
checksums).

Started by ``torchrun --nproc-per-node N`` (the workflow does so for jobs given several GPUs),
the fold trains data-parallel on N processes (see :mod:`mmdiag.training.loop`); every process
computes the same predictions and metrics, and only the first writes the fold folder.
"""

from __future__ import annotations

import functools
import inspect
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import mmdiag
from mmdiag.data.manifest import read_manifest
from mmdiag.data.splits import load_splits
from mmdiag.evaluation.metrics import classification_metrics
from mmdiag.io import sha256_file
from mmdiag.models import create_model
from mmdiag.models.cmus import CMUSConcat, CMUSNet
from mmdiag.training.cmus_data import collate_patients, load_patient_samples
from mmdiag.training.distributed import DistContext, init_distributed, shutdown
from mmdiag.training.fold_outputs import write_fold_folder
from mmdiag.training.loop import TrainSettings, predict_proba, train_model

log = logging.getLogger(__name__)

TASK_CLASSES_KEY = {"disease": "classes", "mn_stage": "stages"}
MODEL_CLASSES = {"cmus_net": CMUSNet, "cmus_concat": CMUSConcat}


def task_classes(method_settings: Mapping, manifest_rules: Mapping) -> list[str]:
    """Class names of the method's task (diseases, or MN stages)."""
    return list(manifest_rules[TASK_CLASSES_KEY[method_settings["task"]]])


def model_arguments(model_name: str, variant_settings: Mapping) -> dict:
    """The variant's settings that the model's constructor takes (the rest is for the runner)."""
    accepted = inspect.signature(MODEL_CLASSES[model_name].__init__).parameters
    return {k: v for k, v in variant_settings.items() if k in accepted and k != "num_classes"}


def train_settings_of(method_settings: Mapping, variant: str) -> TrainSettings:
    """The method's training settings with the variant's overrides."""
    options = method_settings["train"] | method_settings["variants"][variant].get("train", {})
    return TrainSettings(**{k: v for k, v in options.items() if k != "num_threads"})


def read_crop_boxes(glomeruli_path: Path | None) -> dict[str, tuple[int, int, int, int]] | None:
    """OM path -> glomerulus crop box, from the segmentation step's table."""
    if glomeruli_path is None:
        return None
    table = pd.read_csv(glomeruli_path, sep="\t")
    columns = ["crop_x0", "crop_y0", "crop_x1", "crop_y1"]
    return {row.path: tuple(int(v) for v in row[columns]) for _, row in table.iterrows()}


def run_cmus_fold(
    *,
    manifest_path: Path,
    splits_path: Path,
    fold: int,
    variant: str,
    method_settings: Mapping,
    manifest_rules: Mapping,
    out_dir: Path,
    method: str = "cmus",
    glomeruli_path: Path | None = None,
) -> dict[str, float]:
    """Train ``variant`` on fold ``fold`` and write its outputs to ``out_dir``; return metrics.

    Under torchrun every process returns the metrics; only the first writes ``out_dir``.
    """
    context = init_distributed(train_settings_of(method_settings, variant).device)
    try:
        _share_cpu_threads(context)
        return _train_and_write_fold(
            context,
            manifest_path=manifest_path,
            splits_path=splits_path,
            fold=fold,
            variant=variant,
            method_settings=method_settings,
            manifest_rules=manifest_rules,
            out_dir=out_dir,
            method=method,
            glomeruli_path=glomeruli_path,
        )
    finally:
        shutdown(context)


def _share_cpu_threads(context: DistContext) -> None:
    """The job's CPU threads are shared by its processes."""
    if context.is_distributed:
        torch.set_num_threads(max(1, torch.get_num_threads() // context.world_size))


def _train_and_write_fold(
    context: DistContext,
    *,
    manifest_path: Path,
    splits_path: Path,
    fold: int,
    variant: str,
    method_settings: Mapping,
    manifest_rules: Mapping,
    out_dir: Path,
    method: str,
    glomeruli_path: Path | None,
) -> dict[str, float]:
    started = time.perf_counter()
    task = method_settings["task"]
    classes = task_classes(method_settings, manifest_rules)
    variant_settings = method_settings["variants"][variant]
    preprocess = method_settings["preprocess"]
    train_settings = train_settings_of(method_settings, variant)

    split = _fold_of(load_splits(splits_path), fold, splits_path)
    use_crops = preprocess.get("om_glomerulus_crop", False) and glomeruli_path is not None
    load = functools.partial(
        load_patient_samples,
        read_manifest(manifest_path),
        label_column=task,
        classes=classes,
        image_size_px=preprocess["image_size_px"],
        tem_legend_px=preprocess["tem_legend_px"],
        max_tem_per_patient=preprocess["max_tem_per_patient"],
        om_crop_boxes=read_crop_boxes(glomeruli_path) if use_crops else None,
    )
    train, val, test = (load(split[part]) for part in ("train", "val", "test"))
    if not test:
        raise ValueError(f"{splits_path}: fold {fold} has an empty test set")

    torch.manual_seed(train_settings.seed)
    model_name = variant_settings["model"]
    model = create_model(
        model_name, num_classes=len(classes), **model_arguments(model_name, variant_settings)
    )
    collate = functools.partial(
        _collate, mean=preprocess["normalise_mean"], std=preprocess["normalise_std"]
    )
    history = train_model(
        model,
        train,
        collate,
        train_settings,
        val_samples=val,
        description=f"{method}/{variant}/fold {fold}",
        context=context,
    )
    prob, _ = predict_proba(
        model,
        test,
        collate,
        batch_size=train_settings.batch_size,
        device=context.device,
        context=context,
    )
    predictions = predictions_frame(
        [s.patient_id for s in test],
        [s.label for s in test],
        prob.numpy(),
        classes,
        fold=fold,
        variant=variant,
    )
    inputs = {"manifest": manifest_path, "splits": splits_path}
    if use_crops:
        inputs["glomeruli"] = glomeruli_path
    resolved = _resolved_config(
        method,
        variant,
        fold,
        classes,
        method_settings,
        inputs,
        n_patients={"train": len(train), "val": len(val), "test": len(test)},
    )
    if not context.is_main:
        return fold_metrics(predictions, classes)
    metrics = write_fold_outputs(
        out_dir,
        predictions,
        classes,
        method=method,
        model=model,
        history=history,
        resolved=resolved | {"n_processes": context.world_size},
    )
    log.info(
        "%s/%s fold %d: %d train, %d test patients, %d process(es), %s (%.1f s)",
        method,
        variant,
        fold,
        len(train),
        len(test),
        context.world_size,
        _metrics_text(metrics),
        time.perf_counter() - started,
    )
    return metrics


def majority_vote(
    member_predictions: Sequence[pd.DataFrame], classes: Sequence[str]
) -> pd.DataFrame:
    """Late fusion of unimodal models (Fig. 5): majority vote of their predicted classes.

    The probabilities are the members' mean (they give the AUC); a patient whose members all
    disagree takes the class of the highest mean probability. Members must cover the same
    patients with the same labels.
    """
    prob_columns = [f"prob_{c}" for c in classes]
    key = ["patient_id", "fold"]
    frames = [m.sort_values(key).reset_index(drop=True) for m in member_predictions]
    first = frames[0]
    for other in frames[1:]:
        if not first[key + ["y_true"]].equals(other[key + ["y_true"]]):
            raise ValueError("vote members do not cover the same patients with the same labels")
    mean_prob = np.mean([f[prob_columns].to_numpy() for f in frames], axis=0)
    votes = np.stack([f["y_pred"].to_numpy() for f in frames], axis=1)
    counts = np.stack([(votes == k).sum(axis=1) for k in range(len(classes))], axis=1)
    winners = counts == counts.max(axis=1, keepdims=True)
    # ties (no majority): the highest mean probability among the tied classes
    y_pred = np.where(winners, mean_prob, -np.inf).argmax(axis=1)
    voted = first[key + ["y_true"]].copy()
    voted["y_pred"] = y_pred
    voted[prob_columns] = mean_prob
    return voted


def run_vote_fold(
    *,
    member_predictions: Mapping[str, Path],
    fold: int,
    variant: str,
    method_settings: Mapping,
    manifest_rules: Mapping,
    out_dir: Path,
    method: str = "cmus",
) -> dict[str, float]:
    """Write the fold outputs of a ``late_vote`` variant from its members' predictions."""
    classes = task_classes(method_settings, manifest_rules)
    members = [pd.read_csv(path, sep="\t") for path in member_predictions.values()]
    voted = majority_vote(members, classes)
    predictions = predictions_frame(
        voted["patient_id"].tolist(),
        voted["y_true"].to_numpy(),
        voted[[f"prob_{c}" for c in classes]].to_numpy(),
        classes,
        fold=fold,
        variant=variant,
        y_pred=voted["y_pred"].to_numpy(),
    )
    resolved = _resolved_config(method, variant, fold, classes, method_settings, member_predictions)
    metrics = write_fold_outputs(out_dir, predictions, classes, method=method, resolved=resolved)
    log.info(
        "%s/%s fold %d (vote of %s): %s",
        method,
        variant,
        fold,
        ", ".join(member_predictions),
        _metrics_text(metrics),
    )
    return metrics


def predictions_frame(
    patient_ids: Sequence[str],
    y_true: Sequence[int],
    prob: np.ndarray,
    classes: Sequence[str],
    *,
    fold: int,
    variant: str,
    y_pred: Sequence[int] | None = None,
) -> pd.DataFrame:
    """``predictions.tsv`` rows: patient_id, fold, variant, y_true, y_pred, prob_<class>..."""
    frame = pd.DataFrame(
        {
            "patient_id": list(patient_ids),
            "fold": fold,
            "variant": variant,
            "y_true": np.asarray(y_true, dtype=int),
            "y_pred": np.asarray(prob).argmax(axis=1) if y_pred is None else np.asarray(y_pred),
        }
    )
    for k, name in enumerate(classes):
        frame[f"prob_{name}"] = np.asarray(prob)[:, k]
    return frame


def fold_metrics(predictions: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    """The classification metrics of a fold's predictions."""
    prob = predictions[[f"prob_{c}" for c in classes]].to_numpy()
    return classification_metrics(predictions["y_true"].to_numpy(), prob, n_classes=len(classes))


def write_fold_outputs(
    out_dir: Path,
    predictions: pd.DataFrame,
    classes: Sequence[str],
    *,
    method: str,
    resolved: Mapping,
    model: nn.Module | None = None,
    history: Sequence[Mapping] = (),
) -> dict[str, float]:
    """Compute the metrics and write the fold folder atomically; return the metrics."""
    metrics = fold_metrics(predictions, classes)
    write_fold_folder(
        out_dir,
        method=method,
        predictions=predictions,
        metrics=metrics,
        resolved=resolved,
        model=model,
        model_metadata={"model": resolved.get("model"), "classes": list(classes)},
        history=history,
    )
    return metrics


def _resolved_config(method, variant, fold, classes, method_settings, inputs, n_patients=None):
    return {
        "method": method,
        "variant": variant,
        "fold": fold,
        "model": method_settings["variants"][variant]["model"],
        "classes": list(classes),
        "method_settings": dict(method_settings),
        "inputs": {
            name: {"path": str(path), "sha256": sha256_file(path)} for name, path in inputs.items()
        },
        "n_patients": n_patients,
        "versions": {
            "mmdiag": mmdiag.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
    }


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{m}={v:.3f}" for m, v in metrics.items())


def _collate(samples, generator, *, mean, std):
    return collate_patients(samples, mean=mean, std=std, augment_generator=generator)


def _fold_of(splits: Mapping, fold: int, path: Path) -> Mapping:
    for entry in splits["folds"]:
        if entry["fold"] == fold:
            return entry
    available = [entry["fold"] for entry in splits["folds"]]
    raise ValueError(f"{path}: no fold {fold}; folds available: {available}")
