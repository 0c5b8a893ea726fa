"""Whole-slide image patching: reading, tissue detection, concentric grids, patch stores.

The stage function that extracts pixels over many processes lives in
:mod:`mmdiag.patching.engine`; this package provides its parts.
"""

from mmdiag.patching.slide import (
    Slide,
    SlideError,
    SlideInfo,
    SlideReadError,
    magnification_from_mpp,
)
from mmdiag.patching.store import PatchStore, open_patch_store, write_patch_store
from mmdiag.patching.tiling import (
    concentric_grid,
    grid_scales,
    ordered_sequence,
    sample_fixed,
    scale_name,
)
from mmdiag.patching.tissue import tissue_mask, write_mask_png, write_tissue_qc
from mmdiag.segment.threshold import otsu_threshold

__all__ = [
    "PatchDataset",
    "PatchStore",
    "Slide",
    "SlideError",
    "SlideReadError",
    "SlideInfo",
    "concentric_grid",
    "grid_scales",
    "magnification_from_mpp",
    "open_patch_store",
    "ordered_sequence",
    "otsu_threshold",
    "sample_fixed",
    "scale_name",
    "tissue_mask",
    "write_mask_png",
    "write_patch_store",
    "write_tissue_qc",
]


def __getattr__(name: str):
    """Import :class:`PatchDataset` (and torch) only when asked: extraction workers stay light."""
    if name == "PatchDataset":
        from mmdiag.patching.dataset import PatchDataset

        return PatchDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
