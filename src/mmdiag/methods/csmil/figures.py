"""CS-MIL figures: ROC and PR curves of every variant (Fig. 3), attention maps on slide
thumbnails (Figs. 4, 6 left) and box plots of the scale attention (Fig. 6 right).

Attention maps use the reference variant's ``attention.tsv`` of one split: for each test patch
the mean, over the test bags that drew it, of its instance attention, and of its attention on
each scale (eq. 3). A scale's map shows instance x scale attention, i.e. how much the bag's
prediction draws on that patch *at that scale*; the instance map shows the instance attention.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from mmdiag.features.store import open_feature_store  # noqa: E402
from mmdiag.io import read_tsv  # noqa: E402
from mmdiag.patching.slide import Slide  # noqa: E402
from mmdiag.patching.store import open_patch_store  # noqa: E402
from mmdiag.reporting.figures import _save  # noqa: E402
from mmdiag.stats import multiclass_auc  # noqa: E402

log = logging.getLogger(__name__)


def pooled_predictions(results_dir: Path, variants: Sequence[str]) -> pd.DataFrame:
    """Every variant's test predictions of every split, in one frame."""
    frames = [
        read_tsv(path)
        for variant in variants
        for path in sorted((results_dir / variant).glob("fold_*/predictions.tsv"))
    ]
    if not frames:
        raise ValueError(f"{results_dir}: no predictions.tsv of {list(variants)}")
    return pd.concat(frames, ignore_index=True)


def plot_roc_pr(
    predictions: pd.DataFrame, variants: Sequence[str], path: Path, *, labels=None, title=""
) -> Path:
    """ROC (left) and precision-recall (right) curves of pooled test predictions (Fig. 3)."""
    labels = labels or {}
    positive = [c for c in predictions.columns if c.startswith("prob_")][-1]
    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for variant in variants:
        rows = predictions[predictions["variant"] == variant]
        y, score = rows["y_true"].to_numpy(), rows[positive].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, score)
        precision, recall, _ = precision_recall_curve(y, score)
        name = labels.get(variant, variant)
        auc = multiclass_auc(y, np.column_stack([1 - score, score]))
        width = 2.5 if variant == predictions.attrs.get("reference") else 1.2
        roc_axis.plot(fpr, tpr, lw=width, label=f"{name} (AUC {auc:.3f})")
        pr_axis.plot(
            recall,
            precision,
            lw=width,
            label=f"{name} (AP {average_precision_score(y, score):.3f})",
        )
    roc_axis.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_axis.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    for axis in (roc_axis, pr_axis):
        axis.legend(fontsize=7, loc="lower right" if axis is roc_axis else "lower left")
    figure.suptitle(title or "Pooled test predictions of every split")
    return _save(figure, path)


def plot_scale_attention_boxes(
    attention: pd.DataFrame, scales: Sequence[str], path: Path, *, title: str = ""
) -> Path:
    """Box plots of the per-patch scale attention, one box per scale and per class (Fig. 6)."""
    columns = [f"scale_attention_{i}" for i in range(len(scales))]
    missing = [c for c in columns if c not in attention.columns]
    if missing:
        raise ValueError(f"attention table has no {missing}: not a cross-scale model")
    seen = attention.dropna(subset=columns)
    figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    groups = [("negative", 0), ("positive", 1)] if "label" in seen.columns else [("all", None)]
    width = 0.8 / len(groups)
    for offset, (name, value) in enumerate(groups):
        rows = seen if value is None else seen[seen["label"] == value]
        positions = np.arange(len(scales)) + (offset - (len(groups) - 1) / 2) * width
        boxes = axis.boxplot(
            [rows[c] for c in columns],
            positions=positions,
            widths=width * 0.9,
            patch_artist=True,
            showfliers=False,
        )
        for box in boxes["boxes"]:
            box.set(facecolor=f"C{offset}", alpha=0.6)
        axis.plot([], [], color=f"C{offset}", lw=6, alpha=0.6, label=f"{name} slides")
    axis.set_xticks(np.arange(len(scales)), scales)
    axis.set(ylabel="scale attention (eq. 3)", title=title or "Cross-scale attention per patch")
    axis.legend(fontsize=8)
    return _save(figure, path)


def attention_slides(attention: pd.DataFrame, max_slides: int) -> list[str]:
    """Slides to draw: positives first (where attention should find something), then others."""
    per_slide = attention.groupby("image_id")["label"].first().reset_index()
    per_slide = per_slide.sort_values(["label", "image_id"], ascending=[False, True])
    return per_slide["image_id"].head(max_slides).tolist()


def plot_attention_map(
    thumbnail: np.ndarray,
    thumbnail_mpp: float,
    boxes: np.ndarray,
    values: np.ndarray,
    level0_mpp: float,
    path: Path,
    *,
    title: str,
    label: str,
) -> Path:
    """Patch squares coloured by ``values`` over the slide thumbnail, with a colour bar.

    ``boxes`` are level-0 ``x, y, size`` of each patch's base square.
    """
    figure, axis = plt.subplots(
        figsize=(7, 7 * thumbnail.shape[0] / thumbnail.shape[1] + 0.6), constrained_layout=True
    )
    axis.imshow(thumbnail)
    scale = level0_mpp / thumbnail_mpp
    finite = np.isfinite(values)
    high = float(np.nanmax(values)) if finite.any() else 1.0
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=high if high > 0 else 1.0)
    colours = plt.get_cmap("inferno")
    for (x, y, size), value in zip(boxes, values, strict=True):
        if np.isfinite(value):
            axis.add_patch(
                Rectangle(
                    (x * scale, y * scale),
                    size * scale,
                    size * scale,
                    facecolor=colours(norm(value)),
                    alpha=0.75,
                    edgecolor="white",
                    lw=0.4,
                )
            )
    figure.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=colours), ax=axis, shrink=0.8, label=label
    )
    axis.set_title(title, fontsize=10)
    axis.set_axis_off()
    return _save(figure, path)


def write_attention_maps(
    attention: pd.DataFrame,
    slide_paths: Mapping[str, Path],
    feature_dir: Path,
    scales: Sequence[str],
    out_dir: Path,
    *,
    max_slides: int,
    thumbnail_mpp: float,
) -> list[Path]:
    """One instance map and one map per scale for each chosen test slide."""
    written = []
    for image_id in attention_slides(attention, max_slides):
        rows = attention[attention["image_id"] == image_id].sort_values("patch_index")
        features = open_feature_store(feature_dir / f"{image_id}.zarr")
        patches = open_patch_store(features.attrs["patch_store"])
        base = patches.scales[0]
        boxes = patches.grid[[f"x_{base}", f"y_{base}", f"size_{base}"]].to_numpy()
        boxes = boxes[rows["patch_index"].to_numpy()]
        with Slide(slide_paths[image_id]) as slide:
            thumbnail, mpp = slide.thumbnail(thumbnail_mpp)
            level0_mpp = slide.info.mpp
        stem = image_id.replace("/", "_")
        label = "positive" if rows["label"].iloc[0] else "negative"
        maps = {"instance": rows["instance_attention"].to_numpy()}
        for index, scale in enumerate(scales):
            column = f"scale_attention_{index}"
            if column in rows.columns:
                maps[scale] = maps["instance"] * rows[column].to_numpy()
        for name, values in maps.items():
            what = "instance attention" if name == "instance" else f"instance x {name} attention"
            written.append(
                plot_attention_map(
                    thumbnail,
                    mpp,
                    boxes,
                    values,
                    level0_mpp,
                    out_dir / f"attention_{stem}_{name}.png",
                    title=f"{image_id} ({label} slide): {what}",
                    label=what,
                )
            )
    return written


def write_csmil_figures(
    results_dir: Path,
    method_settings: Mapping,
    manifest: pd.DataFrame,
    feature_dir: Path,
    out_dir: Path,
) -> list[Path]:
    """Every figure of a CS-MIL method into ``out_dir`` (created); return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = list(method_settings["variants"])
    reference = method_settings["reference"]
    predictions = pooled_predictions(results_dir, variants)
    predictions.attrs["reference"] = reference
    labels = {}
    for table in method_settings.get("tables", {}).values():
        labels |= table.get("labels", {})
    written = [
        plot_roc_pr(
            predictions,
            variants,
            out_dir / "roc_pr.png",
            labels=labels,
            title=f"{results_dir.name}: pooled test predictions",
        )
    ]
    settings = method_settings["attention"]
    fold_dir = results_dir / reference / f"fold_{settings['fold']}"
    attention = read_tsv(fold_dir / "attention.tsv")
    truth = predictions[predictions["variant"] == reference].drop_duplicates("case_id")
    case = attention["image_id"] if method_settings["unit"] == "slide" else attention["patient_id"]
    attention["label"] = case.map(truth.set_index("case_id")["y_true"])
    scales = open_feature_store(next(feature_dir.rglob("*.zarr"))).scales
    if any(c.startswith("scale_attention_") for c in attention.columns):
        written.append(
            plot_scale_attention_boxes(attention, scales, out_dir / "scale_attention_boxplot.png")
        )
    wsi = manifest[manifest["modality"] == "WSI"]
    slide_paths = dict(zip(wsi["image_id"], map(Path, wsi["path"]), strict=True))
    written += write_attention_maps(
        attention,
        slide_paths,
        feature_dir,
        scales,
        out_dir,
        max_slides=settings["max_slides"],
        thumbnail_mpp=settings["thumbnail_mpp"],
    )
    return written
