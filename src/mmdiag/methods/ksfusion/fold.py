"""Train and evaluate one subspace-fusion variant on one split, for every task, and write the
split's fold folder.

Each task of ``outcomes`` (diagnosis, grading, survival) gets its own model, trained on the
tissue samples of the training patients, its epoch kept on the validation patients' samples
and tested on the test patients' samples (:mod:`.data`). The gene space (highly variable
genes, z-scores) and the survival bins are fitted on the training samples only, once per
split, and shared by the tasks; at test time a model sees the sample's features and genes,
never its label. ``cg_coord`` variants coordinate the classifier's branch gradients (eq. 5)
in the loop's ``before_step`` hook.

Side effects: writes, atomically, ``results/{method}/{variant}/fold_{k}/``: ``model.safetensors``
(one model per task, prefixed ``<task>.``), ``predictions.tsv`` (one row per test sample and
task, with ``sample_id``; survival rows carry ``time``, ``event``, ``risk`` and each bin's
event probability), ``metrics.tsv`` (``<task>/<metric>``), ``train_log.tsv`` (with
``task``), ``genes.tsv`` (the fitted gene space) and ``config.yaml``. Training state is saved
after every epoch beside it and resumed after a kill.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmdiag.data.manifest import read_manifest
from mmdiag.data.splits import load_fold, training_seed
from mmdiag.data.tasks import cohort_tasks, patient_labels
from mmdiag.methods.ksfusion import data
from mmdiag.methods.ksfusion.settings import (
    MODELS,
    SURVIVAL,
    model_of,
    network_options,
    task_kind,
    train_settings_of,
    uses_cg_coord,
)
from mmdiag.models.ksfusion import GradientCoordination
from mmdiag.models.registry import create_model
from mmdiag.stats import concordance_index
from mmdiag.training.device import resolve_device
from mmdiag.training.fold_outputs import (
    fold_metrics,
    multitask_predictions,
    predictions_frame,
    provenance,
    write_fold_folder,
)
from mmdiag.training.loop import train_model
from mmdiag.training.resume import clear_state, fold_resume_key, state_dir_beside
from mmdiag.training.survival import risk_from_hazards, survival_from_hazards

log = logging.getLogger(__name__)

#: Table 1's metrics: macro AUC, accuracy, sensitivity, specificity, F1; survival: C-index.
CLASSIFICATION_METRICS = ("AUC", "ACC", "REC", "SPE", "F1")
SURVIVAL_METRICS = ("C-index",)
_LABEL_KEYS = ("label", "time", "event")


@dataclass(frozen=True)
class FoldInputs:
    """The files one fold job reads."""

    manifest: Path
    splits: Path
    feature_stores: Path
    expression: Path
    gene_sets: Path


@dataclass(frozen=True)
class TaskData:
    """One task's samples per part, its class names and kind."""

    name: str
    kind: str
    classes: list[str]
    parts: dict[str, list[data.Sample]]


def run_ksfusion_fold(
    *,
    inputs: FoldInputs,
    fold: int,
    variant: str,
    method_settings: Mapping,
    manifest_rules: Mapping,
    out_dir: Path,
    method: str = "ksfusion",
) -> dict[str, float]:
    """Train ``variant`` on split ``fold`` for every task; write its fold folder; return the
    metrics."""
    started = time.perf_counter()
    split = load_fold(inputs.splits, fold)
    manifest = read_manifest(inputs.manifest)
    seed = training_seed(split, int(method_settings.get("seed", 0)))
    base, space = split_samples(inputs, manifest, split, method_settings, seed)
    state_dir = state_dir_beside(out_dir)
    named = _named(inputs)
    models, frames, metrics, history, coordinated = {}, {}, {}, [], {}
    tasks = fold_tasks(manifest, split, base, method_settings, manifest_rules)
    for task in tasks:
        settings = train_settings_of(method_settings, variant, task.name)
        settings = replace(settings, seed=training_seed(split, settings.seed))
        torch.manual_seed(settings.seed)
        model = build_model(method_settings, variant, task, space)
        coordination = _coordination(method_settings, variant, task.kind)
        rows = train_model(
            model,
            task.parts["train"],
            data.collate,
            settings,
            val_samples=task.parts["val"],
            description=f"{method}/{variant}/split {fold}/{task.name}",
            before_step=coordination,
            validate=_survival_validation(settings) if task.kind == "survival" else None,
            resume_dir=state_dir / task.name,
            resume_key=fold_resume_key(method, variant, fold, method_settings, named),
        )
        history += [{"task": task.name, **row} for row in rows]
        if coordination is not None:
            coordinated[task.name] = coordination.counts()
            log.info("%s CG-Coord: %s", task.name, coordinated[task.name])
        frames[task.name] = _task_predictions(model, task, fold, variant, settings)
        metrics |= _task_metrics(frames[task.name], task)
        models[task.name] = model
    predictions = multitask_predictions(frames)
    resolved = provenance(
        method=method,
        variant=variant,
        fold=fold,
        method_settings=method_settings,
        classes=[],
        inputs=named,
        n_cases={part: len(base[part]) for part in data.PARTS},
        unit="tissue sample",
        outcomes=dict(method_settings["outcomes"]),
        task_classes={task.name: task.classes for task in tasks},
        genes={"n": len(space.genes), **{k: len(v) for k, v in space.subspaces.items()}},
        cg_coord=coordinated or None,
    )
    write_fold_folder(
        out_dir,
        method=method,
        predictions=predictions,
        metrics=metrics,
        resolved=resolved,
        model=nn.ModuleDict(models),
        history=history,
        tables={"genes.tsv": gene_table(space)},
    )
    clear_state(state_dir)
    log.info(
        "%s/%s split %d: %s (%.1f s)",
        method,
        variant,
        fold,
        " ".join(f"{m}={v:.3f}" for m, v in metrics.items()),
        time.perf_counter() - started,
    )
    return metrics


# ---------------------------------------------------------------------------- the samples


def split_samples(
    inputs: FoldInputs, manifest: pd.DataFrame, split: Mapping, method_settings: Mapping, seed: int
) -> tuple[dict[str, list[data.Sample]], data.GeneSpace]:
    """Every tissue sample of the split's patients, per part (unlabelled), and the gene space
    fitted on the training samples."""
    samples = data.slide_samples(manifest, inputs.manifest)
    gene_settings = method_settings["genes"]
    expression = data.sample_expression(inputs.expression, samples, gene_settings["sample_key"])
    parts = {}
    for part in data.PARTS:
        patients = set(split[part])
        chosen = samples[samples["patient_id"].isin(patients)]
        without = sorted(patients - set(chosen["patient_id"]))
        if without:
            raise ValueError(f"{inputs.manifest}: split patients {without[:5]} have no slide")
        parts[part] = chosen
    space = data.fit_gene_space(
        expression.loc[parts["train"]["sample_id"]], inputs.gene_sets, gene_settings
    )
    slides = method_settings["slides"]
    features = data.slide_features(samples, inputs.feature_stores, slides["scale"], inputs.manifest)
    genes = dict(zip(expression.index, space.transform(expression), strict=True))
    base = {}
    for part, chosen in parts.items():
        base[part] = [
            _sample(row, features[row.sample_id], genes[row.sample_id], slides, seed)
            for row in chosen.itertuples()
        ]
    return base, space


def _sample(row, features_xy, genes: np.ndarray, slides: Mapping, seed: int) -> data.Sample:
    features, centre_xy = features_xy
    # one stream per sample: its patch set depends on the split's seed and the sample only
    rng = np.random.default_rng([seed, *row.sample_id.encode()])
    grid, mask = data.patch_grid(features, centre_xy, slides["grid_cells"])
    return data.Sample(
        sample_id=row.sample_id,
        patient_id=row.patient_id,
        label=-1,
        patches=data.fixed_patch_set(features.astype(np.float32), slides["n_patches"], rng),
        grid=grid,
        grid_mask=mask,
        genes=genes,
    )


def fold_tasks(
    manifest: pd.DataFrame,
    split: Mapping,
    base: Mapping[str, list[data.Sample]],
    method_settings: Mapping,
    manifest_rules: Mapping,
) -> list[TaskData]:
    """Each configured task's labelled samples per part (survival bins fitted on the training
    patients)."""
    available = cohort_tasks(manifest_rules)
    tasks = []
    for name, target in method_settings["outcomes"].items():
        if target == SURVIVAL:
            outcomes = _outcomes(manifest)
            n_bins = int(method_settings["n_time_bins"])
            edges = data.survival_bins(outcomes, split["train"], n_bins)
            parts = {p: data.task_samples(base[p], {}, outcomes, edges) for p in data.PARTS}
            classes = [f"bin_{k}" for k in range(n_bins)]
        else:
            task = available[target]
            labels = patient_labels(manifest, [task]).set_index("patient_id")[task.name]
            parts = {p: data.task_samples(base[p], labels.to_dict()) for p in data.PARTS}
            classes = list(task.classes)
        empty = [part for part in data.PARTS if not parts[part]]
        if empty:
            raise ValueError(f"task {name!r}: no labelled samples in the {', '.join(empty)} part")
        tasks.append(TaskData(name, task_kind(target), classes, parts))
    return tasks


def _outcomes(manifest: pd.DataFrame) -> pd.DataFrame:
    patients = manifest.drop_duplicates("patient_id").set_index("patient_id")
    return patients[["survival_months", "event"]].astype("float64")


def gene_table(space: data.GeneSpace) -> pd.DataFrame:
    """The fitted gene space: each gene's training mean and sd and its subspaces/groups."""
    pre = space.preprocessor
    position = {gene: i for i, gene in enumerate(pre.genes_)}
    frame = pd.DataFrame({"gene": space.genes})
    if pre.zscore:
        frame["train_mean"] = [pre.mean_[position[g]] for g in space.genes]
        frame["train_sd"] = [pre.std_[position[g]] for g in space.genes]
    for name, indices in {**space.subspaces, **space.groups}.items():
        frame[name] = np.isin(np.arange(len(space.genes)), indices).astype(int)
    return frame


# ---------------------------------------------------------------------------- the models


#: What each model's constructor takes beside ``n_outputs`` and ``task``.
MODEL_INPUTS = {
    "attmil": ("in_dim",),
    "transmil": ("in_dim",),
    "snn": ("n_genes",),
    "concat": ("in_dim", "n_genes"),
    "add": ("in_dim", "n_genes"),
    "bilinear": ("in_dim", "n_genes"),
    "mcat": ("in_dim", "groups"),
    "cmta": ("in_dim", "groups"),
    "ksfusion": ("in_dim", "n_genes", "subspaces", "grid_size"),
}


def build_model(
    method_settings: Mapping, variant: str, task: TaskData, space: data.GeneSpace
) -> nn.Module:
    """The variant's registered model for the task, given the input sizes it needs: MCAT's
    and CMTA's genomic tokens are the configured groups (the two subspaces when none are),
    the proposed model's subspaces the tumour and microenvironment sets and its reference
    grid the feature map."""
    model = model_of(method_settings, variant)
    sample = task.parts["train"][0]
    offered = {
        "in_dim": sample.patches.shape[1],
        "n_genes": len(sample.genes),
        "groups": {"gene_groups": space.groups or space.subspaces},
        "subspaces": {"gene_groups": space.subspaces},
        "grid_size": tuple(method_settings["slides"]["grid_cells"]),
    }
    kwargs = {"n_outputs": len(task.classes), "task": task.kind}
    for name in MODEL_INPUTS[model]:
        value = offered[name]
        kwargs |= value if isinstance(value, dict) else {name: value}
    return create_model(MODELS[model], **(kwargs | network_options(method_settings, variant)))


def _coordination(method_settings: Mapping, variant: str, kind: str):
    if not uses_cg_coord(method_settings, variant):
        return None
    return GradientCoordination(task=kind)


def _without_labels(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in _LABEL_KEYS}


@torch.no_grad()
def predict_logits(model: nn.Module, samples: Sequence[data.Sample], batch_size: int, device):
    """The model's outputs on ``samples`` in evaluation mode, from inputs without labels."""
    model.to(device).eval()
    rows = []
    for start in range(0, len(samples), batch_size):
        batch = data.collate(samples[start : start + batch_size])
        inputs = {k: v.to(device) for k, v in _without_labels(batch).items()}
        rows.append(model(inputs).float().cpu())
    return torch.cat(rows)


def _survival_validation(settings):
    device = resolve_device(settings.device)

    def validate(model: nn.Module, samples: Sequence[data.Sample]) -> dict[str, float]:
        risk = risk_from_hazards(predict_logits(model, samples, settings.batch_size, device))
        time_, event = (np.array([getattr(s, k) for s in samples]) for k in ("time", "event"))
        if not event.any():
            return {"val_cindex": math.nan}
        return {"val_cindex": float(concordance_index(time_, event, risk.numpy()))}

    return validate


def event_bin_probabilities(hazard_logits: torch.Tensor) -> torch.Tensor:
    """P(event in bin k) = S_{k-1} h_k, the last bin taking the rest (rows sum to 1)."""
    survival = survival_from_hazards(hazard_logits)
    before = torch.nn.functional.pad(survival[:, :-1], (1, 0), value=1.0)
    prob = before * torch.sigmoid(hazard_logits)
    prob[:, -1] = before[:, -1]
    return prob


def _task_predictions(model, task: TaskData, fold: int, variant: str, settings) -> pd.DataFrame:
    test = task.parts["test"]
    logits = predict_logits(model, test, settings.batch_size, resolve_device(settings.device))
    survival = None
    if task.kind == "survival":
        prob = event_bin_probabilities(logits).numpy()
        survival = {
            "time": [s.time for s in test],
            "event": [s.event for s in test],
            "risk": risk_from_hazards(logits).numpy(),
        }
    else:
        prob = logits.softmax(dim=1).numpy()
    return predictions_frame(
        [s.patient_id for s in test],
        fold=fold,
        variant=variant,
        y_true=[s.label for s in test],
        prob=prob,
        classes=task.classes,
        survival=survival,
        extra={"sample_id": [s.sample_id for s in test]},
    )


def _task_metrics(predictions: pd.DataFrame, task: TaskData) -> dict[str, float]:
    names = SURVIVAL_METRICS if task.kind == "survival" else CLASSIFICATION_METRICS
    scores = fold_metrics(predictions, task.classes, names)
    return {f"{task.name}/{metric}": value for metric, value in scores.items()}


def _named(inputs: FoldInputs) -> dict[str, Path]:
    return {
        "manifest": inputs.manifest,
        "splits": inputs.splits,
        "feature_stores": inputs.feature_stores,
        "expression": inputs.expression,
        "gene_sets": inputs.gene_sets,
    }
