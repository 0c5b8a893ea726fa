"""Subspace fusion's settings as the trainer and the figures use them (``methods.<name>``).

A variant is one row of Table 1 or 2: its ``model`` is a registered model of the family
(:data:`MODELS`), ``options`` override ``network.<model>``, ``cg_coord`` switches the
confidence-guided gradient coordination (eq. 5; the proposed model only). Each fold job
trains the variant once per task of ``outcomes`` (diagnosis, grading: eqs. 6, 7; survival:
eq. 8), each with its own classifier, as the paper trains one model per task.

The recipes are the paper's (Section 3.1, :data:`PAPER_RECIPES`): Adam 1e-3, weight decay
0.1, batch 8, cosine schedule, 20 epochs for diagnosis and grading, 10 for survival; the best
validation epoch is kept (validation loss for the classifications, validation C-index for
survival). ``train.classification`` or ``train.survival``, then ``train.<task>`` (e.g. one
task's class weights), then a variant's ``train`` override them key by key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mmdiag.training.loop import TrainSettings

#: Table rows -> registered models (:mod:`mmdiag.models.ksfusion`, ``.ksfusion_baselines``).
MODELS = {
    "attmil": "attmil",
    "transmil": "transmil",
    "snn": "snn",
    "concat": "concat_fusion",
    "add": "add_fusion",
    "bilinear": "bilinear_fusion",
    "mcat": "mcat",
    "cmta": "cmta",
    "ksfusion": "ksfusion",
}
#: The task value naming the survival task (the manifest's survival_months and event).
SURVIVAL = "survival"
PAPER_RECIPES: dict[str, dict] = {
    "classification": {"epochs": 20, "batch_size": 8, "optimizer": "adam", "lr": 1e-3,
                       "weight_decay": 0.1, "scheduler": "cosine", "class_weights": "balanced"},
    "survival": {"epochs": 10, "batch_size": 8, "optimizer": "adam", "lr": 1e-3,
                 "weight_decay": 0.1, "scheduler": "cosine", "class_weights": "none"},
}  # fmt: skip
_COMMON = {"seed": 0, "device": "auto", "num_threads": 0, "lr_min": 0.0}
#: The value that picks the kept epoch, per kind of task, and whether higher is better.
MONITORS = {"classification": ("val_loss", "min"), "survival": ("val_cindex", "max")}


def task_kind(task: str) -> str:
    return "survival" if task == SURVIVAL else "classification"


def model_of(method_settings: Mapping, variant: str) -> str:
    return method_settings["variants"][variant]["model"]


def recipe(method_settings: Mapping, variant: str, task_name: str) -> dict:
    """The paper's recipe of the task's kind, then ``train.<kind>``, ``train.<task_name>``
    and the variant's ``train``, each over the one before."""
    kind = task_kind(method_settings["outcomes"][task_name])
    train = method_settings.get("train") or {}
    own = method_settings["variants"][variant].get("train") or {}
    layers = [train.get(kind) or {}, train.get(task_name) or {}, own]
    chosen = _COMMON | PAPER_RECIPES[kind]
    for layer in layers:
        chosen |= dict(layer)
    return chosen


def train_settings_of(method_settings: Mapping, variant: str, task_name: str) -> TrainSettings:
    """The recipe as the loop's settings: every epoch trained, the best validation one kept."""
    chosen = recipe(method_settings, variant, task_name)
    monitor, mode = MONITORS[task_kind(method_settings["outcomes"][task_name])]
    weights = chosen["class_weights"]
    return TrainSettings(
        epochs=int(chosen["epochs"]),
        batch_size=int(chosen["batch_size"]),
        lr=float(chosen["lr"]),
        lr_min=float(chosen["lr_min"]),
        weight_decay=float(chosen["weight_decay"]),
        seed=int(chosen["seed"]),
        device=chosen["device"],
        optimizer=chosen["optimizer"],
        scheduler=chosen["scheduler"],
        restore_best=True,
        monitor=monitor,
        monitor_mode=mode,
        class_weights=weights if isinstance(weights, str) else tuple(weights),
    )


def network_options(method_settings: Mapping, variant: str) -> dict:
    """``network.<model>`` with the variant's ``options`` over it."""
    model = model_of(method_settings, variant)
    base = (method_settings.get("network") or {}).get(model) or {}
    return dict(base) | dict(method_settings["variants"][variant].get("options") or {})


def uses_cg_coord(method_settings: Mapping, variant: str) -> bool:
    spec = method_settings["variants"][variant]
    return model_of(method_settings, variant) == "ksfusion" and spec.get("cg_coord") is not False


def config_problems(method: str, settings: Mapping, config: Mapping) -> Iterable[str]:
    """Checked when the config is validated: outcomes name the cohort's tasks (or survival),
    only the proposed model coordinates gradients, class weights fit the classes, and the
    figures name configured variants."""
    from mmdiag.config import cohort_manifest_rules
    from mmdiag.data.tasks import cohort_tasks

    where = f"methods.{method}"
    available = cohort_tasks(cohort_manifest_rules(config, settings["cohort"]))
    for name, task in settings["outcomes"].items():
        if task != SURVIVAL and task not in available:
            yield (
                f"{where}.outcomes.{name}: {task!r} is not a task of cohort {settings['cohort']!r} "
                f"(it has {sorted(available)}, or {SURVIVAL!r})"
            )
    for name, spec in settings["variants"].items():
        if spec.get("cg_coord") is not None and spec["model"] != "ksfusion":
            yield f"{where}.variants.{name}.cg_coord: only the ksfusion model coordinates gradients"
        for task_name, task in settings["outcomes"].items():
            if task == SURVIVAL or task not in available:
                continue
            weights = recipe(settings, name, task_name)["class_weights"]
            n_classes = available[task].n_classes
            if not isinstance(weights, str) and len(weights) != n_classes:
                yield (
                    f"{where}.variants.{name}: {len(weights)} class weights for task {task_name!r} "
                    f"of {n_classes} classes"
                )
    figures = settings.get("figures") or {}
    named = [*(figures.get("roc") or []), *(figures.get("alpha") or [])]
    for variant in named:
        if variant not in settings["variants"]:
            yield f"{where}.figures: {variant!r} is not a variant"
