"""MHD-Net's settings as the trainers and the figures use them (``methods.<name>``).

A variant is one of these kinds (``model``): ``teacher`` (eq. 10, CT + WSI), ``student``
(eq. 14 against the trained ``teacher`` variant it names, tested on CT alone), ``ct_resnet``
(a plain CT 3D ResNet) and the comparison methods of Tables III and IV
(:mod:`mmdiag.models.mhd_baselines`): ``mmformer``, ``moddrop``, ``sckd`` (which distils the
``teacher`` variant it names, like a student) and ``pcct``, all tested on CT alone. Its
``options`` override the method's ``network`` settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

from mmdiag.data.paired_sequences import SequenceSettings
from mmdiag.methods.mhd.kinds import TEACHER_NETWORKS, TEACHER_READERS
from mmdiag.models import mhd_baselines
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

#: The ``network`` settings a teacher takes (a student and an SCKD variant take their
#: teacher's, and the student widths; the CT networks the student widths).
_TEACHER_KEYS = ("widths", "backbone", "kernel_sizes", "gate_kernel", "reduction", "capacities")
_TEACHER_KEYS += ("decay", "memory_temperature")
#: Constructor of each kind.
CONSTRUCTORS = {
    "teacher": mhd_teacher,
    "student": mhd_student,
    "ct_resnet": ct_resnet,
    "mmformer": mhd_baselines.mmformer,
    "moddrop": mhd_baselines.moddrop,
    "sckd": mhd_baselines.sckd,
    "pcct": mhd_baselines.pcct,
}
#: The model class of each CT network kind (its keyword options are accepted).
_CT_NETWORKS = {
    "ct_resnet": CTResNet,
    "mmformer": mhd_baselines.MMFormer,
    "moddrop": mhd_baselines.ModDropPlusPlus,
    "pcct": mhd_baselines.PCCTNet,
}
#: Arguments the settings give (never options).
_GIVEN = {"self", "n_classes", "frames", "num_types", "size"}


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

    A student (and an SCKD variant) is built around its teacher variant's arguments (so the
    teacher's checkpoint fits), with the student widths and its own options over them. The CT
    networks and the comparison methods take the student widths (mmFormer also the frames
    and the in-plane size, which fix its token count).
    """
    spec = method_settings["variants"][variant]
    network = method_settings["network"]
    n_classes = n_outputs(method_settings, n_types)
    if spec["model"] in _CT_NETWORKS:
        widths = network["student_widths"] or network["widths"]
        arguments = {"n_classes": n_classes, "widths": widths}
        if spec["model"] == "mmformer":
            sequences = method_settings["sequences"]
            arguments |= {"frames": sequences["depth"], "size": sequences["size"]}
        return arguments | dict(spec["options"])
    if spec["model"] in TEACHER_READERS:
        teacher = model_arguments(method_settings, spec["teacher"], n_types)
        return teacher | {"student_widths": network["student_widths"]} | dict(spec["options"])
    arguments = {k: network[k] for k in _TEACHER_KEYS}
    arguments |= {"n_classes": n_classes, "frames": method_settings["sequences"]["depth"]}
    return arguments | {"num_types": n_types} | dict(spec["options"])


def build_model(method_settings: Mapping, variant: str, n_types: int):
    """The variant's network (the constructor of its kind, :data:`CONSTRUCTORS`)."""
    kind = method_settings["variants"][variant]["model"]
    return CONSTRUCTORS[kind](**model_arguments(method_settings, variant, n_types))


def train_settings_of(method_settings: Mapping, variant: str) -> TrainSettings:
    """The method's training settings with the variant's overrides (last epoch kept)."""
    options = method_settings["train"] | method_settings["variants"][variant].get("train", {})
    return TrainSettings(**{k: v for k, v in options.items() if k != "num_threads"})


def config_problems(method: str, settings: Mapping, config: Mapping) -> Iterable[str]:
    """Checked when the config is validated: a student (and an SCKD variant) names a teacher
    variant, nothing else names one, options are the model's, one memory fits the teacher's
    stages, and mmFormer's heads divide its token width."""
    variants = settings["variants"]
    teachers = sorted(v for v, spec in variants.items() if spec["model"] == "teacher")
    where = f"methods.{method}.variants"
    for name, spec in variants.items():
        if spec["model"] in TEACHER_READERS and spec.get("teacher") not in teachers:
            yield (
                f"{where}.{name}.teacher: {spec.get('teacher')!r} is not a teacher variant; "
                f"allowed values: {teachers}"
            )
        if spec["model"] not in TEACHER_READERS and spec.get("teacher"):
            yield f"{where}.{name}.teacher: only a student or an sckd variant distils a teacher"
        yield from _option_problems(f"{where}.{name}.options", spec)
    if settings["lesions"] == "table" and not settings["lesion_table"]:
        yield (
            f"methods.{method}.lesion_table: lesions: table needs a lesion table "
            "(patient_id, z_start, z_stop)"
        )
    yield from _figure_problems(method, settings)
    network = settings["network"]
    for name, spec in variants.items():
        if spec["model"] == "mmformer":
            widths = spec["options"].get("widths", network["student_widths"] or network["widths"])
            heads = spec["options"].get("num_heads", _default("mmformer", "num_heads"))
            if widths[-1] % heads:
                yield (
                    f"{where}.{name}.options.num_heads: {heads} heads do not divide the token "
                    f"width {widths[-1]} (the last stage width)"
                )
        if spec["model"] not in TEACHER_NETWORKS:
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


def _default(kind: str, option: str):
    """The default of a CT network kind's keyword option."""
    return inspect.signature(_CT_NETWORKS[kind].__init__).parameters[option].default


def _accepted_options(kind: str) -> set[str]:
    def names(function) -> set[str]:
        return {
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }

    teacher = names(mhd_teacher) | names(MHDTeacher.__init__) | set(SHFM_OPTIONS)
    teacher -= _GIVEN
    if kind == "teacher":
        return teacher
    if kind in TEACHER_READERS:
        return (names(CONSTRUCTORS[kind]) | teacher) - _GIVEN
    return (names(CONSTRUCTORS[kind]) | names(_CT_NETWORKS[kind].__init__)) - _GIVEN
