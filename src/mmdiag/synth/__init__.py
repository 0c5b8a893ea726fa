"""Seeded synthetic cohorts written in the formats real instruments produce."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmdiag.synth.cohort import write_synthetic_cohort

__all__ = ["write_configured_cohort", "write_synthetic_cohort"]


def write_configured_cohort(
    out: Path, settings: Mapping, cohort: Mapping, *, progress: bool = True
) -> None:
    """Write the cohort a config describes: CS-MIL's toy slides for ``generator: toy_mil``
    (``cohort["toy"]``), MHD-Net's thymic tumour cohort for ``generator: tet``
    (``cohort["tet"]``), DeepGuide's glioma MR + WSI cohort for ``generator: radpath``
    (``cohort["radpath"]``), subspace fusion's glioma WSI + genes cohort for ``generator:
    glioma`` (``cohort["glioma"]``), else the multi-modal renal demo cohort (the ``synth``
    section)."""
    if cohort.get("generator") == "tet":
        from mmdiag.synth.tet import TetSettings, write_tet_cohort

        tet = dict(cohort.get("tet") or {})
        if "ct_shape_vox" in tet:
            tet["ct_shape_vox"] = tuple(tet["ct_shape_vox"])
        write_tet_cohort(out, TetSettings(**tet))
        return
    if cohort.get("generator") == "radpath":
        from mmdiag.synth.radpath import RadPathSettings, write_radpath_cohort

        radpath = dict(cohort.get("radpath") or {})
        for key in ("mr_shape_vox", "mr_spacing_mm"):
            if key in radpath:
                radpath[key] = tuple(radpath[key])
        write_radpath_cohort(out, RadPathSettings(**radpath))
        return
    if cohort.get("generator") == "glioma":
        from mmdiag.synth.glioma import GliomaSettings, write_glioma_cohort

        write_glioma_cohort(out, GliomaSettings(**dict(cohort.get("glioma") or {})))
        return
    if cohort.get("generator") == "toy_mil":
        from mmdiag.synth.toy_mil import write_toy_cohort

        toy = cohort["toy"]
        write_toy_cohort(
            out,
            kind=toy["kind"],
            n_slides=toy["n_slides"],
            n_sites=toy["n_sites"],
            seed=toy["seed"],
            patch_px=settings["patching"]["patch_px"],
            progress=progress,
        )
        return
    write_synthetic_cohort(out, settings["synth"], progress=progress)
