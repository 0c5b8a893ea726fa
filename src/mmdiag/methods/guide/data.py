"""DeepGuide's cases from the pipeline's files: MR volumes (inferior), WSI feature bags
(superior) and the latents z_I, z_S that the inferior and superior fold jobs write.

- An MR sequence of a patient is the manifest's ``MR`` row whose ``image_id`` ends with the
  sequence's suffix (``inferior.sequences``; BraTS naming ``<patient>_t1ce.nii.gz``). Each
  volume is standardised on its own non-zero (head) voxels, a per-image statistic that needs
  no training data, and resampled onto ``inferior.volume_vox``. Training crops
  ``inferior.crop_vox`` at a random position (per-sample seeded), evaluation at the centre.
- A patient's superior bag is every patch feature of all its slides at one scale of the
  feature stores (``results/{cohort}/features/stores``).
- Latents: ``latents.safetensors`` (tensor ``z``, one row per patient) with ``latents.tsv``
  (``patient_id`` per row), written into the inferior's and superior's fold folders for every
  patient of the split; the latent kinds fit on the training rows only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from mmdiag.features.store import feature_store_paths, open_feature_store
from mmdiag.io import read_tsv
from mmdiag.volumes import read_volume
from mmdiag.volumes.transforms import resize_array, zscore

PARTS = ("train", "val", "test")
LATENTS_FILE, LATENT_IDS_FILE = "latents.safetensors", "latents.tsv"


@dataclass(frozen=True)
class Case:
    """One patient of a fold: its id, class index and input (a volume ``(C, D, H, W)``, a bag
    of patch features ``(N, D)`` or a latent vector)."""

    patient_id: str
    label: int
    data: np.ndarray


def fold_labels(
    manifest: pd.DataFrame, fold: Mapping, classes: Sequence[str], manifest_path
) -> dict[str, dict[str, int]]:
    """Per part, each patient's class index (the split's patients, in the split's order)."""
    labels = manifest.drop_duplicates("patient_id").set_index("patient_id")["disease"]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{manifest_path}: labels {unknown} are not among the classes {classes}")
    parts = {}
    for part in PARTS:
        missing = [p for p in fold[part] if p not in labels.index]
        if missing:
            raise ValueError(f"{manifest_path}: split patients {missing[:5]} are not in it")
        parts[part] = {p: classes.index(labels[p]) for p in fold[part]}
    return parts


# --------------------------------------------------------------------------- MR volumes


def sequence_paths(
    manifest: pd.DataFrame, suffixes: Mapping[str, str], channels: Sequence[str], manifest_path
) -> dict[str, list[Path]]:
    """Per patient, the MR file of each sequence of ``channels``; ``ValueError`` naming the
    manifest, the patient and the sequence when one is missing or ambiguous."""
    mr = manifest[manifest["modality"] == "MR"]
    paths: dict[str, list[Path]] = {}
    problems = []
    for pid, rows in mr.groupby("patient_id", sort=True):
        ids = rows["image_id"].str.lower()
        found = []
        for channel in channels:
            hits = rows[ids.str.endswith(suffixes[channel].lower())]
            if len(hits) != 1:
                problems.append(
                    f"patient {pid}: {len(hits)} MR images end with "
                    f"{suffixes[channel]!r} ({channel})"
                )
                continue
            found.append(Path(hits["path"].iloc[0]))
        paths[str(pid)] = found
    if problems:
        listed = "\n  ".join(problems[:10])
        raise ValueError(f"{manifest_path}: MR sequences not found once each:\n  {listed}")
    return paths


def load_volume(path: Path, volume_vox: Sequence[int]) -> np.ndarray:
    """One MR sequence, standardised on its non-zero voxels and resampled to ``volume_vox``."""
    voxels = read_volume(path).voxels
    head = voxels > 0
    standardised = zscore(voxels, head if head.any() else None)
    return resize_array(standardised, volume_vox)


def volume_cases(
    labels: Mapping[str, int], paths: Mapping[str, Sequence[Path]], volume_vox, manifest_path
) -> list[Case]:
    """A :class:`Case` per patient with its sequences stacked as channels ``(C, D, H, W)``."""
    cases = []
    for pid, label in labels.items():
        if pid not in paths:
            raise ValueError(f"{manifest_path}: patient {pid} has no MR images")
        stacked = np.stack([load_volume(p, volume_vox) for p in paths[pid]])
        cases.append(Case(pid, label, stacked.astype(np.float32)))
    return cases


def crop_start(size: int, crop: int, generator: torch.Generator | None) -> int:
    """A random start (training) or the centred one (evaluation) of a crop along one axis."""
    if crop > size:
        raise ValueError(f"crop {crop} is larger than the volume's {size} voxels")
    if generator is None:
        return (size - crop) // 2
    return int(torch.randint(size - crop + 1, (1,), generator=generator))


def volume_collate(crop_vox: Sequence[int]):
    """The collate of volume cases: a crop per sample (random with its generator, else
    centred), stacked as ``volume`` ``(B, C, d, h, w)`` with ``label``."""

    def collate(samples: Sequence[Case], generators=None) -> dict[str, torch.Tensor]:
        crops = []
        for index, case in enumerate(samples):
            generator = None if generators is None else generators[index]
            starts = [
                crop_start(n, c, generator)
                for n, c in zip(case.data.shape[1:], crop_vox, strict=True)
            ]
            window = tuple(slice(s, s + c) for s, c in zip(starts, crop_vox, strict=True))
            crops.append(torch.from_numpy(np.ascontiguousarray(case.data[(slice(None), *window)])))
        labels = torch.tensor([case.label for case in samples], dtype=torch.long)
        return {"volume": torch.stack(crops), "label": labels}

    return collate


# --------------------------------------------------------------------------- WSI bags


def patient_bags(
    manifest: pd.DataFrame, stores_dir: Path, scale: str | None, manifest_path
) -> dict[str, np.ndarray]:
    """Per patient, the ``(N, D)`` features of every patch of its slides at ``scale`` (the
    finest when ``None``); ``ValueError`` naming the store or the patient when a store is
    not in the manifest, a scale is missing or a patient has no patch."""
    slides = manifest[manifest["modality"] == "WSI"].set_index("image_id")["patient_id"]
    parts: dict[str, list[np.ndarray]] = {}
    for path in feature_store_paths([stores_dir]):
        store = open_feature_store(path)
        if store.image_id not in slides.index:
            raise ValueError(
                f"feature store {path}: image_id {store.image_id!r} not in {manifest_path}"
            )
        index = 0 if scale is None else _scale_index(store, scale, path)
        parts.setdefault(str(slides[store.image_id]), []).append(store.features[:, index, :])
    return {pid: np.concatenate(chunks) for pid, chunks in parts.items() if sum(map(len, chunks))}


def _scale_index(store, scale: str, path: Path) -> int:
    if scale not in store.scales:
        raise ValueError(f"feature store {path}: no scale {scale!r}; it has {store.scales}")
    return store.scales.index(scale)


def bag_cases(labels: Mapping[str, int], bags: Mapping[str, np.ndarray], where) -> list[Case]:
    missing = [pid for pid in labels if pid not in bags]
    if missing:
        raise ValueError(f"{where}: patients {missing[:5]} have no WSI patch features")
    return [Case(pid, label, bags[pid].astype(np.float32)) for pid, label in labels.items()]


def bag_collate(samples: Sequence[Case], generators=None) -> dict[str, torch.Tensor]:
    """Bags zero-padded to the longest, with their real patch counts."""
    longest = max(len(case.data) for case in samples)
    dim = samples[0].data.shape[1]
    features = torch.zeros(len(samples), longest, dim)
    for index, case in enumerate(samples):
        features[index, : len(case.data)] = torch.from_numpy(case.data)
    return {
        "features": features,
        "n_patches": torch.tensor([len(case.data) for case in samples], dtype=torch.long),
        "label": torch.tensor([case.label for case in samples], dtype=torch.long),
    }


# --------------------------------------------------------------------------- latents


def latent_files(z: torch.Tensor, patient_ids: Sequence[str]) -> tuple[dict, pd.DataFrame]:
    """The ``tensors`` and ``tables`` entries of a fold folder holding latents."""
    return {LATENTS_FILE: {"z": z.float().contiguous()}}, pd.DataFrame({"patient_id": patient_ids})


def read_latents(folder: Path) -> dict[str, np.ndarray]:
    """A fold folder's latents by patient id; ``ValueError`` naming the folder when absent or
    when the id table and the tensor disagree."""
    tensor_path, ids_path = folder / LATENTS_FILE, folder / LATENT_IDS_FILE
    for path in (tensor_path, ids_path):
        if not path.is_file():
            raise ValueError(f"{path}: no latents (train that variant's fold first)")
    z = load_file(str(tensor_path))["z"].numpy()
    ids = read_tsv(ids_path)["patient_id"].astype(str).tolist()
    if len(ids) != len(z):
        raise ValueError(f"{folder}: {len(ids)} patient ids for {len(z)} latent rows")
    return dict(zip(ids, z, strict=True))


def latent_cases(
    labels: Mapping[str, int], latents: Sequence[Mapping[str, np.ndarray]], where: Sequence
) -> list[Case]:
    """A case per patient with its latents concatenated in the given order."""
    cases = []
    for pid, label in labels.items():
        rows = []
        for table, folder in zip(latents, where, strict=True):
            if pid not in table:
                raise ValueError(f"{folder}: no latent of patient {pid}")
            rows.append(table[pid])
        cases.append(Case(pid, label, np.concatenate(rows).astype(np.float32)))
    return cases


def latent_collate(named_sizes: Sequence[tuple[str, int]]):
    """The collate of latent cases: each case's vector cut, in order, into the named parts
    (e.g. ``z_inferior`` then ``z_superior``); a part past a case's length is left out, so
    test cases that hold z_I alone give a batch without ``z_superior``."""

    def collate(samples: Sequence[Case], generators=None) -> dict[str, torch.Tensor]:
        stacked = torch.from_numpy(np.stack([case.data for case in samples]))
        batch, start = {}, 0
        for name, size in named_sizes:
            if start + size <= stacked.shape[1]:
                batch[name] = stacked[:, start : start + size]
            start += size
        batch["label"] = torch.tensor([case.label for case in samples], dtype=torch.long)
        return batch

    return collate
