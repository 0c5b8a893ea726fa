"""Train and evaluate one MHD-Net variant on one fold, and write the fold's files.

The kinds of variant (:mod:`.settings`):

- ``teacher``: eq. 10 on paired CT + WSI sequences; tested with the test patients' CT and WSI
  (Table IV's teacher rows, Fig. 5), so its fold folder also holds ``branches.tsv``, the
  type probabilities of each branch (``radiology``, ``pathology``, ``fusion``) per sequence;
- ``student``: eq. 14 against its trained teacher (loaded from the teacher variant's fold
  checkpoint and frozen); tested on CT alone: the test patients' slides are never opened. Its
  checkpoint is the deployed model (teacher ``B_R`` + memory + student);
- ``ct_resnet``: a plain CT 3D ResNet, trained with cross-entropy, tested on CT alone;
- the comparison methods of Tables III and IV (:mod:`mmdiag.models.mhd_baselines`), each
  tested on CT alone: ``mmformer`` and ``moddrop`` learn from the training patients' CT + WSI
  with modality dropout; ``sckd`` distils its trained teacher (loaded and frozen like a
  student's) into a CT ResNet-18, whose checkpoint is the deployed model; ``pcct`` trains on
  CT alone, its two loss stages timed by the fold's number of training steps.

One prediction per test CT sequence (a tumour sequence; "other" sequences only train). With
``sequences.keep_other`` the networks have a ninth output for "other"; the test probabilities
are the softmax over the type logits alone (the test sequences are all tumour sequences).
No validation set in the paper: the last epoch is kept unless the train settings select one
on the split's validation part. Training state is saved after every epoch beside the fold
folder and resumed after a kill (:mod:`mmdiag.training.resume`).

Side effects: writes, atomically, ``results/{method}/{variant}/fold_{k}/`` (``model.safetensors``,
``predictions.tsv``, ``metrics.tsv``, ``train_log.tsv``, ``config.yaml``, and a teacher's
``branches.tsv``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmdiag.data.splits import load_fold, training_seed
from mmdiag.methods.mhd.data import collate_tensors, fold_datasets, load_patients, sequence_ids
from mmdiag.methods.mhd.kinds import DEPLOYED, TEACHER_READERS
from mmdiag.methods.mhd.settings import (
    build_model,
    task_column,
    train_settings_of,
    type_classes,
)
from mmdiag.models.mhd import BRANCHES
from mmdiag.training.device import resolve_device
from mmdiag.training.fold_outputs import (
    fold_metrics,
    predictions_frame,
    provenance,
    write_fold_folder,
)
from mmdiag.training.loop import batch_indices, train_model
from mmdiag.training.resume import clear_state, fold_resume_key, state_dir_beside
from mmdiag.training.stages import load_stage

log = logging.getLogger(__name__)

#: What MHD-Net reports per CT sequence (Section IV-B): mAcc, macro Pre and Rec, the F1 of
#: those two, and the quadratic weighted kappa of the ordinal types.
METRICS = ("mAcc", "mPre", "mRec", "mF1", "QWK")
#: Batch -> named type logits (a teacher's three branches and its prediction).
Outputs = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
#: The parts of a fold whose patients' slides a kind of variant reads.
WSI_PARTS = {
    "teacher": ("train", "val", "test"),
    "student": ("train",),
    "ct_resnet": (),
    "mmformer": ("train",),
    "moddrop": ("train",),
    "sckd": ("train",),
    "pcct": (),
}


def run_mhd_fold(
    *,
    manifest_path: Path,
    splits_path: Path,
    patches_dir: Path,
    fold: int,
    variant: str,
    method_settings: Mapping,
    manifest_rules: Mapping,
    out_dir: Path,
    method: str = "mhd",
    teacher_checkpoint: Path | None = None,
) -> dict[str, float]:
    """Train ``variant`` on fold ``fold``, write its outputs to ``out_dir``; return the metrics.

    A student (and an SCKD variant) needs ``teacher_checkpoint``, its teacher variant's
    ``model.safetensors`` of the same fold.
    """
    started = time.perf_counter()
    kind = method_settings["variants"][variant]["model"]
    if kind in TEACHER_READERS and teacher_checkpoint is None:
        raise ValueError(f"variant {variant!r} is a {kind}: give its teacher's checkpoint")
    classes = type_classes(method_settings, manifest_rules)
    split = load_fold(splits_path, fold)
    settings = train_settings_of(method_settings, variant)
    settings = replace(settings, seed=training_seed(split, settings.seed))
    patients = load_patients(
        manifest_path, patches_dir, method_settings, task_column(method_settings, manifest_rules)
    )
    datasets = fold_datasets(
        patients, split, classes, method_settings, seed=settings.seed, wsi_parts=WSI_PARTS[kind]
    )
    if not len(datasets["test"]):
        raise ValueError(f"{splits_path}: fold {fold} has no tumour CT sequence to test")

    torch.manual_seed(settings.seed)
    model = _fold_model(method_settings, variant, len(classes), teacher_checkpoint)
    if kind == "pcct":  # the two stages of PCCT's loss are fractions of the training steps
        steps_per_epoch = len(batch_indices(len(datasets["train"]), settings.batch_size))
        model.set_total_steps(settings.epochs * steps_per_epoch)
    inputs = {"manifest": manifest_path, "splits": splits_path}
    if teacher_checkpoint is not None:
        inputs["teacher"] = teacher_checkpoint
    state_dir = state_dir_beside(out_dir)
    history = train_model(
        model,
        datasets["train"],
        collate_tensors,
        settings,
        val_samples=datasets["val"],
        description=f"{method}/{variant}/fold {fold}",
        resume_dir=state_dir,
        resume_key=fold_resume_key(method, variant, fold, method_settings, inputs),
    )
    device = resolve_device(settings.device)
    evaluated = (model.deploy() if kind in DEPLOYED else model).to(device).eval()
    test = datasets["test"]
    outputs = predict_types(
        _output_function(kind, evaluated), test, len(classes), settings.batch_size, device
    )
    predictions = _predictions(test, outputs["prediction"], fold, variant, classes)
    metrics = fold_metrics(predictions, classes, METRICS)
    tables = {}
    if kind == "teacher":
        tables["branches.tsv"] = branch_table(test, outputs, fold, variant, classes)
    resolved = provenance(
        method=method,
        variant=variant,
        fold=fold,
        method_settings=method_settings,
        classes=classes,
        inputs=inputs,
        n_cases=_case_counts(datasets),
        unit="sequence",
    )
    write_fold_folder(
        out_dir,
        method=method,
        predictions=predictions,
        metrics=metrics,
        resolved=resolved,
        model=evaluated,
        history=history,
        tables=tables,
    )
    clear_state(state_dir)
    log.info(
        "%s/%s fold %d: %d train, %d test sequences, %s (%.1f s)",
        method,
        variant,
        fold,
        len(datasets["train"]),
        len(test),
        " ".join(f"{m}={v:.3f}" for m, v in metrics.items()),
        time.perf_counter() - started,
    )
    return metrics


def _fold_model(
    method_settings: Mapping, variant: str, n_types: int, teacher_checkpoint: Path | None
) -> torch.nn.Module:
    """The variant's network; a student's teacher and memory (an SCKD variant's teacher)
    loaded from the teacher's fold checkpoint (every tensor must fit) and frozen."""
    model = build_model(method_settings, variant, n_types)
    kind = method_settings["variants"][variant]["model"]
    if kind in TEACHER_READERS:
        load_stage(model.teacher, teacher_checkpoint, prefix="teacher.")
    if kind == "student":
        load_stage(model.memory, teacher_checkpoint, prefix="memory.")
    return model


def _output_function(kind: str, model: torch.nn.Module) -> Outputs:
    """Batch -> named logits: a teacher's three branches (its prediction is the fusion
    branch's), else the model's logits, from the batch's CT alone."""
    if kind == "teacher":

        def teacher_outputs(batch):
            out = model.teacher(batch["ct"], batch["wsi"])
            logits = {b: out[f"logits_{b}"] for b in BRANCHES}
            return logits | {"prediction": logits["fusion"]}

        return teacher_outputs
    return lambda batch: {"prediction": model({"ct": batch["ct"]})}


@torch.no_grad()
def predict_types(
    outputs: Outputs,
    dataset: Sequence,
    n_types: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Type probabilities ``(n, K)`` of every output, in dataset order, in evaluation mode.

    Each is the softmax over the first ``K`` logits (the "other" logit, when the network has
    one, is left out). Only ``ct`` (and a teacher's ``wsi``) reach the network: never a label.
    """
    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_tensors(items)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("ct", "wsi")}
        for name, logits in outputs(batch).items():
            probability = torch.softmax(logits[:, :n_types].float(), dim=1).cpu()
            collected.setdefault(name, []).append(probability)
    return {name: torch.cat(parts).numpy() for name, parts in collected.items()}


def _labels(dataset) -> np.ndarray:
    return np.array([sample.class_index for sample in dataset.samples])


def _predictions(dataset, prob: np.ndarray, fold: int, variant: str, classes) -> pd.DataFrame:
    """``predictions.tsv`` rows, one per test sequence (``sequence`` names it)."""
    return predictions_frame(
        [sample.patient_id for sample in dataset.samples],
        fold=fold,
        variant=variant,
        y_true=_labels(dataset),
        prob=prob,
        classes=classes,
        extra={"sequence": sequence_ids(dataset)},
    )


def branch_table(dataset, outputs: Mapping, fold: int, variant: str, classes) -> pd.DataFrame:
    """A teacher's per-branch type probabilities (``branch`` column), one row per sequence
    and branch, in the layout of ``predictions.tsv`` (Fig. 5's curves)."""
    frames = []
    for branch in BRANCHES:
        frame = _predictions(dataset, outputs[branch], fold, variant, classes)
        frame.insert(3, "branch", branch)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _case_counts(datasets: Mapping) -> dict[str, int]:
    counts = {f"{part}_sequences": len(ds) for part, ds in datasets.items()}
    patients = {
        f"{part}_patients": len({s.patient_id for s in ds.samples}) for part, ds in datasets.items()
    }
    return counts | patients
