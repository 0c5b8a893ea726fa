"""Collect per-fold ``metrics.tsv`` files into a method's long-format ``fold_all.tsv``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mmdiag.io import read_tsv

FOLD_ALL_COLUMNS = ["method", "variant", "fold", "metric", "value"]


def aggregate_fold_metrics(metric_files: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate per-fold metric tables and check that the result is complete.

    Every (variant, fold) pair must report the same set of metrics, every variant must cover
    the same folds, and no (variant, fold, metric) may appear twice; otherwise ``ValueError``.
    """
    frames = []
    for path in metric_files:
        frame = read_tsv(path)
        missing = set(FOLD_ALL_COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        frames.append(frame[FOLD_ALL_COLUMNS])
    if not frames:
        raise ValueError("no metrics files to aggregate")
    table = pd.concat(frames, ignore_index=True)
    duplicated = table.duplicated(["method", "variant", "fold", "metric"])
    if duplicated.any():
        raise ValueError(f"duplicate rows in fold metrics:\n{table[duplicated]}")
    metrics_per_cell = table.groupby(["variant", "fold"])["metric"].apply(frozenset)
    if metrics_per_cell.nunique() != 1:
        raise ValueError(f"folds report different metrics:\n{metrics_per_cell}")
    folds_per_variant = table.groupby("variant")["fold"].apply(frozenset)
    if folds_per_variant.nunique() != 1:
        raise ValueError(f"variants cover different folds:\n{folds_per_variant}")
    return table.sort_values(["method", "variant", "fold", "metric"], ignore_index=True)
