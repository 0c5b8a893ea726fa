"""The folder every per-fold trainer writes: ``results/{method}/{variant}/fold_{k}/``.

Three pieces every method shares, so that the files of a fold have one shape whichever method
made them:

- :func:`predictions_frame`: ``predictions.tsv``, one row per test case with the columns of
  ``DESIGN.md`` (``patient_id, fold, variant, y_true, y_pred, prob_<class>...``; survival adds
  ``time, event, risk``), then any method-specific columns;
- :func:`multitask_predictions`/:func:`multitask_fold_metrics`: the same for a method with
  several task heads (a ``task`` column; metrics named ``<task>/<metric>``);
- :func:`provenance`: the fold's ``config.yaml``: the resolved settings, the library versions
  and the checksum of every input file;
- :func:`write_fold_folder`: ``model.safetensors`` (trained variants), ``predictions.tsv``,
  ``metrics.tsv`` (long format: method, variant, fold, metric, value), ``train_log.tsv``,
  ``config.yaml`` and any method-specific tables or tensors, written together under a
  temporary name and renamed: the folder is complete or absent.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file, save_model
from torch import nn

import mmdiag
from mmdiag.io import atomic_path, safetensors_metadata, sha256_path, write_tsv, write_yaml

#: The leading columns of every ``predictions.tsv``; ``prob_<class>`` columns follow.
PREDICTION_COLUMNS = ("patient_id", "fold", "variant", "y_true", "y_pred")
#: The columns a survival task adds after the probabilities.
SURVIVAL_COLUMNS = ("time", "event", "risk")


def predictions_frame(
    patient_ids: Sequence[str],
    *,
    fold: int,
    variant: str,
    y_true: Sequence[int],
    prob: np.ndarray | None = None,
    classes: Sequence[str] = (),
    y_pred: Sequence[int] | None = None,
    survival: Mapping[str, Sequence[float]] | None = None,
    extra: Mapping[str, Sequence] | None = None,
) -> pd.DataFrame:
    """``predictions.tsv`` rows, one per test case.

    ``prob`` (n, K) gives one ``prob_<class>`` column per class; ``y_pred`` defaults to its
    arg-max. ``survival`` holds ``time``, ``event`` and ``risk`` for survival tasks; ``extra``
    adds method-specific columns (e.g. CS-MIL's median and max bag scores) at the end.
    """
    n = len(patient_ids)
    if prob is not None:
        prob = np.asarray(prob, dtype=np.float64)
        if prob.shape != (n, len(classes)):
            raise ValueError(f"prob has shape {prob.shape}; expected ({n}, {len(classes)})")
    if y_pred is None:
        if prob is None:
            raise ValueError("give y_pred or prob")
        y_pred = prob.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "patient_id": [str(p) for p in patient_ids],
            "fold": int(fold),
            "variant": variant,
            "y_true": np.asarray(y_true, dtype=int),
            "y_pred": np.asarray(y_pred, dtype=int),
        }
    )
    for k, name in enumerate(classes if prob is not None else ()):
        frame[f"prob_{name}"] = prob[:, k]
    if survival is not None:
        missing = sorted(set(SURVIVAL_COLUMNS) - set(survival))
        if missing:
            raise ValueError(f"survival predictions lack {missing}")
        for column in SURVIVAL_COLUMNS:
            frame[column] = np.asarray(survival[column], dtype=np.float64)
    for column, values in (extra or {}).items():
        frame[column] = list(values)
    return frame


def fold_metrics(
    predictions: pd.DataFrame, classes: Sequence[str], names: Sequence[str]
) -> dict[str, float]:
    """The metrics ``names`` of a fold, from its ``predictions.tsv`` rows, for every variant
    the same way: label metrics (ACC, PRE, ...) from ``y_pred``, AUC and AP from the
    ``prob_<class>`` columns, the C-index from ``time``, ``event`` and ``risk``.

    So ``metrics.tsv`` can always be recomputed from ``predictions.tsv``, whether ``y_pred`` is
    the arg-max of the probabilities, a majority vote or a threshold.
    """
    from mmdiag.evaluation.metrics import compute_metrics

    survival = {c: predictions[c].to_numpy() for c in SURVIVAL_COLUMNS if c in predictions}
    return compute_metrics(
        names,
        predictions["y_true"].to_numpy(),
        prob=predictions[[f"prob_{c}" for c in classes]].to_numpy(),
        y_pred=predictions["y_pred"].to_numpy(),
        n_classes=len(classes),
        **survival,
    )


def multitask_predictions(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One ``predictions.tsv`` for several tasks: each task's rows (from
    :func:`predictions_frame`, with that task's ``prob_<class>`` columns) with a ``task``
    column after ``variant``; a class column another task lacks is empty."""
    tagged = []
    for name, frame in frames.items():
        frame = frame.copy()
        frame.insert(PREDICTION_COLUMNS.index("variant") + 1, "task", name)
        tagged.append(frame)
    return pd.concat(tagged, ignore_index=True)


def multitask_fold_metrics(
    predictions: pd.DataFrame, tasks: Sequence, names: Sequence[str] | None = None
) -> dict[str, float]:
    """Each task's metrics (``names``, else the task's own :attr:`~mmdiag.data.Task.metrics`)
    from its rows of a multi-task ``predictions.tsv``, named ``<task>/<metric>``.

    Cases without the task's label (``y_true`` is ``MISSING``, -1) are left out of it.
    """
    metrics = {}
    for task in tasks:
        rows = predictions[(predictions["task"] == task.name) & (predictions["y_true"] >= 0)]
        if rows.empty:
            raise ValueError(f"no labelled predictions of task {task.name!r}")
        scores = fold_metrics(rows, task.classes, names or task.metrics)
        metrics |= {f"{task.name}/{metric}": value for metric, value in scores.items()}
    return metrics


def provenance(
    *,
    method: str,
    variant: str,
    fold: int,
    method_settings: Mapping,
    classes: Sequence[str],
    inputs: Mapping[str, Path | str],
    n_cases: Mapping[str, int] | None = None,
    **extra,
) -> dict:
    """A fold's ``config.yaml``: what ran, on what, with which versions.

    ``inputs`` maps a name to each input file or folder; each gets its path and checksum
    (:func:`mmdiag.io.sha256_path`). ``extra`` adds method-specific fields at the end.
    """
    return {
        "method": method,
        "variant": variant,
        "fold": int(fold),
        "model": method_settings["variants"][variant]["model"],
        "classes": list(classes),
        "method_settings": dict(method_settings),
        "inputs": {
            name: {"path": str(path), "sha256": sha256_path(path)} for name, path in inputs.items()
        },
        "n_cases": dict(n_cases) if n_cases is not None else None,
        "versions": {
            "mmdiag": mmdiag.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        **extra,
    }


def metric_rows(method: str, variant: str, fold: int, metrics: Mapping) -> pd.DataFrame:
    """``metrics.tsv``: one row per metric."""
    return pd.DataFrame(
        [
            {"method": method, "variant": variant, "fold": fold, "metric": name, "value": value}
            for name, value in metrics.items()
        ]
    )


def write_fold_folder(
    out_dir: Path,
    *,
    method: str,
    predictions: pd.DataFrame,
    metrics: Mapping[str, float],
    resolved: Mapping,
    model: nn.Module | None = None,
    history: Sequence[Mapping] = (),
    tables: Mapping[str, pd.DataFrame] | None = None,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Write one fold's folder atomically.

    ``resolved`` is the fold's :func:`provenance`; the checkpoint's metadata records its model
    and classes. ``tables``/``tensors`` map extra file names to a TSV's frame or a safetensors
    file's tensors.
    """
    fold, variant = int(predictions["fold"].iloc[0]), str(predictions["variant"].iloc[0])
    with atomic_path(out_dir, is_dir=True) as tmp:
        if model is not None:
            metadata = safetensors_metadata(
                model=resolved.get("model"), classes=list(resolved.get("classes", []))
            )
            save_model(model.cpu(), str(tmp / "model.safetensors"), metadata=metadata)
        write_tsv(predictions, tmp / "predictions.tsv")
        write_tsv(metric_rows(method, variant, fold, metrics), tmp / "metrics.tsv")
        write_tsv(
            pd.DataFrame(list(history), columns=None if history else ["epoch"]),
            tmp / "train_log.tsv",
        )
        for name, frame in (tables or {}).items():
            write_tsv(frame, tmp / name)
        for name, values in (tensors or {}).items():
            save_file(dict(values), str(tmp / name))
        write_yaml(dict(resolved), tmp / "config.yaml")
