"""Prediction tasks: the label column a method predicts, its classes, whether they are ordered.

A cohort's manifest carries the built-in label columns ``disease`` and ``mn_stage`` and any
further label column its config declares under ``manifest.tasks`` (a tumour grade, a WHO type,
a Derm7pt-like criterion, ...). Each of these is a :class:`Task`. A method predicts one task or
several (``tasks: [...]`` in its config, one head each); an ordinal task (grades, stages) is
also scored with the quadratic-weighted kappa.

Labels are encoded per task as class indices in the order the config lists the classes, with
:data:`MISSING` for an empty cell (a patient the task does not apply to, e.g. ``mn_stage`` of
a non-MN patient); training and evaluation of a task use its labelled cases only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["BUILT_IN_TASKS", "MISSING", "Task", "cohort_tasks", "method_tasks", "patient_labels"]

MISSING = -1
#: Label columns every manifest has; their classes come from ``manifest.classes``/``stages``.
BUILT_IN_TASKS = ("disease", "mn_stage")
_LABEL_METRICS = ("ACC", "BACC", "PRE", "REC", "SPE", "F1", "microF1", "AUC")


@dataclass(frozen=True)
class Task:
    """One label column predicted as one of ``classes``.

    Attributes
    ----------
    name
        The task's name in the config (also the name of its head and of its metrics' rows).
    column
        The manifest column holding the labels (the name unless the config says otherwise).
    classes
        The allowed labels, in class-index order (for an ordinal task: lowest first).
    ordinal
        The classes are ordered (grades, stages): scored with QWK as well.
    required
        Every patient must have a label (an empty cell is a manifest error).
    """

    name: str
    column: str
    classes: tuple[str, ...]
    ordinal: bool = False
    required: bool = False

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 classes, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r} lists a class twice: {list(self.classes)}")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this task is scored with by default (QWK added for an ordinal task)."""
        return (*_LABEL_METRICS, "QWK") if self.ordinal else _LABEL_METRICS

    def encode(self, values: Sequence[str], *, where: str = "") -> np.ndarray:
        """Class indices of ``values`` (``MISSING`` for empty); ``ValueError`` naming the unknown
        labels (and ``where`` they come from) otherwise."""
        index = {label: i for i, label in enumerate(self.classes)}
        labels = ["" if pd.isna(v) else str(v).strip() for v in values]
        unknown = sorted({v for v in labels if v and v not in index})
        if unknown:
            place = f"{where}: " if where else ""
            raise ValueError(
                f"{place}task {self.name!r} (column {self.column!r}): labels {unknown} are not "
                f"among its classes {list(self.classes)}"
            )
        return np.array([index[v] if v else MISSING for v in labels], dtype=np.int64)

    def decode(self, indices: Sequence[int]) -> list[str]:
        """Labels of class indices (``""`` for ``MISSING``)."""
        return ["" if int(i) == MISSING else self.classes[int(i)] for i in indices]


def cohort_tasks(manifest_rules: Mapping) -> dict[str, Task]:
    """Every task a cohort's manifest can carry, by name, from its (resolved) manifest rules.

    ``disease`` (``classes``, every patient labelled) and ``mn_stage`` (``stages``, ordinal,
    optional) are built in; ``tasks`` adds the cohort's own label columns, e.g.
    ``{grade: {classes: [G1, G2, G3], ordinal: true}}``.
    """
    tasks = {"disease": Task("disease", "disease", tuple(manifest_rules["classes"]), required=True)}
    stages = tuple(manifest_rules.get("stages", ()))
    if len(stages) >= 2:
        tasks["mn_stage"] = Task("mn_stage", "mn_stage", stages, ordinal=True)
    for name, spec in (manifest_rules.get("tasks") or {}).items():
        if name in BUILT_IN_TASKS:
            raise ValueError(f"manifest.tasks: {name!r} is built in; give it another name")
        tasks[name] = Task(
            name=name,
            column=spec.get("column") or name,
            classes=tuple(spec["classes"]),
            ordinal=bool(spec.get("ordinal", False)),
            required=bool(spec.get("required", False)),
        )
    return tasks


def method_tasks(method_settings: Mapping, manifest_rules: Mapping) -> list[Task]:
    """The tasks a method predicts (its ``tasks`` list, default ``[disease]``), in order."""
    available = cohort_tasks(manifest_rules)
    names = list(method_settings.get("tasks") or ["disease"])
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"method tasks {unknown} are not tasks of its cohort; available: {sorted(available)}"
        )
    return [available[name] for name in names]


def patient_labels(manifest: pd.DataFrame, tasks: Sequence[Task]) -> pd.DataFrame:
    """One row per patient (sorted by id) with each task's class index (``MISSING`` if empty).

    The manifest repeats a patient's labels on every image row; they agree by construction.
    """
    columns = ["patient_id", *dict.fromkeys(task.column for task in tasks)]
    missing = [c for c in columns if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest has no columns {missing} (has {list(manifest.columns)})")
    patients = manifest[columns].drop_duplicates("patient_id").sort_values("patient_id")
    frame = pd.DataFrame({"patient_id": patients["patient_id"].astype(str).to_numpy()})
    for task in tasks:
        frame[task.name] = task.encode(patients[task.column].tolist(), where="manifest")
    return frame
