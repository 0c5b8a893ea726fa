"""MHD-Net's settings as the trainers and the figures use them (``methods.<name>``).

A variant is one of three kinds (``model``): ``teacher`` (eq. 10, CT + WSI), ``student``
(eq. 14 against the trained ``teacher`` variant it names, tested on CT alone) and ``ct_resnet``
(a plain CT 3D ResNet). Its ``options`` override the method's ``network`` settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

from mmdiag.data.paired_sequences import SequenceSettings
from mmdiag.models.mhd import (
    SHFM_OPTIONS,
    CTResNet,
    MHDTeacher,
    ct_resnet,
    memory_item_dim,
    mhd_student,
    mhd_teacher,
)
from mmdiag.training.loop import TrainSettings

#: The ``network`` settings a teacher takes (a student takes its teacher's, and the student
#: widths; the CT baseline the student widths).
_TEACHER_KEYS = ("widths", "backbone", "kernel_sizes", "gate_kernel", "reduction", "capacities")
_TEACHER_KEYS += ("decay", "memory_temperature")


def type_classes(method_settings: Mapping, manifest_rules: Mapping) -> list[str]:
    """The tumour types: the classes of the method's task in its cohort's manifest rules."""
    task = method_settings["task"]
    tasks = manifest_rules.get("tasks") or {}
    if task not in tasks:
        raise ValueError(
            f"task {task!r} is not a task of the cohort; its tasks: {sorted(tasks)} "
            "(declare it under the cohort's manifest_rules.tasks)"
        )
    return list(tasks[task]["classes"])


def task_column(method_settings: Mapping, manifest_rules: Mapping) -> str:
    """The manifest column holding the type (the task's ``column``, else its name)."""
    task = method_settings["task"]
    return manifest_rules["tasks"][task].get("column") or task


def n_outputs(method_settings: Mapping, n_types: int) -> int:
    """Logits of every network: the K types, plus "other" when tumour-free sequences train."""
    return n_types + int(method_settings["sequences"]["keep_other"])


def sequence_settings(method_settings: Mapping) -> SequenceSettings:
    """How CT and WSI sequences are cut (``sequences``)."""
    return SequenceSettings(**method_settings["sequences"])


def model_arguments(method_settings: Mapping, variant: str, n_types: int) -> dict:
    """Constructor arguments of a variant's network: its kind's network settings, the frame
    count (the sequence depth), the number of types, and the variant's ``options`` over them.

    A student is built around its teacher variant's arguments (so the teacher's checkpoint
    fits), with the student widths and its own options over them.
    """
    spec = method_settings["variants"][variant]
    network = method_settings["network"]
    n_classes = n_outputs(method_settings, n_types)
    if spec["model"] == "ct_resnet":
        widths = network["student_widths"] or network["widths"]
        return {"n_classes": n_classes, "widths": widths} | dict(spec["options"])
    if spec["model"] == "student":
        teacher = model_arguments(method_settings, spec["teacher"], n_types)
        return teacher | {"student_widths": network["student_widths"]} | dict(spec["options"])
    arguments = {k: network[k] for k in _TEACHER_KEYS}
    arguments |= {"n_classes": n_classes, "frames": method_settings["sequences"]["depth"]}
    return arguments | {"num_types": n_types} | dict(spec["options"])


def build_model(method_settings: Mapping, variant: str, n_types: int):
    """The variant's network (``mhd_teacher``, ``mhd_student`` or ``ct_resnet``)."""
    constructor = {"teacher": mhd_teacher, "student": mhd_student, "ct_resnet": ct_resnet}
    kind = method_settings["variants"][variant]["model"]
    return constructor[kind](**model_arguments(method_settings, variant, n_types))


def train_settings_of(method_settings: Mapping, variant: str) -> TrainSettings:
    """The method's training settings with the variant's overrides (last epoch kept)."""
    options = method_settings["train"] | method_settings["variants"][variant].get("train", {})
    return TrainSettings(**{k: v for k, v in options.items() if k != "num_threads"})


def config_problems(method: str, settings: Mapping, config: Mapping) -> Iterable[str]:
    """Checked when the config is validated: a student names a teacher variant, nothing else
    names one, options are the model's, and one memory fits the teacher's stages."""
    variants = settings["variants"]
    teachers = sorted(v for v, spec in variants.items() if spec["model"] == "teacher")
    where = f"methods.{method}.variants"
    for name, spec in variants.items():
        if spec["model"] == "student" and spec.get("teacher") not in teachers:
            yield (
                f"{where}.{name}.teacher: {spec.get('teacher')!r} is not a teacher variant; "
                f"allowed values: {teachers}"
            )
        if spec["model"] != "student" and spec.get("teacher"):
            yield f"{where}.{name}.teacher: only a student variant distils a teacher"
        yield from _option_problems(f"{where}.{name}.options", spec)
    if settings["lesions"] == "table" and not settings["lesion_table"]:
        yield (
            f"methods.{method}.lesion_table: lesions: table needs a lesion table "
            "(patient_id, z_start, z_stop)"
        )
    yield from _figure_problems(method, settings)
    network = settings["network"]
    for name, spec in variants.items():
        if spec["model"] == "ct_resnet":
            continue
        widths = spec["options"].get("widths", network["widths"])
        try:
            memory_item_dim(settings["sequences"]["depth"], widths)
        except ValueError as error:
            yield f"{where}.{name}: {error}"


def _figure_problems(method: str, settings: Mapping) -> Iterable[str]:
    """Every variant a figure names exists; ROC rows and ``branches_of`` are teachers."""
    variants = settings["variants"]
    figures = settings["figures"]
    where = f"methods.{method}.figures"
    teachers = {v for v, spec in variants.items() if spec["model"] == "teacher"}
    roc = figures["roc"]
    named = {
        "roc.rows": (roc["rows"], teachers),
        "roc.branches_of": ([roc["branches_of"]] if roc["branches_of"] else [], teachers),
        "confusion": (figures["confusion"], set(variants)),
        "parameters": (figures["parameters"], set(variants)),
        "sweeps": ([v for points in figures["sweeps"].values() for v in points], set(variants)),
    }
    for key, (names, allowed) in named.items():
        unknown = sorted(set(names) - allowed)
        if unknown:
            yield f"{where}.{key}: {unknown} are not among the allowed variants {sorted(allowed)}"


def _option_problems(where: str, spec: Mapping) -> Iterable[str]:
    """Options the variant's constructor does not take."""
    accepted = _accepted_options(spec["model"])
    unknown = sorted(set(spec["options"]) - accepted)
    if unknown:
        kind = spec["model"]
        yield f"{where}: {unknown} are not options of a {kind}; allowed: {sorted(accepted)}"


def _accepted_options(kind: str) -> set[str]:
    def names(function) -> set[str]:
        return {
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }

    teacher = names(mhd_teacher) | names(MHDTeacher.__init__) | set(SHFM_OPTIONS)
    teacher -= {"self", "n_classes", "frames", "num_types"}
    if kind == "teacher":
        return teacher
    if kind == "student":
        return (names(mhd_student) | teacher) - {"self", "n_classes", "frames", "num_types"}
    return (names(ct_resnet) | names(CTResNet.__init__)) - {"self", "n_classes"}
