"""A synthetic TET cohort written, listed in a manifest and patched, for MHD-Net's tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mmdiag.data import ManifestRules, build_manifest
from mmdiag.data.manifest import write_manifest
from mmdiag.patching.pipeline import patch_slide
from mmdiag.synth.tet import TetSettings, write_tet_cohort
from tests.patching_settings import patching_settings


def write_patched_tet_cohort(root: Path, settings: TetSettings, rules: Mapping) -> pd.DataFrame:
    """Write the cohort under ``root/raw``, its manifest ``root/manifest.tsv`` and every
    slide's patch store ``root/patches/{image_id}.zarr``; return the manifest."""
    write_tet_cohort(root / "raw", settings)
    manifest = build_manifest(cohort_root=root / "raw", rules=ManifestRules.from_config(rules))
    write_manifest(manifest, root / "manifest.tsv")
    for row in manifest[manifest["modality"] == "WSI"].itertuples():
        name = Path(row.image_id)
        patch_slide(
            Path(row.path),
            patching_settings(workers=1),
            store_path=root / "patches" / f"{row.image_id}.zarr",
            mask_path=root / "masks" / name.with_suffix(".png"),
            qc_path=root / "qc" / name.with_suffix(".png"),
            progress=False,
        )
    return manifest
