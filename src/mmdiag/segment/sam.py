"""Segment Anything (SAM) for the glomerulus of OM images: loading, prompts, prediction.

CMUS-Net segments the glomerulus of each PASM-stained optical micrograph semi-automatically
with SAM (A. Kirillov et al., "Segment Anything", ICCV 2023; code and checkpoints:
https://github.com/facebookresearch/segment-anything) and classifies the glomerulus crop.
A prompt is a box and/or points, either the user's (:func:`read_prompts`) or the classical
detector's (:func:`mmdiag.segment.glomerulus.detect_glomerulus`).

Prompts TSV
-----------
Tab-separated, one header line, columns:

``image_id``
    The manifest's ``image_id`` (e.g. ``om/P001``).
``x0, y0, x1, y1``
    A box in image pixels, ``x1``/``y1`` exclusive (``0 <= x0 < x1 <= width``). All four or
    none per row.
``point_x, point_y`` (optional columns)
    A point in image pixels; both or none per row.
``point_label`` (optional column, default 1)
    1 for a foreground point, 0 for a background point.

A row may hold a box, a point or both; several rows per image add points (an image has at
most one box: rows repeating it must agree). For example::

    image_id    x0   y0   x1   y1   point_x point_y point_label
    om/P001     80   20   300  240  190     130     1
    om/P001                         30      30      0
    om/P002                         150     120     1

Model types
-----------
``vit_b``, ``vit_l``, ``vit_h`` are the published SAM encoders (checkpoints
``sam_vit_b_01ec64.pth`` etc.); ``tiny`` is the same architecture with a 2-block, 32-wide
encoder, for tests and CPU smoke runs only (there are no trained ``tiny`` weights).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmdiag.io.tables import read_tsv

if TYPE_CHECKING:
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

__all__ = [
    "PROMPT_BOX_COLUMNS",
    "PROMPT_POINT_COLUMNS",
    "SAM_MODEL_TYPES",
    "Prompt",
    "build_sam",
    "load_sam",
    "read_prompts",
    "sam_mask",
]

SAM_MODEL_TYPES: tuple[str, ...] = ("vit_b", "vit_l", "vit_h", "tiny")
PROMPT_BOX_COLUMNS: tuple[str, ...] = ("x0", "y0", "x1", "y1")
PROMPT_POINT_COLUMNS: tuple[str, ...] = ("point_x", "point_y", "point_label")

# Encoder sizes as in segment_anything.build_sam (embed dim, depth, heads, global-attn blocks).
_ENCODERS: dict[str, dict] = {
    "vit_b": dict(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=[2, 5, 8, 11],
    ),
    "vit_l": dict(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=[5, 11, 17, 23],
    ),
    "vit_h": dict(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=[7, 15, 23, 31],
    ),
    "tiny": dict(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=[1],
    ),
}


@dataclass(frozen=True)
class Prompt:
    """What SAM is asked: a box and/or labelled points, in image pixels.

    Attributes
    ----------
    box
        ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive, or ``None``.
    points
        ``(x, y)`` pixel positions.
    point_labels
        One label per point: 1 foreground, 0 background.
    """

    box: tuple[int, int, int, int] | None
    points: tuple[tuple[int, int], ...] = ()
    point_labels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.box is not None:
            if len(self.box) != 4:
                raise ValueError(f"box must be (x0, y0, x1, y1), got {self.box!r}")
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 and 0 <= y0 < y1):
                raise ValueError(f"box must have 0 <= x0 < x1 and 0 <= y0 < y1, got {self.box}")
        if len(self.points) != len(self.point_labels):
            raise ValueError(
                f"points and point_labels differ in length: {len(self.points)} != "
                f"{len(self.point_labels)}"
            )
        if any(label not in (0, 1) for label in self.point_labels):
            raise ValueError(f"point_labels must be 0 or 1, got {self.point_labels}")
        if self.box is None and not self.points:
            raise ValueError("a prompt needs a box or at least one point")

    def describe(self) -> str:
        """Short text form: ``box:x0,y0,x1,y1`` then ``;point:x,y,label`` per point."""
        parts = [] if self.box is None else ["box:" + ",".join(str(v) for v in self.box)]
        pairs = zip(self.points, self.point_labels, strict=True)
        parts += [f"point:{x},{y},{label}" for (x, y), label in pairs]
        return ";".join(parts)

    def check_inside(self, width_px: int, height_px: int) -> None:
        """Raise ``ValueError`` when the box or a point lies outside a ``width x height`` image."""
        if self.box is not None and not (self.box[2] <= width_px and self.box[3] <= height_px):
            raise ValueError(f"box {self.box} is outside the {width_px}x{height_px} image")
        for x, y in self.points:
            if not (0 <= x < width_px and 0 <= y < height_px):
                raise ValueError(f"point ({x}, {y}) is outside the {width_px}x{height_px} image")


def read_prompts(
    path: str | os.PathLike, *, image_sizes: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, Prompt]:
    """Read a prompts TSV (format in the module docstring) into one :class:`Prompt` per image.

    Parameters
    ----------
    path
        The prompts TSV.
    image_sizes
        Optional ``image_id -> (width_px, height_px)``; when given, boxes and points must lie
        inside their image. Image ids missing from it are not checked.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the file and the line for missing columns, empty ``image_id``, non-integer
        coordinates, half-given boxes or points, bad labels, conflicting boxes, and boxes or
        points outside the image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts TSV {path} does not exist")
    try:
        table = read_tsv(path, all_strings=True)
    except ValueError as error:
        raise ValueError(f"prompts TSV {path} cannot be read as a TSV: {error}") from error
    table.columns = [str(name).strip() for name in table.columns]
    has_box = any(name in table.columns for name in PROMPT_BOX_COLUMNS)
    has_points = any(name in table.columns for name in PROMPT_POINT_COLUMNS[:2])
    required = ["image_id"]
    required += list(PROMPT_BOX_COLUMNS) if has_box else []
    required += list(PROMPT_POINT_COLUMNS[:2]) if has_points or not has_box else []
    missing = [name for name in required if name not in table.columns]
    if missing:
        raise ValueError(
            f"prompts TSV {path} lacks column(s) {', '.join(missing)}; it needs image_id and "
            f"{', '.join(PROMPT_BOX_COLUMNS)} (a box) and/or point_x, point_y (points)"
        )

    boxes: dict[str, tuple[int, tuple[int, int, int, int]]] = {}  # image_id -> (line, box)
    points: dict[str, list[tuple[int, int, int, int]]] = {}  # image_id -> [(line, x, y, label)]
    for index, row in enumerate(table.to_dict("records")):
        line = index + 2  # the header is line 1

        def fail(problem: str, line: int = line) -> ValueError:
            return ValueError(f"prompts TSV {path}, line {line}: {problem}")

        image_id = row["image_id"].strip()
        if not image_id:
            raise fail("image_id is empty")
        box = _read_ints(row, PROMPT_BOX_COLUMNS if has_box else (), fail)
        point = _read_ints(row, PROMPT_POINT_COLUMNS[:2] if has_points else (), fail)
        if box is None and point is None:
            raise fail(f"image {image_id!r} has neither a box nor a point")
        if box is not None:
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 and 0 <= y0 < y1):
                raise fail(f"box {box} of {image_id!r} needs 0 <= x0 < x1 and 0 <= y0 < y1")
            if image_id in boxes and boxes[image_id][1] != box:
                earlier = boxes[image_id][0]
                raise fail(f"box {box} of {image_id!r} differs from the box on line {earlier}")
            boxes.setdefault(image_id, (line, box))
        if point is not None:
            label_text = row.get("point_label", "1").strip() or "1"
            if label_text not in ("0", "1"):
                raise fail(f"point_label of {image_id!r} must be 0 or 1, got {label_text!r}")
            points.setdefault(image_id, []).append((line, *point, int(label_text)))
        size = (image_sizes or {}).get(image_id)
        if size is not None:
            width_px, height_px = size
            if box is not None and not (box[2] <= width_px and box[3] <= height_px):
                raise fail(f"box {box} is outside the {width_px}x{height_px} image {image_id!r}")
            if point is not None and not (0 <= point[0] < width_px and 0 <= point[1] < height_px):
                raise fail(
                    f"point {point} is outside the {width_px}x{height_px} image {image_id!r}"
                )

    prompts = {}
    for image_id in dict.fromkeys([*boxes, *points]):
        image_points = points.get(image_id, [])
        prompts[image_id] = Prompt(
            box=boxes[image_id][1] if image_id in boxes else None,
            points=tuple((x, y) for _, x, y, _ in image_points),
            point_labels=tuple(label for *_, label in image_points),
        )
    return prompts


def _read_ints(row: Mapping[str, str], columns, fail) -> tuple[int, ...] | None:
    """Integers of ``columns`` in ``row``; ``None`` when all are empty; error when some are."""
    texts = [row[name].strip() for name in columns]
    if not any(texts):
        return None
    empty = [name for name, text in zip(columns, texts, strict=True) if not text]
    if empty:
        raise fail(f"{', '.join(columns)} must be given together; {', '.join(empty)} is empty")
    values = []
    for name, text in zip(columns, texts, strict=True):
        try:
            values.append(int(text))
        except ValueError:
            raise fail(f"{name} must be an integer pixel coordinate, got {text!r}") from None
    return tuple(values)


def build_sam(model_type: str) -> Sam:
    """Build the SAM architecture of ``model_type`` (random weights, eval mode)."""
    from segment_anything.build_sam import _build_sam

    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {SAM_MODEL_TYPES}, got {model_type!r}")
    return _build_sam(**_ENCODERS[model_type], checkpoint=None)


def load_sam(
    checkpoint: str | os.PathLike, model_type: str, *, device: str = "cpu"
) -> SamPredictor:
    """Build SAM of ``model_type``, load the ``checkpoint`` state dict into it, wrap it.

    The file is read with ``torch.load(weights_only=True)`` (no code from the file runs) and
    loaded with ``strict=True``.

    Raises
    ------
    FileNotFoundError
        If ``checkpoint`` does not exist.
    ValueError
        Naming the file, when it is not a state dict or its keys or tensor shapes do not fit
        ``model_type``.
    """
    import torch
    from segment_anything import SamPredictor

    checkpoint = Path(checkpoint)
    sam = build_sam(model_type)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"SAM checkpoint {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"SAM checkpoint {checkpoint} cannot be read: {error}") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"SAM checkpoint {checkpoint} is not a state dict of tensors")
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        name for name in set(expected) & set(state) if expected[name].shape != state[name].shape
    )
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        if mismatched:
            name = mismatched[0]
            details.append(
                f"{len(mismatched)} shape mismatch(es), e.g. {name}: file "
                f"{tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
            )
        raise ValueError(
            f"SAM checkpoint {checkpoint} does not fit model type {model_type!r}: "
            + "; ".join(details)
            + _guess_model_type(state)
        )
    sam.load_state_dict(state, strict=True)
    sam.to(device)
    sam.eval()
    return SamPredictor(sam)


def _guess_model_type(state: Mapping) -> str:
    """A hint naming the model type whose encoder width matches the file, if any."""
    pos_embed = state.get("image_encoder.pos_embed")
    if pos_embed is None or pos_embed.ndim == 0:
        return ""
    width = int(pos_embed.shape[-1])
    for name, encoder in _ENCODERS.items():
        if encoder["encoder_embed_dim"] == width:
            return f" (the file's encoder width {width} is that of {name!r})"
    return f" (the file's encoder width {width} matches no known model type)"


def sam_mask(predictor: SamPredictor, rgb: np.ndarray, prompt: Prompt) -> np.ndarray:
    """Return SAM's boolean mask ``(H, W)`` for ``prompt`` on an RGB ``uint8`` image.

    SAM proposes three masks (``multimask_output=True``); the one with the highest predicted
    IoU score is kept.
    """
    import torch

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be a uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
    prompt.check_inside(rgb.shape[1], rgb.shape[0])
    with torch.inference_mode():
        predictor.set_image(rgb, image_format="RGB")
        masks, scores, _ = predictor.predict(
            point_coords=np.asarray(prompt.points, np.float32) if prompt.points else None,
            point_labels=np.asarray(prompt.point_labels, np.int64) if prompt.points else None,
            box=None if prompt.box is None else np.asarray(prompt.box, np.float32),
            multimask_output=True,
        )
    return np.asarray(masks[int(np.argmax(scores))], dtype=bool)
