"""MHD-Net's patients and sequences from the pipeline's files: the manifest and the patch stores.

Every patient needs exactly one CT volume; its slides are read from their patch stores
(``results/{cohort}/patches/{image_id}.zarr``, made by the patching stage). The tumour slices
of a CT come from the lesion mask beside it (``<ct stem>_mask.nii.gz``) or from a lesion table
(``patient_id, z_start, z_stop``, half-open). The sequences of a fold are
:func:`mmdiag.data.paired_sequences.build_paired_datasets`'s: intensity statistics from the
training patients, WSI paired within a patient, and WSI only in the parts that may see it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from mmdiag.data.manifest import read_manifest
from mmdiag.data.paired_sequences import (
    PairedSequenceDataset,
    PatientImages,
    build_paired_datasets,
    lesion_mask_path_of,
    read_lesion_table,
)
from mmdiag.methods.mhd.settings import sequence_settings

#: The tensors of a batch; ids and traces stay in the dataset (the training loop moves
#: every batch entry to the device).
BATCH_KEYS = ("ct", "wsi", "label", "tumour")


def manifest_patients(
    manifest: pd.DataFrame,
    patches_dir: Path,
    *,
    label_column: str,
    lesion_table: Path | None = None,
    manifest_path: Path | str = "manifest",
) -> list[PatientImages]:
    """One :class:`PatientImages` per patient of the manifest, sorted by id.

    The label is the patient's ``label_column``; the slides are the patient's WSI rows, each
    as its patch store ``patches_dir/{image_id}.zarr``. ``ValueError`` names the manifest and
    the patient when a patient has no CT, several, or no lesion range in the table.
    """
    ranges = read_lesion_table(lesion_table) if lesion_table is not None else None
    patients = []
    for pid, rows in manifest.groupby("patient_id", sort=True):
        ct = rows[rows["modality"] == "CT"]
        if len(ct) != 1:
            raise ValueError(f"{manifest_path}: patient {pid} has {len(ct)} CT volumes, needs one")
        if ranges is not None and str(pid) not in ranges:
            raise ValueError(f"{lesion_table}: no lesion range for patient {pid}")
        slides = rows[rows["modality"] == "WSI"].sort_values("image_id")
        ct_path = Path(ct["path"].iloc[0])
        patients.append(
            PatientImages(
                patient_id=str(pid),
                label=str(rows[label_column].iloc[0]),
                ct_path=ct_path,
                patch_stores=tuple(patches_dir / f"{i}.zarr" for i in slides["image_id"]),
                lesion_z_range=ranges[str(pid)] if ranges is not None else None,
                lesion_mask_path=None if ranges is not None else lesion_mask_path_of(ct_path),
            )
        )
    return patients


def load_patients(
    manifest_path: Path, patches_dir: Path, method_settings: Mapping, label_column: str
) -> list[PatientImages]:
    """The method's patients from its cohort's manifest and patch stores."""
    table = method_settings["lesion_table"]
    return manifest_patients(
        read_manifest(manifest_path),
        Path(patches_dir),
        label_column=label_column,
        lesion_table=Path(table) if method_settings["lesions"] == "table" else None,
        manifest_path=manifest_path,
    )


def fold_datasets(
    patients: Sequence[PatientImages],
    split: Mapping[str, Sequence[str]],
    classes: Sequence[str],
    method_settings: Mapping,
    *,
    seed: int,
    wsi_parts: Sequence[str],
) -> dict[str, PairedSequenceDataset]:
    """Train, val and test sequences of one fold; WSI only in ``wsi_parts``."""
    return build_paired_datasets(
        patients,
        split,
        classes,
        sequence_settings(method_settings),
        seed=seed,
        wsi_parts=wsi_parts,
    )


def collate_tensors(items: Sequence[dict], generators=None) -> dict[str, torch.Tensor]:
    """Stack the tensors MHD-Net reads (no augmentation: the paper names none)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = [key for key in BATCH_KEYS if key in items[0]]
    return {key: torch.stack([item[key] for item in items]) for key in keys}


def sequence_ids(dataset: PairedSequenceDataset) -> list[str]:
    """``<patient_id>@<start>-<stop>`` of every sequence, in dataset order."""
    return [sample.unit_id for sample in dataset.samples]
