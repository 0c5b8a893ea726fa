"""The folder every per-fold trainer writes: ``results/{method}/{variant}/fold_{k}/``.

``model.safetensors`` (trained variants), ``predictions.tsv``, ``metrics.tsv`` (long format:
method, variant, fold, metric, value), ``train_log.tsv``, ``config.yaml`` (resolved settings,
versions, input checksums) and any method-specific tables or tensors, written together under a
temporary name and renamed: the folder is complete or absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from mmdiag.io import atomic_path, safetensors_metadata, write_tsv, write_yaml


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
    model_metadata: Mapping | None = None,
    history: Sequence[Mapping] = (),
    tables: Mapping[str, pd.DataFrame] | None = None,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Write one fold's folder atomically; ``tables``/``tensors`` map extra file names to
    a TSV's frame or a safetensors file's tensors."""
    fold, variant = int(predictions["fold"].iloc[0]), str(predictions["variant"].iloc[0])
    with atomic_path(out_dir, is_dir=True) as tmp:
        if model is not None:
            metadata = safetensors_metadata(**dict(model_metadata or {}))
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
