"""Train and evaluate one CMUS variant on one fold, and write the fold's files.

Side effects: writes, atomically, the folder ``results/cmus/{variant}/fold_{k}/`` holding
``model.safetensors``, ``predictions.tsv``, ``metrics.tsv``, ``train_log.tsv`` and
``config.yaml`` (the resolved settings, library versions and input checksums).
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_model

import mmdiag
from mmdiag.data.manifest import read_manifest
from mmdiag.data.splits import load_splits
from mmdiag.evaluation.metrics import classification_metrics
from mmdiag.io import atomic_path, sha256_file, write_tsv, write_yaml
from mmdiag.models import create_model
from mmdiag.training.cmus_data import collate_patients, load_patient_samples
from mmdiag.training.loop import TrainSettings, predict_proba, train_model

log = logging.getLogger(__name__)

TASK_CLASSES_KEY = {"disease": "classes", "mn_stage": "stages"}


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
) -> dict[str, float]:
    """Train ``variant`` on fold ``fold`` and write its outputs to ``out_dir``; return metrics."""
    started = time.perf_counter()
    task = method_settings["task"]
    classes = list(manifest_rules[TASK_CLASSES_KEY[task]])
    variant_settings = dict(method_settings["variants"][variant])
    preprocess = method_settings["preprocess"]
    train_settings = TrainSettings(
        **{k: v for k, v in method_settings["train"].items() if k != "num_threads"}
    )

    manifest = read_manifest(manifest_path)
    split = _fold_of(load_splits(splits_path), fold, splits_path)
    load = functools.partial(
        load_patient_samples,
        manifest,
        label_column=task,
        classes=classes,
        image_size_px=preprocess["image_size_px"],
        tem_legend_px=preprocess["tem_legend_px"],
        max_tem_per_patient=preprocess["max_tem_per_patient"],
    )
    train, val, test = (load(split[part]) for part in ("train", "val", "test"))
    if not test:
        raise ValueError(f"{splits_path}: fold {fold} has an empty test set")

    torch.manual_seed(train_settings.seed)
    model_name = variant_settings.pop("model")
    model = create_model(model_name, num_classes=len(classes), **variant_settings)
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
    )
    device = next(model.parameters()).device
    prob, _ = predict_proba(
        model, test, collate, batch_size=train_settings.batch_size, device=device
    )
    y_true = [s.label for s in test]
    metrics = classification_metrics(y_true, prob.numpy(), n_classes=len(classes))

    predictions = pd.DataFrame(
        {
            "patient_id": [s.patient_id for s in test],
            "fold": fold,
            "variant": variant,
            "y_true": y_true,
            "y_pred": prob.argmax(1).numpy(),
        }
    )
    for k, name in enumerate(classes):
        predictions[f"prob_{name}"] = prob[:, k].numpy()
    metric_rows = pd.DataFrame(
        [
            {"method": method, "variant": variant, "fold": fold, "metric": m, "value": v}
            for m, v in metrics.items()
        ]
    )
    resolved = {
        "method": method,
        "variant": variant,
        "fold": fold,
        "model": model_name,
        "classes": classes,
        "method_settings": dict(method_settings),
        "inputs": {
            "manifest": {"path": str(manifest_path), "sha256": sha256_file(manifest_path)},
            "splits": {"path": str(splits_path), "sha256": sha256_file(splits_path)},
        },
        "n_patients": {"train": len(train), "val": len(val), "test": len(test)},
        "versions": {
            "mmdiag": mmdiag.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_model(
            model.cpu(),
            str(tmp / "model.safetensors"),
            metadata={"model": model_name, "classes": ",".join(classes)},
        )
        write_tsv(predictions, tmp / "predictions.tsv")
        write_tsv(metric_rows, tmp / "metrics.tsv")
        write_tsv(pd.DataFrame(history), tmp / "train_log.tsv")
        write_yaml(resolved, tmp / "config.yaml")
    summary = " ".join(f"{m}={v:.3f}" for m, v in metrics.items())
    log.info(
        "%s/%s fold %d: %d train, %d test patients, %s (%.1f s)",
        method,
        variant,
        fold,
        len(train),
        len(test),
        summary,
        time.perf_counter() - started,
    )
    return metrics


def _collate(samples, generator, *, mean, std):
    return collate_patients(samples, mean=mean, std=std, augment_generator=generator)


def _fold_of(splits: Mapping, fold: int, path: Path) -> Mapping:
    for entry in splits["folds"]:
        if entry["fold"] == fold:
            return entry
    available = [entry["fold"] for entry in splits["folds"]]
    raise ValueError(f"{path}: no fold {fold}; folds available: {available}")
