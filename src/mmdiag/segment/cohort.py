"""Segment the glomerulus of every OM image of a cohort; write masks, QC overlays, crop boxes.

CMUS-Net classifies the glomerulus crop of each optical micrograph (OM), segmented
semi-automatically with SAM. :func:`segment_cohort` implements that step for a manifest:

* the prompt of an image is the user's (prompts TSV, see :mod:`mmdiag.segment.sam`) when
  there is one for its ``image_id``, else the classical detector's box with the mask's
  centroid as a foreground point (:func:`mmdiag.segment.glomerulus.detect_glomerulus`);
* with a SAM checkpoint, SAM turns the prompt into the mask; without one, the classical mask
  is used (inside the user's box, preferring the component under the user's foreground
  points, when the user gave a prompt);
* the crop the classifier sees is the mask's bounding box enlarged by ``crop_margin`` of its
  width / height on each side, clipped to the image.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import ndimage

from mmdiag.io.atomic import atomic_path
from mmdiag.segment.glomerulus import detect_glomerulus, mask_to_box
from mmdiag.segment.sam import SAM_MODEL_TYPES, Prompt, load_sam, read_prompts, sam_mask

log = logging.getLogger(__name__)

__all__ = ["SEGMENTATION_COLUMNS", "crop_box", "segment_cohort"]

SEGMENTATION_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "image_id",
    "path",
    "method",
    "prompt",
    "mask_area_px",
    "crop_x0",
    "crop_y0",
    "crop_x1",
    "crop_y1",
)
REQUIRED_MANIFEST_COLUMNS: tuple[str, ...] = ("patient_id", "modality", "image_id", "path")
#: QC colours (RGB): the mask contour and the crop box, bright on pale pink PASM.
CONTOUR_RGB = (0, 255, 0)
CROP_BOX_RGB = (0, 120, 255)


def crop_box(
    mask_box: tuple[int, int, int, int], width_px: int, height_px: int, margin: float
) -> tuple[int, int, int, int]:
    """Enlarge ``mask_box`` by ``margin`` of its width/height on each side; clip to the image.

    Examples
    --------
    >>> crop_box((10, 20, 30, 60), 100, 70, 0.1)
    (8, 16, 32, 64)
    >>> crop_box((0, 0, 50, 50), 60, 60, 0.5)
    (0, 0, 60, 60)
    """
    x0, y0, x1, y1 = mask_box
    grow_x, grow_y = margin * (x1 - x0), margin * (y1 - y0)
    return (
        max(0, math.floor(x0 - grow_x)),
        max(0, math.floor(y0 - grow_y)),
        min(width_px, math.ceil(x1 + grow_x)),
        min(height_px, math.ceil(y1 + grow_y)),
    )


def segment_cohort(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    prompts_tsv: str | os.PathLike | None = None,
    sam_checkpoint: str | os.PathLike | None = None,
    sam_model_type: str = "vit_b",
    crop_margin: float = 0.1,
    progress: bool = True,
    device: str = "cpu",
) -> pd.DataFrame:
    """Segment the glomerulus of every ``modality == "OM"`` image of ``manifest``.

    Parameters
    ----------
    manifest
        Needs ``patient_id, modality, image_id, path``; ``width_px, height_px`` when present
        let prompt boxes be checked before any image is read.
    out_dir
        Output folder.
    prompts_tsv
        Optional user prompts (format in :mod:`mmdiag.segment.sam`); images without a row
        are prompted by the classical detector.
    sam_checkpoint, sam_model_type
        SAM weights and their architecture (one of :data:`SAM_MODEL_TYPES`); without a
        checkpoint the classical mask is used and a warning is logged.
    crop_margin
        Fraction of the mask box's width/height added on each side of the crop.
    progress
        Show a progress bar.
    device
        Torch device SAM runs on.

    Returns
    -------
    pandas.DataFrame
        One row per OM image, columns :data:`SEGMENTATION_COLUMNS`: ``method`` is ``sam`` or
        ``classical``; ``prompt`` is ``box:x0,y0,x1,y1;point:x,y,label`` (detector) or
        ``user:`` followed by the user's prompt in that form; crop coordinates are pixels,
        ``x1``/``y1`` exclusive. The caller writes it.

    Side effects
    ------------
    Writes, each atomically, ``out_dir/masks/{image_id}.png`` (uint8, 0 background, 255
    glomerulus) and ``out_dir/qc/{image_id}.png`` (the image with the mask contour in green
    and the crop box in blue), creating subfolders for ``/`` in ``image_id``.

    Raises
    ------
    ValueError
        On missing manifest columns, no OM image, an unsafe ``image_id``, bad prompts, a
        checkpoint that does not fit, or an image where neither SAM nor the detector finds
        a glomerulus (the message names the image; a user prompt for it is the remedy).
    """
    missing = [name for name in REQUIRED_MANIFEST_COLUMNS if name not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {', '.join(missing)}")
    if not (math.isfinite(crop_margin) and crop_margin >= 0):
        raise ValueError(f"crop_margin must be a finite number >= 0, got {crop_margin!r}")
    if sam_model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"sam_model_type must be one of {SAM_MODEL_TYPES}, got {sam_model_type!r}")
    om_rows = manifest[manifest["modality"] == "OM"]
    if om_rows.empty:
        raise ValueError("manifest has no OM image to segment")
    for image_id in om_rows["image_id"]:
        _check_image_id(str(image_id))

    sizes = {}
    if {"width_px", "height_px"} <= set(manifest.columns):
        sizes = {
            str(row.image_id): (int(row.width_px), int(row.height_px))
            for row in om_rows.itertuples()
        }
    user_prompts = {} if prompts_tsv is None else read_prompts(prompts_tsv, image_sizes=sizes)
    unused = sorted(set(user_prompts) - set(om_rows["image_id"].astype(str)))
    if unused:
        log.warning(
            "prompts TSV %s names %d image(s) that are not OM images of the manifest, e.g. %s",
            prompts_tsv,
            len(unused),
            ", ".join(unused[:5]),
        )
    if sam_checkpoint is None:
        predictor = None
        log.warning(
            "SAM is not configured (no checkpoint): using the classical glomerulus detector's "
            "masks for all %d OM image(s)",
            len(om_rows),
        )
    else:
        predictor = load_sam(sam_checkpoint, sam_model_type, device=device)

    out_dir = Path(out_dir)
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("segmenting OM glomeruli", total=len(om_rows))
        for row in om_rows.itertuples():
            image_id = str(row.image_id)
            rgb = _read_rgb(Path(row.path))
            mask, method, prompt_text = _segment_one(
                rgb, image_id, user_prompts.get(image_id), predictor, prompts_tsv
            )
            height_px, width_px = mask.shape
            crop = crop_box(mask_to_box(mask), width_px, height_px, crop_margin)
            _write_png(out_dir / "masks" / f"{image_id}.png", mask.astype(np.uint8) * 255)
            _write_png(out_dir / "qc" / f"{image_id}.png", _qc_overlay(rgb, mask, crop, method))
            rows.append(
                {
                    "patient_id": row.patient_id,
                    "image_id": image_id,
                    "path": str(row.path),
                    "method": method,
                    "prompt": prompt_text,
                    "mask_area_px": int(mask.sum()),
                    "crop_x0": crop[0],
                    "crop_y0": crop[1],
                    "crop_x1": crop[2],
                    "crop_y1": crop[3],
                }
            )
            bar.advance(task)
    return pd.DataFrame(rows, columns=list(SEGMENTATION_COLUMNS))


def _segment_one(rgb, image_id, user_prompt, predictor, prompts_tsv):
    """Return ``(mask, method, prompt_text)`` for one image."""
    height_px, width_px = rgb.shape[:2]
    if user_prompt is not None:
        try:
            user_prompt.check_inside(width_px, height_px)
        except ValueError as error:
            raise ValueError(f"prompts TSV {prompts_tsv}, image {image_id!r}: {error}") from None
        foreground = [
            p for p, lab in zip(user_prompt.points, user_prompt.point_labels, strict=True) if lab
        ]

        def classical() -> np.ndarray:
            return _detect(rgb, image_id, box=user_prompt.box, foreground_points=foreground)

        prompt, prompt_text = user_prompt, "user:" + user_prompt.describe()
    else:
        detected = _detect(rgb, image_id)
        prompt = Prompt(
            box=mask_to_box(detected), points=(_inner_point(detected),), point_labels=(1,)
        )
        prompt_text = prompt.describe()

        def classical() -> np.ndarray:
            return detected

    if predictor is None:
        return classical(), "classical", prompt_text
    mask = sam_mask(predictor, rgb, prompt)
    if not mask.any():
        log.warning("SAM returned an empty mask for %s; using the classical mask", image_id)
        return classical(), "classical", prompt_text
    return mask, "sam", prompt_text


def _detect(rgb, image_id, **kwargs) -> np.ndarray:
    try:
        return detect_glomerulus(rgb, **kwargs)
    except ValueError as error:
        raise ValueError(f"{image_id}: {error}; give this image a box in a prompts TSV") from error


def _inner_point(mask: np.ndarray) -> tuple[int, int]:
    """The mask's centroid ``(x, y)``, or its innermost pixel when the centroid is outside."""
    cy, cx = (int(round(v)) for v in ndimage.center_of_mass(mask))
    if mask[cy, cx]:
        return cx, cy
    iy, ix = np.unravel_index(np.argmax(ndimage.distance_transform_edt(mask)), mask.shape)
    return int(ix), int(iy)


def _check_image_id(image_id: str) -> None:
    parts = PurePosixPath(image_id).parts
    if not image_id or image_id.startswith("/") or ".." in parts or "\\" in image_id:
        raise ValueError(f"image_id {image_id!r} cannot name a file below the output folder")


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read OM image {path}: {error}") from error


def _write_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _qc_overlay(rgb, mask, crop, method) -> np.ndarray:
    """The image with the mask contour and the crop box drawn, for checking by eye."""
    thickness_px = max(2, round(min(mask.shape) / 128))
    contour = mask & ~ndimage.binary_erosion(mask, iterations=thickness_px, border_value=0)
    overlay = rgb.copy()
    overlay[contour] = CONTOUR_RGB
    image = Image.fromarray(overlay)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = crop
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=CROP_BOX_RGB, width=thickness_px)
    draw.text((x0 + 3, y0 + 2), method, fill=CROP_BOX_RGB)
    return np.asarray(image)
