"""Train and evaluate one DeepGuide variant on one split, and write the split's fold folder.

Kinds (:mod:`.settings`): ``superior`` and ``inferior`` train on images (WSI feature bags, MR
volumes) and also write the latents of every patient of the split (``latents.safetensors``
and ``latents.tsv``; evaluation mode, centred crops: one latent per patient, never batch
statistics of single samples). The latent kinds (``guidance``, ``guided``,
``retrained_head``, ``fusion``) read those latents of the same split; they fit on the
training patients, select the epoch on the validation patients (when their recipe has a
patience) and predict the test patients. Only ``superior`` and ``fusion`` read the test
patients' slides; every other kind is tested on MR alone.

Side effects: writes, atomically, ``results/{method}/{variant}/fold_{k}/`` (``model.safetensors``,
``predictions.tsv``, ``metrics.tsv``, ``train_log.tsv``, ``config.yaml``, and the latents of
``superior`` and ``inferior``). Training state is saved after every epoch beside it and
resumed after a kill (:mod:`mmdiag.training.resume`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mmdiag.data.manifest import read_manifest
from mmdiag.data.splits import load_fold, training_seed
from mmdiag.methods.guide import data
from mmdiag.methods.guide.settings import (
    inferior_channels,
    kind_of,
    network_options,
    train_settings_of,
    upstream,
)
from mmdiag.models.guide import (
    ClamSB,
    DenseNetVolumeClassifier,
    GuidanceFit,
    GuidanceModel,
    GuidedClassifier,
    LatentLinear,
)
from mmdiag.training.device import resolve_device
from mmdiag.training.fold_outputs import (
    fold_metrics,
    predictions_frame,
    provenance,
    write_fold_folder,
)
from mmdiag.training.loop import predict_proba, train_model
from mmdiag.training.resume import clear_state, fold_resume_key, state_dir_beside
from mmdiag.training.stages import load_stage

log = logging.getLogger(__name__)

#: What DeepGuide reports (Section 4): balanced accuracy, micro F1, and AUROC.
METRICS = ("BACC", "microF1", "AUC")


@dataclass(frozen=True)
class FoldInputs:
    """The files one fold job reads: always the manifest and the split; the feature stores
    (superior), and the fold folders of the variants a latent kind reads, by role."""

    manifest: Path
    splits: Path
    feature_stores: Path | None = None
    upstream: Mapping[str, Path] | None = None


@dataclass
class FoldRun:
    """What a kind's trainer hands back: the evaluated model, its training log, the test
    probabilities and, for image kinds, every patient's latent."""

    model: nn.Module
    history: list
    test_prob: np.ndarray
    latents: tuple[torch.Tensor, list[str]] | None = None


def run_guide_fold(
    *,
    inputs: FoldInputs,
    fold: int,
    variant: str,
    method_settings: Mapping,
    classes: Sequence[str],
    out_dir: Path,
    method: str = "guide",
) -> dict[str, float]:
    """Train ``variant`` on split ``fold``, write its fold folder; return the metrics."""
    started = time.perf_counter()
    kind = kind_of(method_settings, variant)
    split = load_fold(inputs.splits, fold)
    manifest = read_manifest(inputs.manifest)
    labels = data.fold_labels(manifest, split, classes, inputs.manifest)
    settings = train_settings_of(method_settings, variant)
    settings = replace(settings, seed=training_seed(split, settings.seed))
    state_dir = state_dir_beside(out_dir)
    resume = {
        "resume_dir": state_dir,
        "resume_key": fold_resume_key(method, variant, fold, method_settings, _named(inputs)),
        "description": f"{method}/{variant}/split {fold}",
    }
    torch.manual_seed(settings.seed)
    trainer = _TRAINERS[kind]
    run = trainer(
        inputs, manifest, labels, method_settings, variant, len(classes), settings, resume
    )
    test_ids = list(labels["test"])
    predictions = predictions_frame(
        test_ids,
        fold=fold,
        variant=variant,
        y_true=[labels["test"][p] for p in test_ids],
        prob=run.test_prob,
        classes=classes,
    )
    metrics = fold_metrics(predictions, classes, METRICS)
    tensors, tables = {}, {}
    if run.latents is not None:
        tensors, ids = data.latent_files(*run.latents)
        tables[data.LATENT_IDS_FILE] = ids
    resolved = provenance(
        method=method,
        variant=variant,
        fold=fold,
        method_settings=method_settings,
        classes=classes,
        inputs=_named(inputs),
        n_cases={part: len(labels[part]) for part in data.PARTS},
        unit="patient",
        tested_on=_TESTED_ON[kind],
    )
    write_fold_folder(
        out_dir,
        method=method,
        predictions=predictions,
        metrics=metrics,
        resolved=resolved,
        model=run.model,
        history=run.history,
        tables=tables,
        tensors=tensors,
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


_TESTED_ON = {
    "superior": "WSI",
    "inferior": "MR",
    "guidance": "MR",
    "guided": "MR",
    "retrained_head": "MR",
    "fusion": "WSI + MR",
}


def _named(inputs: FoldInputs) -> dict[str, Path]:
    named = {"manifest": inputs.manifest, "splits": inputs.splits}
    if inputs.feature_stores is not None:
        named["feature_stores"] = inputs.feature_stores
    for role, folder in (inputs.upstream or {}).items():
        named[role] = folder / "model.safetensors"
        if (folder / data.LATENTS_FILE).is_file():
            named[f"{role}_latents"] = folder / data.LATENTS_FILE
    return named


def _fit(model, cases, collate, settings, resume) -> list:
    """The training loop on the training cases, validating on the validation cases when the
    recipe selects an epoch."""
    val = cases["val"] if settings.needs_validation else ()
    return train_model(model, cases["train"], collate, settings, val_samples=val, **resume)


def _probabilities(model, cases, collate, settings) -> np.ndarray:
    device = resolve_device(settings.device)
    prob, _ = predict_proba(
        model.to(device), cases, collate, batch_size=settings.batch_size, device=device
    )
    return prob.numpy()


@torch.no_grad()
def _encode_all(model, encode, cases: Sequence[data.Case], collate, batch_size: int, device):
    """Every case's latent ``encode(batch)`` with ``model`` in evaluation mode (the batch
    reaches it without its labels)."""
    model.to(device).eval()
    rows = []
    for start in range(0, len(cases), batch_size):
        batch = collate(cases[start : start + batch_size], None)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "label"}
        rows.append(encode(inputs).cpu())
    return torch.cat(rows), [case.patient_id for case in cases]


# --------------------------------------------------------------------------- image kinds


def _train_superior(
    inputs, manifest, labels, method_settings, variant, n_classes, settings, resume
):
    """P: CLAM_SB on each patient's bag of patch features."""
    scale = method_settings["superior"]["scale"]
    bags = data.patient_bags(manifest, inputs.feature_stores, scale, inputs.manifest)
    cases = {part: data.bag_cases(labels[part], bags, inputs.feature_stores) for part in data.PARTS}
    in_dim = cases["train"][0].data.shape[1]
    model = ClamSB(in_dim, n_classes, **network_options(method_settings, variant, "clam"))
    history = _fit(model, cases, data.bag_collate, settings, resume)
    every = [case for part in data.PARTS for case in cases[part]]
    device = resolve_device(settings.device)
    latents = _encode_all(model, model.encode_batch, every, data.bag_collate, 1, device)
    prob = _probabilities(model, cases["test"], data.bag_collate, settings)
    return FoldRun(model, history, prob, latents)


def _train_inferior(
    inputs, manifest, labels, method_settings, variant, n_classes, settings, resume
):
    """R: the 3D DenseNet on the variant's MR sequences (one, or all as channels)."""
    volume = method_settings["inferior"]
    channels = inferior_channels(method_settings, variant)
    paths = data.sequence_paths(manifest, volume["sequences"], channels, inputs.manifest)
    cases = {
        part: data.volume_cases(labels[part], paths, volume["volume_vox"], inputs.manifest)
        for part in data.PARTS
    }
    collate = data.volume_collate(volume["crop_vox"])
    options = network_options(method_settings, variant, "densenet")
    model = DenseNetVolumeClassifier(len(channels), n_classes, **options)
    history = _fit(model, cases, collate, settings, resume)
    every = [case for part in data.PARTS for case in cases[part]]
    device = resolve_device(settings.device)
    encode = lambda batch: model.encode(batch["volume"])  # noqa: E731
    latents = _encode_all(model, encode, every, collate, settings.batch_size, device)
    prob = _probabilities(model, cases["test"], collate, settings)
    return FoldRun(model, history, prob, latents)


# --------------------------------------------------------------------------- latent kinds


def _latent_tables(inputs: FoldInputs, roles: Sequence[str]) -> list[dict]:
    return [data.read_latents(inputs.upstream[role]) for role in roles]


def _latent_cases(labels, tables, folders, parts=data.PARTS) -> dict[str, list[data.Case]]:
    return {part: data.latent_cases(labels[part], tables, folders) for part in parts}


def _superior_decoder(inputs: FoldInputs) -> nn.Linear:
    """D_S, the superior variant's bag classifier, from its checkpoint (frozen)."""
    checkpoint = inputs.upstream["superior"] / "model.safetensors"
    state = load_file(str(checkpoint))
    prefix = ClamSB.DECODER_PREFIX
    weight, bias = state.get(f"{prefix}weight"), state.get(f"{prefix}bias")
    if weight is None or bias is None:
        raise ValueError(f"{checkpoint}: no {prefix}weight/bias (not a CLAM checkpoint)")
    decoder = nn.Linear(weight.shape[1], weight.shape[0])
    decoder.load_state_dict({"weight": weight, "bias": bias})
    return decoder


def _train_guidance(
    inputs, manifest, labels, method_settings, variant, n_classes, settings, resume
):
    """G(R), eq. 4: G fitted by MSE from z_I to z_S on the training patients; tested as
    D_S(G(z_I)) on the test patients' MR latents alone."""
    inferior, superior = _latent_tables(inputs, ("inferior", "superior"))
    folders = [inputs.upstream["inferior"], inputs.upstream["superior"]]
    train = {"train": data.latent_cases(labels["train"], [inferior, superior], folders)}
    test = data.latent_cases(labels["test"], [inferior], folders[:1])
    inferior_dim = len(next(iter(inferior.values())))
    superior_dim = len(next(iter(superior.values())))
    guidance = GuidanceModel(
        inferior_dim, superior_dim, **network_options(method_settings, variant, "guidance")
    )
    model = GuidanceFit(guidance, _superior_decoder(inputs))
    collate = data.latent_collate((("z_inferior", inferior_dim), ("z_superior", superior_dim)))
    history = _fit(model, train | {"val": ()}, collate, settings, resume)
    return FoldRun(model, history, _probabilities(model, test, collate, settings))


def _train_guided(inputs, manifest, labels, method_settings, variant, n_classes, settings, resume):
    """G(R) + R, eq. 5: linear D_c on [G(z_I) ⌢ z_I], the guidance variant's G frozen."""
    (inferior,) = _latent_tables(inputs, ("inferior",))
    cases = _latent_cases(labels, [inferior], [inputs.upstream["inferior"]])
    inferior_dim = len(next(iter(inferior.values())))
    guidance_variant = method_settings["variants"][variant]["guidance"]
    guidance = _guidance_of(inputs, method_settings, guidance_variant, inferior_dim)
    model = GuidedClassifier(guidance, inferior_dim, n_classes)
    collate = data.latent_collate((("z_inferior", inferior_dim),))
    history = _fit(model, cases, collate, settings, resume)
    return FoldRun(model, history, _probabilities(model, cases["test"], collate, settings))


def _guidance_of(inputs, method_settings, guidance_variant, inferior_dim) -> GuidanceModel:
    """The guidance variant's trained G, loaded from its checkpoint and frozen."""
    checkpoint = inputs.upstream["guidance"] / "model.safetensors"
    state = load_file(str(checkpoint))
    superior_dim = state[f"{GuidanceFit.GUIDANCE_PREFIX}{GuidanceModel.OUTPUT_KEY}"].shape[0]
    options = network_options(method_settings, guidance_variant, "guidance")
    guidance = GuidanceModel(inferior_dim, superior_dim, **options)
    return load_stage(guidance, checkpoint, prefix=GuidanceFit.GUIDANCE_PREFIX)


def _train_linear(inputs, labels, n_classes, settings, resume, roles):
    tables = _latent_tables(inputs, roles)
    cases = _latent_cases(labels, tables, [inputs.upstream[role] for role in roles])
    in_dim = len(cases["train"][0].data)
    model = LatentLinear(in_dim, n_classes)
    collate = data.latent_collate((("z", in_dim),))
    history = _fit(model, cases, collate, settings, resume)
    return FoldRun(model, history, _probabilities(model, cases["test"], collate, settings))


def _train_retrained_head(
    inputs, manifest, labels, method_settings, variant, n_classes, settings, resume
):
    """The control: D_c's recipe (class weights, sampler) on z_I alone."""
    return _train_linear(inputs, labels, n_classes, settings, resume, ("inferior",))


def _train_fusion(inputs, manifest, labels, method_settings, variant, n_classes, settings, resume):
    """P + R: a linear classifier on [z_S ⌢ z_I], tested with both modalities."""
    return _train_linear(inputs, labels, n_classes, settings, resume, ("superior", "inferior"))


_TRAINERS = {
    "superior": _train_superior,
    "inferior": _train_inferior,
    "guidance": _train_guidance,
    "guided": _train_guided,
    "retrained_head": _train_retrained_head,
    "fusion": _train_fusion,
}


def upstream_folders(method_settings: Mapping, variant: str, results: Path, fold: int) -> dict:
    """The fold folders a variant reads, by role (``results/{method}/{variant}/fold_{k}``)."""
    return {
        role: results / name / f"fold_{fold}"
        for role, name in upstream(method_settings, variant).items()
    }
