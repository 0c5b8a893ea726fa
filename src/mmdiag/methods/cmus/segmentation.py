"""CMUS-Net's OM glomerulus step: the segmentation stage run with a method's settings.

Side effects: writes ``masks/``, ``qc/`` and ``glomeruli.tsv`` (crop boxes) under ``out_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mmdiag.data.manifest import read_manifest
from mmdiag.io import write_tsv
from mmdiag.segment import segment_cohort

log = logging.getLogger(__name__)


def segment_glomeruli(manifest_path: Path, out_dir: Path, segmentation: Mapping) -> pd.DataFrame:
    """Segment the glomerulus of every OM image of a manifest (``methods.<m>.segmentation``):
    SAM with a checkpoint, else the classical detector's mask; return the crop table."""
    table = segment_cohort(
        read_manifest(manifest_path),
        out_dir,
        prompts_tsv=_optional_path(segmentation["prompts"]),
        sam_checkpoint=_optional_path(segmentation["sam_checkpoint"]),
        sam_model_type=segmentation["sam_model_type"],
        crop_margin=segmentation["crop_margin"],
    )
    write_tsv(table, Path(out_dir) / "glomeruli.tsv")
    log.info(
        "segmented %d OM images (%s) into %s",
        len(table),
        ", ".join(f"{k} {v}" for k, v in table["method"].value_counts().items()),
        out_dir,
    )
    return table


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None
