"""The `patching` settings of config/config.yaml, for tests that call the patching stage."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

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
