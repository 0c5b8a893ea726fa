"""CT and MR volumes: reading NIfTI and DICOM, intensity and grid transforms, sequence cutting.

Every reader returns a :class:`Volume` with voxels on axes (z, y, x), spacing in the same
order and an affine mapping voxel indices (x, y, z) to RAS+ millimetres; see
:mod:`mmdiag.volumes.reader` and :mod:`mmdiag.volumes.dicom` for the rules.
"""

from mmdiag.volumes.dicom import read_dicom_file, read_dicom_series
from mmdiag.volumes.reader import Volume, VolumeError, read_nifti, read_volume
from mmdiag.volumes.sequences import (
    OTHER,
    TUMOUR,
    CtSequence,
    cut_sequences,
    kept_slice_range,
    sequence_bounds,
)
from mmdiag.volumes.transforms import (
    clip_and_scale,
    hu_window,
    resample_to_spacing,
    resize_array,
    resize_to_shape,
    zscore,
)

__all__ = [
    "OTHER",
    "TUMOUR",
    "CtSequence",
    "Volume",
    "VolumeError",
    "clip_and_scale",
    "cut_sequences",
    "hu_window",
    "kept_slice_range",
    "read_dicom_file",
    "read_dicom_series",
    "read_nifti",
    "read_volume",
    "resample_to_spacing",
    "resize_array",
    "resize_to_shape",
    "sequence_bounds",
    "zscore",
]
