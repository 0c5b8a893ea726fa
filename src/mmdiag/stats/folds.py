"""Aggregation over cross-validation folds: mean and sample standard deviation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FoldSummary:
    """Mean and sample standard deviation (``ddof=1``) of ``n`` per-fold values."""

    mean: float
    std: float
    n: int


def fold_mean_std(values: Sequence[float]) -> FoldSummary:
    """Mean ± sample standard deviation over folds, as the papers' tables report.

    Parameters
    ----------
    values
        One value per fold; NaN values are rejected.

    Returns
    -------
    FoldSummary
        ``std`` is ``nan`` for a single fold (a sample standard deviation needs two).

    Notes
    -----
    std = sqrt(sum((x_i - mean)^2) / (n - 1)).

    Examples
    --------
    >>> summary = fold_mean_std([0.9, 0.8, 1.0])
    >>> print(f"{summary.mean:.3f} ± {summary.std:.3f} (n = {summary.n})")
    0.900 ± 0.100 (n = 3)
    """
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"values contain NaN: {array.tolist()}")
    std = float(np.std(array, ddof=1)) if array.size > 1 else float("nan")
    return FoldSummary(mean=float(array.mean()), std=std, n=int(array.size))
