"""Train and evaluate one CMUS variant on one fold, and write the fold's files.

Side effects: writes, atomically, the folder ``results/{method}/{variant}/fold_{k}/`` holding
``model.safetensors`` (trained variants), ``predictions.tsv``, ``metrics.tsv``,
``train_log.tsv`` and ``config.yaml`` (the resolved settings, library versions and input
checksums), through :mod:`mmdiag.training.fold_outputs`.

Started by ``torchrun --nproc-per-node N`` (the workflow does so for jobs given several GPUs),
the fold trains data-parallel on N processes (see :mod:`mmdiag.training.loop`); every process
computes the same predictions and metrics, and only the first writes the fold folder.

Training saves its state after every epoch in the hidden folder ``.fold_{k}.resume`` beside the
fold folder (:func:`mmdiag.training.resume.state_dir_beside`); a rerun after a kill continues
after the last saved epoch, and the folder is removed once the fold folder is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmdiag.data.splits import load_fold, training_seed
from mmdiag.evaluation.metrics import CLASSIFICATION_METRICS
from mmdiag.io import read_tsv
from mmdiag.methods.cmus.data import batch_collator, patient_loader, uses_crops
from mmdiag.methods.cmus.settings import model_arguments, task_classes, train_settings_of
from mmdiag.models import create_model
from mmdiag.training.distributed import DistContext, init_distributed, shutdown
from mmdiag.training.fold_outputs import (
    fold_metrics,
    predictions_frame,
    provenance,
    write_fold_folder,
)
from mmdiag.training.loop import predict_proba, train_model
from mmdiag.training.resume import clear_state, fold_resume_key, state_dir_beside

log = logging.getLogger(__name__)

#: What CMUS-Net reports per fold (Section 4.2).
METRICS = CLASSIFICATION_METRICS


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

    ``manifest_rules`` are the method's cohort's (its classes). Under torchrun every process
    returns the metrics; only the first writes ``out_dir``.
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
            classes=task_classes(method_settings, manifest_rules),
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
    classes: Sequence[str],
    out_dir: Path,
    method: str,
    glomeruli_path: Path | None,
) -> dict[str, float]:
    started = time.perf_counter()
    variant_settings = method_settings["variants"][variant]
    split = load_fold(splits_path, fold)
    train_settings = train_settings_of(method_settings, variant)
    # a seed-repeated split trains the same partition with seeds seed, seed+1, ...
    train_settings = replace(train_settings, seed=training_seed(split, train_settings.seed))
    load = patient_loader(manifest_path, method_settings, classes, glomeruli_path)
    train, val, test = (load(split[part]) for part in ("train", "val", "test"))
    if not test:
        raise ValueError(f"{splits_path}: fold {fold} has an empty test set")

    torch.manual_seed(train_settings.seed)
    model_name = variant_settings["model"]
    model = create_model(
        model_name, num_classes=len(classes), **model_arguments(model_name, variant_settings)
    )
    collate = batch_collator(method_settings)
    inputs = {"manifest": manifest_path, "splits": splits_path}
    if uses_crops(method_settings, glomeruli_path):
        inputs["glomeruli"] = glomeruli_path
    state_dir = state_dir_beside(out_dir)
    history = train_model(
        model,
        train,
        collate,
        train_settings,
        val_samples=val,
        description=f"{method}/{variant}/fold {fold}",
        context=context,
        resume_dir=state_dir,
        resume_key=fold_resume_key(method, variant, fold, method_settings, inputs),
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
        fold=fold,
        variant=variant,
        y_true=[s.label for s in test],
        prob=prob.numpy(),
        classes=classes,
    )
    metrics = fold_metrics(predictions, classes, METRICS)
    if not context.is_main:
        return metrics
    resolved = provenance(
        method=method,
        variant=variant,
        fold=fold,
        method_settings=method_settings,
        classes=classes,
        inputs=inputs,
        n_cases={"train": len(train), "val": len(val), "test": len(test)},
        n_processes=context.world_size,
    )
    write_fold_folder(
        out_dir,
        method=method,
        predictions=predictions,
        metrics=metrics,
        resolved=resolved,
        model=model,
        history=history,
    )
    clear_state(state_dir)
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

    The vote is ``y_pred`` (it gives ACC, PRE, REC, SPE and F1); the probabilities are the
    members' mean (they give the AUC); a patient whose members all disagree takes the class of
    the highest mean probability. Members must cover the same patients with the same labels.
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
    voted = majority_vote([read_tsv(path) for path in member_predictions.values()], classes)
    predictions = predictions_frame(
        voted["patient_id"].tolist(),
        fold=fold,
        variant=variant,
        y_true=voted["y_true"].to_numpy(),
        prob=voted[[f"prob_{c}" for c in classes]].to_numpy(),
        classes=classes,
        y_pred=voted["y_pred"].to_numpy(),
    )
    metrics = fold_metrics(predictions, classes, METRICS)
    resolved = provenance(
        method=method,
        variant=variant,
        fold=fold,
        method_settings=method_settings,
        classes=classes,
        inputs=member_predictions,
        n_cases={"test": len(predictions)},
    )
    write_fold_folder(
        out_dir, method=method, predictions=predictions, metrics=metrics, resolved=resolved
    )
    log.info(
        "%s/%s fold %d (vote of %s): %s",
        method,
        variant,
        fold,
        ", ".join(member_predictions),
        _metrics_text(metrics),
    )
    return metrics


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{m}={v:.3f}" for m, v in metrics.items())
