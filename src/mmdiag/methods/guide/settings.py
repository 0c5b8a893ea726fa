"""DeepGuide's settings as the trainers and the figures use them (``methods.<name>``).

A variant is one of the kinds of :data:`KINDS`, the rows of Table 1:

- ``superior`` (P): CLAM_SB on the bag of a patient's WSI patch features; z_S is its
  attention-pooled feature, D_S its bag classifier. Tested with the test patients' slides.
- ``inferior`` (R): MONAI's 3D DenseNet on one MR sequence (``sequence``) or on all of them as
  channels (``all``; the paper leaves ALL undefined); z_I is its pooled feature, D_I its last
  linear layer. Tested on MR.
- ``guidance`` (G(R)): G (eq. 4) fitted by MSE from the ``inferior`` variant's z_I to the
  ``superior`` variant's z_S on the training patients; tested as the superior's frozen D_S on
  G(z_I): MR alone.
- ``guided`` (G(R) + R, eq. 5): a linear D_c on [G(z_I) ⌢ z_I] with the ``guidance`` variant's
  G frozen; MR alone.
- ``retrained_head`` (a control the paper lacks): D_c's recipe on z_I alone, so that a gain of
  the guided row can be told apart from the gain of retraining a head with class weights.
- ``fusion`` (P + R): a linear classifier on [z_S ⌢ z_I]; tested with both modalities.

Training recipes are the supplement's Table 1 (:data:`PAPER_RECIPES`), one per kind; the
config's ``train.<recipe>`` and a variant's ``train`` override them key by key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mmdiag.training.loop import TrainSettings

KINDS = ("superior", "inferior", "guidance", "guided", "retrained_head", "fusion")
#: The kinds trained on latents of other variants of the same split (not on images).
LATENT_KINDS = ("guidance", "guided", "retrained_head", "fusion")
#: The variant references each kind must name, and the kind each must have.
REFERENCES = {
    "guidance": {"inferior": "inferior", "superior": "superior"},
    "guided": {"guidance": "guidance"},
    "retrained_head": {"inferior": "inferior"},
    "fusion": {"inferior": "inferior", "superior": "superior"},
}
#: The supplement's recipe (row of its Table 1) each kind trains with.
RECIPE_OF_KIND = {
    "superior": "superior",
    "inferior": "inferior",
    "guidance": "guidance",
    "guided": "guided",
    "retrained_head": "guided",
    "fusion": "fusion",
}
#: The ``sequence`` of an inferior variant that stacks every sequence as a channel.
ALL_SEQUENCES = "all"
_RADPATH_WEIGHTS = (1.0, 1.7, 1.6)
#: Supplement Table 1 (RadPath rows): P, R, G(R), G(R) + R and P + R. Patience counts epochs
#: without a lower validation loss; the best epoch is restored. Momentum 0: the paper says SGD.
PAPER_RECIPES: dict[str, dict] = {
    "superior": {"epochs": 200, "batch_size": 1, "optimizer": "adam", "lr": 1e-4, "patience": 20,
                 "class_weights": "none", "sampler": "balanced"},
    "inferior": {"epochs": 600, "batch_size": 10, "optimizer": "adam", "lr": 2e-4, "patience": 50,
                 "class_weights": "none", "sampler": "balanced"},
    "guidance": {"epochs": 150, "batch_size": 50, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0,
                 "patience": None, "class_weights": "none", "sampler": "shuffle"},
    "guided": {"epochs": 500, "batch_size": 50, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.0,
               "patience": 200, "class_weights": _RADPATH_WEIGHTS, "sampler": "balanced"},
    "fusion": {"epochs": 500, "batch_size": 50, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.0,
               "patience": 200, "class_weights": _RADPATH_WEIGHTS, "sampler": "balanced"},
}  # fmt: skip
_COMMON = {"weight_decay": 0.0, "seed": 0, "device": "auto", "num_threads": 0, "nesterov": False}


def kind_of(method_settings: Mapping, variant: str) -> str:
    return method_settings["variants"][variant]["model"]


def recipe(method_settings: Mapping, variant: str) -> dict:
    """The variant's training recipe: its kind's paper recipe, the config's ``train.<recipe>``
    over it, the variant's ``train`` over that."""
    name = RECIPE_OF_KIND[kind_of(method_settings, variant)]
    configured = (method_settings.get("train") or {}).get(name) or {}
    own = method_settings["variants"][variant].get("train") or {}
    return _COMMON | PAPER_RECIPES[name] | dict(configured) | dict(own)


def train_settings_of(method_settings: Mapping, variant: str) -> TrainSettings:
    """The recipe as the training loop's settings: no learning-rate schedule (the paper gives
    none); with a patience, early stopping on the validation loss with the best epoch
    restored, else every epoch and the last one kept."""
    chosen = recipe(method_settings, variant)
    patience = chosen["patience"]
    class_weights = chosen["class_weights"]
    return TrainSettings(
        epochs=int(chosen["epochs"]),
        batch_size=int(chosen["batch_size"]),
        lr=float(chosen["lr"]),
        lr_min=0.0,
        weight_decay=float(chosen["weight_decay"]),
        seed=int(chosen["seed"]),
        device=chosen["device"],
        optimizer=chosen["optimizer"],
        momentum=float(chosen.get("momentum", 0.0)),
        nesterov=bool(chosen["nesterov"]),
        scheduler="none",
        early_stopping_patience=patience,
        restore_best=patience is not None,
        monitor="val_loss",
        class_weights=class_weights if isinstance(class_weights, str) else tuple(class_weights),
        sampler=chosen["sampler"],
    )


def inferior_channels(method_settings: Mapping, variant: str) -> list[str]:
    """The MR sequences an inferior variant reads, in channel order."""
    sequence = method_settings["variants"][variant]["sequence"]
    known = list(method_settings["inferior"]["sequences"])
    return known if sequence == ALL_SEQUENCES else [sequence]


def upstream(method_settings: Mapping, variant: str) -> dict[str, str]:
    """The variants a latent kind reads, by role (``inferior``, ``superior``, ``guidance``);
    a guided variant also reads the inferior of its guidance variant."""
    spec = method_settings["variants"][variant]
    roles = {role: spec[role] for role in REFERENCES.get(spec["model"], {})}
    if spec["model"] == "guided":
        roles["inferior"] = method_settings["variants"][spec["guidance"]]["inferior"]
    return roles


def network_options(method_settings: Mapping, variant: str, part: str) -> dict:
    """``network.<part>`` with the variant's ``options`` over it."""
    return dict(method_settings["network"][part]) | dict(
        method_settings["variants"][variant]["options"]
    )


def config_problems(method: str, settings: Mapping, config: Mapping) -> Iterable[str]:
    """Checked when the config is validated: every variant names the variants its kind reads
    (of the right kinds) and nothing else, an inferior names a known sequence, and class
    weights give one weight per class."""
    variants = settings["variants"]
    where = f"methods.{method}.variants"
    for name, spec in variants.items():
        kind = spec["model"]
        needed = REFERENCES.get(kind, {})
        for role in ("inferior", "superior", "guidance"):
            target = spec.get(role)
            if role not in needed:
                if target:
                    yield f"{where}.{name}.{role}: a {kind} variant reads no {role} variant"
                continue
            allowed = sorted(v for v, s in variants.items() if s["model"] == needed[role])
            if target not in allowed:
                yield f"{where}.{name}.{role}: {target!r} is not one of {allowed}"
        sequences = [*settings["inferior"]["sequences"], ALL_SEQUENCES]
        if kind == "inferior" and spec.get("sequence") not in sequences:
            yield f"{where}.{name}.sequence: {spec.get('sequence')!r} is not one of {sequences}"
        if kind != "inferior" and spec.get("sequence"):
            yield f"{where}.{name}.sequence: only an inferior variant reads a sequence"
    yield from _class_weight_problems(method, settings, config)
    yield from _crop_problems(method, settings)


def smallest_crop(block_config) -> int:
    """The least crop side a 3D DenseNet with these blocks takes: the stem halves twice and
    each transition once more, and the last map must keep one voxel per side."""
    return 2 ** (len(block_config) + 1)


def _crop_problems(method: str, settings: Mapping) -> Iterable[str]:
    crop = settings["inferior"]["crop_vox"]
    for name, spec in settings["variants"].items():
        if spec["model"] != "inferior":
            continue
        blocks = network_options(settings, name, "densenet")["block_config"]
        if min(crop) < smallest_crop(blocks):
            yield (
                f"methods.{method}.inferior.crop_vox: {list(crop)} is too small for variant "
                f"{name}'s {len(blocks)} dense blocks (each side needs >= {smallest_crop(blocks)})"
            )
    volume = settings["inferior"]["volume_vox"]
    if any(c > v for c, v in zip(crop, volume, strict=True)):
        yield f"methods.{method}.inferior.crop_vox: {list(crop)} exceeds volume_vox {list(volume)}"


def _class_weight_problems(method: str, settings: Mapping, config: Mapping) -> Iterable[str]:
    from mmdiag.config import cohort_manifest_rules

    n_classes = len(cohort_manifest_rules(config, settings["cohort"])["classes"])
    for name in settings["variants"]:
        weights = recipe(settings, name)["class_weights"]
        if not isinstance(weights, str) and len(weights) != n_classes:
            yield (
                f"methods.{method}.variants.{name}: {len(weights)} class weights for "
                f"{n_classes} classes"
            )
