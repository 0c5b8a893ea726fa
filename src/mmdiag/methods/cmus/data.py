"""Patient samples for CMUS-Net: one OM, one IM and a bag of TEM images, preprocessed.

Preprocessing follows the paper (Section 4.1-4.2): the legend strip is cut from the bottom of
each TEM image (2048x2048 -> 2048x1940 at paper scale), every image is resized to a square
(224 px in the paper) and normalised; random horizontal and vertical flips in training only.
Images are decoded once per fold and kept in memory as uint8 tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mmdiag.data.manifest import read_manifest
from mmdiag.io import read_tsv

CROP_COLUMNS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1")


@dataclass(frozen=True)
class PatientSample:
    """The preprocessed images of one patient (uint8, C x S x S) and its class index."""

    patient_id: str
    label: int
    om: torch.Tensor
    im: torch.Tensor
    tem: torch.Tensor  # (n_tem, 3, S, S)


def load_image(
    path: str | Path,
    *,
    size_px: int,
    crop_bottom_px: int = 0,
    crop_box: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Decode an image as RGB, crop it, resize it to a square (uint8, 3 x S x S).

    ``crop_bottom_px`` rows are cut off the bottom (the TEM legend strip); ``crop_box``
    (x0, y0, x1, y1) keeps a region (the OM glomerulus). Grayscale images (TEM) are
    replicated to three channels so every encoder sees RGB.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if crop_box is not None:
                x0, y0, x1, y1 = crop_box
                if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
                    raise ValueError(f"{path}: crop box {crop_box} outside {image.size}")
                image = image.crop((x0, y0, x1, y1))
            if crop_bottom_px:
                if crop_bottom_px >= image.height:
                    raise ValueError(
                        f"{path}: cannot cut {crop_bottom_px} legend rows from an image "
                        f"{image.height} px high"
                    )
                image = image.crop((0, 0, image.width, image.height - crop_bottom_px))
            image = image.resize((size_px, size_px), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except OSError as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_patient_samples(
    manifest: pd.DataFrame,
    patient_ids: Sequence[str],
    *,
    label_column: str,
    classes: Sequence[str],
    image_size_px: int,
    tem_legend_px: int,
    max_tem_per_patient: int,
    om_crop_boxes: Mapping[str, tuple[int, int, int, int]] | None = None,
) -> list[PatientSample]:
    """Build the samples of ``patient_ids`` from manifest rows (one row per image).

    ``om_crop_boxes`` maps an OM image path to its glomerulus crop (from the segmentation
    step); without it the whole OM image is used.
    """
    class_index = {name: i for i, name in enumerate(classes)}
    samples = []
    for patient_id in patient_ids:
        rows = manifest[manifest["patient_id"] == patient_id].sort_values("path")
        if rows.empty:
            raise ValueError(f"patient {patient_id} is in the split but not in the manifest")
        label = str(rows[label_column].iloc[0])
        if label not in class_index:
            raise ValueError(f"patient {patient_id}: label {label!r} not in {list(classes)}")
        images = {}
        for modality in ("OM", "IM", "TEM"):
            paths = rows.loc[rows["modality"] == modality, "path"].tolist()
            if not paths:
                raise ValueError(f"patient {patient_id} has no {modality} image in the manifest")
            crop = tem_legend_px if modality == "TEM" else 0
            keep = paths[:max_tem_per_patient] if modality == "TEM" else paths[:1]
            boxes = om_crop_boxes if modality == "OM" and om_crop_boxes is not None else {}
            if modality == "OM" and om_crop_boxes is not None and keep[0] not in boxes:
                raise ValueError(f"patient {patient_id}: no glomerulus crop for {keep[0]}")
            images[modality] = torch.stack(
                [
                    load_image(p, size_px=image_size_px, crop_bottom_px=crop, crop_box=boxes.get(p))
                    for p in keep
                ]
            )
        samples.append(
            PatientSample(
                patient_id=patient_id,
                label=class_index[label],
                om=images["OM"][0],
                im=images["IM"][0],
                tem=images["TEM"],
            )
        )
    return samples


def read_crop_boxes(glomeruli_path: Path) -> dict[str, tuple[int, int, int, int]]:
    """OM path -> glomerulus crop box (x0, y0, x1, y1), from the segmentation step's table."""
    table = read_tsv(glomeruli_path)
    missing = sorted(set(CROP_COLUMNS) - set(table.columns))
    if missing:
        raise ValueError(f"{glomeruli_path}: missing columns {missing}")
    return {row.path: tuple(int(v) for v in row[list(CROP_COLUMNS)]) for _, row in table.iterrows()}


def uses_crops(method_settings: Mapping, glomeruli_path: Path | None) -> bool:
    """Whether the OM input is the glomerulus crop: configured, and the table given."""
    crop = method_settings["preprocess"].get("om_glomerulus_crop", False)
    return bool(crop) and glomeruli_path is not None


def patient_loader(
    manifest_path: Path,
    method_settings: Mapping,
    classes: Sequence[str],
    glomeruli_path: Path | None = None,
) -> Callable[[Sequence[str]], list[PatientSample]]:
    """A function from patient ids to their preprocessed samples, as the method is configured.

    The fold trainer and the figures load patients through this one function, so both see the
    same preprocessing (legend crop, glomerulus crop, size).
    """
    preprocess = method_settings["preprocess"]
    return functools.partial(
        load_patient_samples,
        read_manifest(manifest_path),
        label_column=method_settings["task"],
        classes=classes,
        image_size_px=preprocess["image_size_px"],
        tem_legend_px=preprocess["tem_legend_px"],
        max_tem_per_patient=preprocess["max_tem_per_patient"],
        om_crop_boxes=(
            read_crop_boxes(glomeruli_path) if uses_crops(method_settings, glomeruli_path) else None
        ),
    )


def batch_collator(method_settings: Mapping) -> Callable:
    """``collate(samples, generators=None)`` with the method's normalisation."""
    preprocess = method_settings["preprocess"]
    return functools.partial(
        _collate, mean=preprocess["normalise_mean"], std=preprocess["normalise_std"]
    )


def _collate(samples, generator=None, *, mean, std):
    return collate_patients(samples, mean=mean, std=std, augment_generator=generator)


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - mean) / std


def _random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally and vertically, each with probability 1/2."""
    flips = torch.rand(images.shape[0], 2, generator=generator) < 0.5
    images = torch.where(flips[:, 0, None, None, None], images.flip(-1), images)
    return torch.where(flips[:, 1, None, None, None], images.flip(-2), images)


def _flip_sample(sample: PatientSample, generator: torch.Generator) -> PatientSample:
    """One patient's images flipped with the patient's own generator (OM, IM, then TEM)."""
    om, im, tem = (
        _random_flips(x, generator) for x in (sample.om[None], sample.im[None], sample.tem)
    )
    return PatientSample(sample.patient_id, sample.label, om[0], im[0], tem)


def collate_patients(
    samples: Sequence[PatientSample],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment_generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> dict[str, torch.Tensor]:
    """Stack patients into a batch (see :mod:`mmdiag.models.cmus`).

    With ``augment_generator`` every image is flipped at random (training only): one generator
    for the whole batch, or one per sample, so that a patient's flips do not depend on the
    other patients of its batch (data-parallel training splits batches across processes).
    """
    if isinstance(augment_generator, Sequence):
        if len(augment_generator) != len(samples):
            raise ValueError(
                f"augment_generator: {len(augment_generator)} generators for {len(samples)} samples"
            )
        samples = [_flip_sample(s, g) for s, g in zip(samples, augment_generator, strict=True)]
        augment_generator = None
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    om = torch.stack([s.om for s in samples])
    im = torch.stack([s.im for s in samples])
    tem = torch.cat([s.tem for s in samples])
    if augment_generator is not None:
        om, im, tem = (_random_flips(x, augment_generator) for x in (om, im, tem))
    tem_patient = torch.repeat_interleave(
        torch.arange(len(samples)), torch.tensor([s.tem.shape[0] for s in samples])
    )
    return {
        "om": _normalise(om, mean_t, std_t),
        "im": _normalise(im, mean_t, std_t),
        "tem": _normalise(tem, mean_t, std_t),
        "tem_patient": tem_patient,
        "label": torch.tensor([s.label for s in samples]),
    }
