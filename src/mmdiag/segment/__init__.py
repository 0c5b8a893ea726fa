"""Glomerulus segmentation of OM images (CMUS-Net's semi-automatic SAM step).

- :mod:`mmdiag.segment.glomerulus`: training-free classical detector.
- :mod:`mmdiag.segment.threshold`: Otsu's threshold (also used for tissue detection).
- :mod:`mmdiag.segment.sam`: prompts (TSV format documented there), SAM loading and masks.
- :mod:`mmdiag.segment.cohort`: :func:`segment_cohort`, the stage function.
"""

from mmdiag.segment.cohort import SEGMENTATION_COLUMNS, crop_box, segment_cohort
from mmdiag.segment.glomerulus import detect_glomerulus, mask_to_box
from mmdiag.segment.sam import (
    SAM_MODEL_TYPES,
    Prompt,
    build_sam,
    load_sam,
    read_prompts,
    sam_mask,
)
from mmdiag.segment.threshold import otsu_threshold

__all__ = [
    "SAM_MODEL_TYPES",
    "SEGMENTATION_COLUMNS",
    "Prompt",
    "build_sam",
    "crop_box",
    "detect_glomerulus",
    "load_sam",
    "mask_to_box",
    "otsu_threshold",
    "read_prompts",
    "sam_mask",
    "segment_cohort",
]
