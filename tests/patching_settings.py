"""The `patching` settings of config/config.yaml, for tests that call the patching stage."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import pandas as pd

from mmdiag.cli_support import default_config_files
from mmdiag.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@cache
def _defaults() -> dict:
    return load_config(default_config_files(ROOT))["patching"]


def patching_settings(**changes) -> dict:
    """A copy of the configured patching settings with ``changes`` applied (top-level keys)."""
    settings = copy.deepcopy(_defaults())
    unknown = set(changes) - set(settings)
    if unknown:
        raise KeyError(f"not patching settings: {sorted(unknown)}")
    return settings | changes


def slide_manifest_row(image_id: str, path: Path, mpp: float) -> dict:
    """A manifest row of one WSI for tests that patch slides without building a manifest
    (checksum and size left empty; ``mpp`` NaN reads the slide's own)."""
    return {
        "patient_id": image_id,
        "modality": "wsi",
        "image_id": image_id,
        "path": str(path),
        "sha256": "",
        "width_px": 0,
        "height_px": 0,
        "disease": "none",
        "mn_stage": "",
        "survival_months": float("nan"),
        "event": pd.NA,
        "mpp": mpp,
    }
