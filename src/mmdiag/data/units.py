"""Units of prediction: what one row of ``predictions.tsv`` is about, split patient by patient.

A method predicts per ``patient`` (CMUS-Net), per ``slide`` (CS-MIL), per CT ``sequence``
(MHD-Net: 24-slice sequences cut from each volume) or per tissue ``sample`` (a gene-expression
sample or a core). Whatever the unit, the splits are over patients: every unit goes to the part
of its patient, so no patient's slides, sequences or samples are ever in two parts of a fold.

A unit table has one row per unit with at least ``unit_id`` (unique) and ``patient_id``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

__all__ = ["UNITS", "image_units", "patient_units", "sequence_units", "split_units"]

UNITS: tuple[str, ...] = ("patient", "slide", "sequence", "sample")


def patient_units(manifest: pd.DataFrame) -> pd.DataFrame:
    """One unit per patient (``unit_id`` = ``patient_id``), sorted."""
    patients = sorted(manifest["patient_id"].astype(str).unique())
    return pd.DataFrame({"unit_id": patients, "patient_id": patients})


def image_units(manifest: pd.DataFrame, modality: str) -> pd.DataFrame:
    """One unit per image of ``modality`` (``unit_id`` = ``image_id``): slides or samples."""
    rows = manifest[manifest["modality"] == modality]
    if rows.empty:
        raise ValueError(f"the manifest has no {modality} image to predict on")
    units = rows[["image_id", "patient_id"]].rename(columns={"image_id": "unit_id"})
    return units.sort_values("unit_id").reset_index(drop=True)


def sequence_units(
    manifest: pd.DataFrame, sequences: Mapping[str, Sequence[tuple[int, int]]]
) -> pd.DataFrame:
    """One unit per CT sequence: ``sequences`` maps a volume's ``image_id`` to its
    ``(start, stop)`` slice ranges; ``unit_id`` is ``<image_id>@<start>-<stop>``."""
    patient_of = dict(zip(manifest["image_id"], manifest["patient_id"].astype(str), strict=True))
    unknown = sorted(set(sequences) - set(patient_of))
    if unknown:
        raise ValueError(f"sequences of volumes not in the manifest: {unknown[:20]}")
    rows = [
        {
            "unit_id": f"{image_id}@{start}-{stop}",
            "patient_id": patient_of[image_id],
            "image_id": image_id,
            "start": int(start),
            "stop": int(stop),
        }
        for image_id in sorted(sequences)
        for start, stop in sequences[image_id]
    ]
    return pd.DataFrame(rows, columns=["unit_id", "patient_id", "image_id", "start", "stop"])


def split_units(units: pd.DataFrame, fold: Mapping[str, Sequence[str]]) -> dict[str, pd.DataFrame]:
    """The units of a fold's ``train``, ``val`` and ``test`` patients, each part in unit order.

    Units of patients the fold leaves out (e.g. without the split's label) are in no part.
    ``ValueError`` for duplicate unit ids, or a patient the fold puts in two parts.
    """
    duplicated = sorted(units.loc[units["unit_id"].duplicated(), "unit_id"])
    if duplicated:
        raise ValueError(f"unit ids are not unique: {duplicated[:20]}")
    part_of: dict[str, str] = {}
    for part in ("train", "val", "test"):
        for patient in fold.get(part, []):
            if part_of.setdefault(patient, part) != part:
                raise ValueError(
                    f"fold {fold.get('fold')}: patient {patient!r} is in both "
                    f"{part_of[patient]} and {part}"
                )
    assigned = units["patient_id"].astype(str).map(part_of)
    return {
        part: units[assigned == part].sort_values("unit_id").reset_index(drop=True)
        for part in ("train", "val", "test")
    }
