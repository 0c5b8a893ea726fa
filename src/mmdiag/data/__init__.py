"""Cohort manifests and patient-level splits."""

from mmdiag.data.images import ImageReadError, ImageSize, image_stem, read_image_size
from mmdiag.data.manifest import (
    MANIFEST_COLUMNS,
    MODALITIES,
    ManifestError,
    ManifestRules,
    build_manifest,
    read_manifest,
    write_manifest,
)
from mmdiag.data.splits import (
    holdout_split,
    kfold_splits,
    load_fold,
    load_splits,
    make_splits,
    repeated_splits,
    write_splits,
)

__all__ = [
    "MANIFEST_COLUMNS",
    "MODALITIES",
    "ImageReadError",
    "ImageSize",
    "ManifestError",
    "ManifestRules",
    "build_manifest",
    "holdout_split",
    "image_stem",
    "kfold_splits",
    "load_fold",
    "load_splits",
    "make_splits",
    "read_image_size",
    "read_manifest",
    "repeated_splits",
    "write_manifest",
    "write_splits",
]
