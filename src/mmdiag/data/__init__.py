"""Cohort manifests, prediction tasks and units, and patient-level splits."""

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
    predefined_splits,
    repeated_splits,
    training_seed,
    write_splits,
)
from mmdiag.data.tasks import Task, cohort_tasks, method_tasks, patient_labels
from mmdiag.data.units import UNITS, image_units, patient_units, sequence_units, split_units

__all__ = [
    "MANIFEST_COLUMNS",
    "MODALITIES",
    "UNITS",
    "ImageReadError",
    "ImageSize",
    "ManifestError",
    "ManifestRules",
    "Task",
    "build_manifest",
    "cohort_tasks",
    "holdout_split",
    "image_stem",
    "image_units",
    "kfold_splits",
    "load_fold",
    "load_splits",
    "make_splits",
    "method_tasks",
    "patient_labels",
    "patient_units",
    "predefined_splits",
    "read_image_size",
    "read_manifest",
    "repeated_splits",
    "sequence_units",
    "split_units",
    "training_seed",
    "write_manifest",
    "write_splits",
]
