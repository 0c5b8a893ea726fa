"""The CMUS-Net paper's figures from a method's results.

- ROC curves per class (mean over folds) and pooled confusion matrices (Fig. 7);
- t-SNE of each modality's features and of the fused features (Fig. 4), and Grad-CAM maps on
  the three modalities (Fig. 8), from the reference variant's model of one fold;
- batch size against ACC/AUC for CMUS-Net and the late vote (Fig. 5), when the config has
  variants with different batch sizes;
- the alpha/beta/gamma heatmaps (Fig. 6), when the config has a loss-weight grid.

Side effects: writes PNG files into the output folder (atomically, one by one).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model

from mmdiag.config import loss_weight_grid_variants
from mmdiag.data.splits import load_fold
from mmdiag.evaluation.explain import grad_cam, last_feature_module
from mmdiag.io import read_tsv
from mmdiag.methods.cmus.data import batch_collator, patient_loader
from mmdiag.methods.cmus.settings import is_vote, model_arguments, task_classes
from mmdiag.models import create_model
from mmdiag.models.cmus import PAPER_LOSS_WEIGHTS
from mmdiag.reporting import figures

log = logging.getLogger(__name__)


def effective_batch_size(method_settings: Mapping, variant: str) -> int:
    """A variant's batch size; a vote takes its members' (-1 when they disagree)."""
    spec = method_settings["variants"][variant]
    if is_vote(spec):
        sizes = {effective_batch_size(method_settings, m) for m in spec["members"]}
        return sizes.pop() if len(sizes) == 1 else -1
    return spec.get("train", {}).get("batch_size", method_settings["train"]["batch_size"])


def batch_size_series(method_settings: Mapping) -> dict[str, tuple[str, float]]:
    """Fig. 5: the full CMUS-Net variants and the late votes, each with its batch size."""
    series = {}
    for name, spec in method_settings["variants"].items():
        if is_vote(spec):
            label = "late fusion (vote)"
        elif spec["model"] == "cmus_net" and _is_full_cmus_net(spec):
            label = "CMUS-Net"
        else:
            continue
        size = effective_batch_size(method_settings, name)
        if size > 0:
            series[name] = (label, float(size))
    return series


def _is_full_cmus_net(spec: Mapping) -> bool:
    return (
        spec["smil"]
        and spec["fusion_attention"] == "cmsa"
        and spec["weighted_loss"]
        and sorted(spec["modalities"]) == ["IM", "OM", "TEM"]
        and spec["loss_weights"] == PAPER_LOSS_WEIGHTS
    )


def loss_weight_variants(method_settings: Mapping) -> dict[str, tuple[float, float, float]]:
    """Fig. 6: the loss-weight grid's variants and their (alpha, beta, gamma)."""
    variants = method_settings["variants"]
    return {
        name: tuple(variants[name]["loss_weights"][m] for m in ("OM", "IM", "TEM"))
        for name in loss_weight_grid_variants(method_settings)
        if name in variants
    }


def write_cmus_figures(
    *,
    method: str,
    method_settings: Mapping,
    manifest_rules: Mapping,
    results_dir: Path,
    manifest_path: Path,
    splits_path: Path,
    out_dir: Path,
    glomeruli_path: Path | None = None,
    explain_fold: int = 0,
) -> list[Path]:
    """Write every figure the results allow; return their paths."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    fold_all = read_tsv(results_dir / "fold_all.tsv")
    reference = method_settings["reference"]
    predictions = figures.variant_predictions(results_dir, reference)
    written = [
        figures.plot_roc_per_class(
            predictions, out_dir / f"roc_{reference}.png", title=f"{method}: {reference}"
        ),
        figures.plot_confusion(
            predictions,
            out_dir / f"confusion_{reference}.png",
            title=f"{method}: {reference}, pooled over folds",
            normalise=True,
        ),
    ]
    series = batch_size_series(method_settings)
    if len({x for _, x in series.values()}) > 1:
        written.append(
            figures.plot_metric_by_setting(
                fold_all,
                series,
                out_dir / "batch_size.png",
                title="Batch size (Fig. 5)",
                xlabel="batch size (patients)",
            )
        )
    weights = loss_weight_variants(method_settings)
    if weights:
        written.append(
            figures.plot_loss_weight_simplex(
                fold_all, weights, out_dir / "loss_weights.png", title="Loss weights (Fig. 6)"
            )
        )
    written += _model_figures(
        method,
        method_settings,
        manifest_rules,
        results_dir / reference / f"fold_{explain_fold}",
        manifest_path,
        splits_path,
        glomeruli_path,
        explain_fold,
        out_dir,
    )
    return written


def _model_figures(
    method,
    method_settings,
    manifest_rules,
    fold_dir,
    manifest_path,
    splits_path,
    glomeruli_path,
    fold,
    out_dir,
) -> list[Path]:
    """t-SNE (Fig. 4) and Grad-CAM (Fig. 8) from the reference model of one fold."""
    reference = method_settings["reference"]
    spec = method_settings["variants"][reference]
    classes = task_classes(method_settings, manifest_rules)
    model = create_model(
        spec["model"], num_classes=len(classes), **model_arguments(spec["model"], spec)
    )
    load_model(model, str(fold_dir / "model.safetensors"))
    model.eval()
    split = load_fold(splits_path, fold)
    load = patient_loader(manifest_path, method_settings, classes, glomeruli_path)
    samples = load(split["train"] + split["val"] + split["test"])
    collate = batch_collator(method_settings)
    labels = np.array([s.label for s in samples])
    written = [
        figures.plot_tsne(
            pooled_features(model, samples, collate),
            labels,
            classes,
            out_dir / "tsne.png",
            title=f"{method}: {reference} features, fold {fold} (Fig. 4)",
        )
    ]
    test_ids = set(split["test"])
    for k, name in enumerate(classes):
        chosen = next((s for s in samples if s.patient_id in test_ids and s.label == k), None)
        if chosen is not None:
            written.append(_grad_cam_figure(model, chosen, collate, k, name, out_dir))
    return written


@torch.no_grad()
def pooled_features(
    model, samples: Sequence, collate, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """Per-patient pooled features of each modality (after SMIL and CMSA) and their fusion."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(samples), batch_size):
        pooled = model.forward_features(collate(samples[start : start + batch_size]))
        pooled["fusion"] = torch.cat([pooled[m] for m in model.modalities], dim=1)
        for name, value in pooled.items():
            parts.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def _grad_cam_figure(model, sample, collate, class_index, class_name, out_dir) -> Path:
    """Grad-CAM of the true class on each modality's (first) image of one test patient."""
    batch = collate([sample])
    images, cams = {}, {}
    for modality in model.modalities:
        target = last_feature_module(model.encoders[modality])
        maps = grad_cam(model, batch, target, class_index=class_index)
        image = sample.tem[0] if modality == "TEM" else getattr(sample, modality.lower())
        images[modality] = image.permute(1, 2, 0).numpy()
        cams[modality] = maps[0]
    return figures.plot_grad_cam(
        images,
        cams,
        out_dir / f"grad_cam_{class_name}_{sample.patient_id}.png",
        title=f"Grad-CAM, {class_name} patient {sample.patient_id} (Fig. 8)",
    )
