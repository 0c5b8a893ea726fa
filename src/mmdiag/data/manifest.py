"""The cohort manifest: one validated row per image, with its checksum, size and labels.

A cohort is given in one of two ways.

1. A cohort folder::

       root/
         clinical.tsv    columns: patient_id, disease, mn_stage (empty when not applicable),
                         survival_months, event
         images.tsv      columns: patient_id, modality (OM|IM|TEM|WSI|CT), path (relative to
                         root, or absolute)
         ...             image files anywhere under root: OM/IM as JPEG/PNG/TIFF (RGB), TEM as
                         8-bit grayscale TIFF, WSI as .svs/.tif/.ndpi/... (OpenSlide), CT as
                         .nii/.nii.gz (nibabel) or a DICOM series folder / .dcm (pydicom)

   ``clinical.tsv`` must have ``patient_id`` and ``disease``; ``mn_stage``,
   ``survival_months`` and ``event`` may be left out (read as empty). ``images.tsv`` must have
   ``patient_id``, ``modality`` and ``path``.

2. A user manifest TSV with columns ``patient_id, modality, path, disease`` and optionally
   ``mn_stage, survival_months, event``: one row per image, the labels repeated on every row
   of a patient (they must agree within a patient). Relative paths are taken relative to the
   folder holding the manifest TSV.

Modality ``MR`` is accepted beside the five above and read like ``CT`` (also as a required
modality). Modalities are case-insensitive.

Further label columns (a grade, a WHO type, ...) are declared as tasks in the config
(``manifest.tasks``, see :mod:`mmdiag.data.tasks`): each must be a column of ``clinical.tsv``
(or of the user manifest), its non-empty values among the task's classes (empty only when the
task is not ``required``); the manifest carries them after :data:`MANIFEST_COLUMNS`, in the
config's order.

:func:`build_manifest` validates everything it can before it hashes or opens any image, and
stops at the first kind of problem with a :class:`ManifestError` that lists every instance of
that kind (up to :data:`MAX_LISTED`), naming the file, the row or patient, and the problem.

``images.tsv`` (or a user manifest) may carry an ``mpp`` column: a slide's micrometres per
pixel, which overrides the file's metadata when patching (empty: use the metadata).

A column that none of this reads (a typo such as ``dissease``, an ``mpp`` in ``clinical.tsv``,
a label in ``images.tsv``) is logged as a warning naming the file and the columns, since its
values are ignored. Known columns are, per file: ``clinical.tsv`` :data:`CLINICAL_COLUMNS` and
the task columns; ``images.tsv`` :data:`IMAGE_COLUMNS` and ``mpp``; a user manifest all of them.

The manifest columns, in order, are :data:`MANIFEST_COLUMNS`; rows are sorted by
``patient_id, modality, path``; ``path`` is the path as written, made absolute and normalised
(``os.path.abspath``: symbolic links are kept, not followed, so that two patients' links to
files of one name stay apart); ``image_id`` is that path below the cohort folder without its
suffix (``ct/P001.nii.gz`` -> ``ct/P001``; the file stem for images outside it) and unique in
the cohort; ``sha256`` is of the content (through any link); of a DICOM series folder it is
the SHA-256 of its sorted ``<name> <sha256>`` lines.

By default (``verify="header"``) images are only opened as far as their size needs (small
micrographs are decoded, slides and volumes are not); with ``verify="decode"``, after every
other check has passed, each image's pixels are decoded as well (micrographs and volumes
whole, slides in a sample of regions per pyramid level, see
:func:`mmdiag.data.images.check_image_decodes`), and every image that fails is listed in one
error naming its file and, for a slide, the level and region.

The same content (one ``sha256``) on two rows is an error: under two patients one image could
land in two partitions of a split (leakage); twice within one patient it is almost always a
copied or twice-listed file that would weigh double in the patient's bag and count twice in
per-image results, and nothing a cohort needs, so it is an error too.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmdiag.data.images import (
    DECODE_REGIONS_PER_LEVEL,
    ImageReadError,
    check_image_decodes,
    image_stem,
    read_image_size,
)
from mmdiag.data.tasks import BUILT_IN_TASKS, Task, cohort_tasks
from mmdiag.io.atomic import sha256_file, write_tsv
from mmdiag.io.tables import read_tsv

__all__ = [
    "CLINICAL_COLUMNS",
    "IMAGE_COLUMNS",
    "MANIFEST_COLUMNS",
    "MODALITIES",
    "ManifestError",
    "ManifestRules",
    "build_manifest",
    "read_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("OM", "IM", "TEM", "WSI", "CT", "MR")
CLINICAL_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "disease",
    "mn_stage",
    "survival_months",
    "event",
)
IMAGE_COLUMNS: tuple[str, ...] = ("patient_id", "modality", "path")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "modality",
    "image_id",
    "path",
    "sha256",
    "width_px",
    "height_px",
    "disease",
    "mn_stage",
    "survival_months",
    "event",
    "mpp",
)
LABEL_COLUMNS: tuple[str, ...] = ("disease", "mn_stage", "survival_months", "event")
OPTIONAL_LABEL_COLUMNS: tuple[str, ...] = ("mn_stage", "survival_months", "event")
#: At most this many instances of one problem are listed in an error message.
MAX_LISTED = 20
#: How deeply images are checked: ``header`` (sizes) or ``decode`` (pixels too).
VERIFY_LEVELS: tuple[str, ...] = ("header", "decode")


@dataclass(frozen=True)
class ManifestRules:
    """What a valid cohort looks like.

    Attributes
    ----------
    classes
        Allowed ``disease`` labels, e.g. ``("IgAN", "MN", "LN")``.
    stages
        Allowed non-empty ``mn_stage`` labels, e.g. ``("I", "II", "III")``.
    required_modalities
        Every patient needs at least one image of each, e.g. ``("OM", "IM", "TEM")``; any of
        :data:`MODALITIES` (``MR`` included), in any case.
    min_image_px
        Per modality, the least allowed ``min(width_px, height_px)`` (CT/MR: in-plane).
    tasks
        The cohort's further label columns (beyond ``disease`` and ``mn_stage``).
    verify
        ``"header"`` (read sizes only) or ``"decode"`` (also decode every image's pixels,
        slides in a sample of regions, so damaged files fail here rather than at patching).
    decode_regions_per_level
        With ``verify="decode"``, the regions read per pyramid level of a slide.
    """

    classes: tuple[str, ...]
    stages: tuple[str, ...] = ()
    required_modalities: tuple[str, ...] = ()
    min_image_px: Mapping[str, int] = field(default_factory=dict)
    tasks: tuple[Task, ...] = ()
    verify: str = "header"
    decode_regions_per_level: int = DECODE_REGIONS_PER_LEVEL

    def __post_init__(self) -> None:
        """Upper-case the required modalities (as the images' are) and reject unknown ones.

        Without this a ``"mr"`` or a typo would never match any image and fail every patient
        with a misleading "missing a required modality".
        """
        required = tuple(str(m).strip().upper() for m in self.required_modalities)
        unknown = [m for m in required if m not in MODALITIES]
        if unknown:
            raise ValueError(
                f"required_modalities {unknown} are not among the modalities {list(MODALITIES)}"
            )
        object.__setattr__(self, "required_modalities", required)
        if self.verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {list(VERIFY_LEVELS)}, got {self.verify!r}")
        if self.decode_regions_per_level < 1:
            raise ValueError(
                "decode_regions_per_level must be at least 1, got "
                f"{self.decode_regions_per_level!r}"
            )

    @property
    def task_columns(self) -> tuple[str, ...]:
        """The further label columns, in config order (each once)."""
        return tuple(dict.fromkeys(task.column for task in self.tasks))

    @classmethod
    def from_config(cls, rules: Mapping) -> ManifestRules:
        """From a ``manifest`` section of the config (with a cohort's overrides applied)."""
        return cls(
            classes=tuple(rules["classes"]),
            stages=tuple(rules["stages"]),
            required_modalities=tuple(rules["required_modalities"]),
            min_image_px=dict(rules["min_image_px"]),
            tasks=tuple(
                task for name, task in cohort_tasks(rules).items() if name not in BUILT_IN_TASKS
            ),
            verify=rules.get("verify", "header"),
            decode_regions_per_level=rules.get(
                "decode_regions_per_level", DECODE_REGIONS_PER_LEVEL
            ),
        )


class ManifestError(ValueError):
    """A cohort description is invalid; the message names the file, where, and what is wrong."""


def build_manifest(
    *,
    cohort_root: str | os.PathLike | None = None,
    manifest_tsv: str | os.PathLike | None = None,
    rules: ManifestRules,
    progress: bool = False,
) -> pd.DataFrame:
    """Validate a cohort and return its manifest, one row per image.

    Parameters
    ----------
    cohort_root
        A cohort folder holding ``clinical.tsv`` and ``images.tsv`` (see the module docstring).
    manifest_tsv
        A user manifest TSV instead; give exactly one of the two.
    rules
        Allowed labels, required modalities, minimum image sizes and how deeply images are
        checked (``rules.verify``).
    progress
        Show a progress bar while images are hashed and measured (and decoded).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`MANIFEST_COLUMNS`, sorted by ``patient_id, modality, path``.

    Raises
    ------
    ManifestError
        On the first kind of problem found, listing every instance of it.
    """
    if (cohort_root is None) == (manifest_tsv is None):
        raise ValueError(
            "build_manifest needs exactly one of cohort_root and manifest_tsv, got "
            f"cohort_root={cohort_root!r}, manifest_tsv={manifest_tsv!r}"
        )
    if cohort_root is not None:
        images, clinical, source = _load_cohort_folder(Path(cohort_root), rules)
    else:
        images, clinical, source = _load_user_manifest(Path(manifest_tsv), rules)

    clinical = _parse_clinical(clinical, source["clinical"], rules)
    images = _check_images_table(images, source["images"], source["base"], set(clinical.index))
    _check_required_modalities(images, clinical.index, rules, source["images"])
    _check_files_exist(images, source["images"])

    measured = _measure_images(images, progress=progress)
    _check_decoded(measured, source["images"])
    _check_unique_content(measured, source["images"])
    _check_min_size(measured, rules, source["images"])
    if rules.verify == "decode":
        _check_pixels(measured, rules.decode_regions_per_level, source["images"], progress)

    frame = measured.drop(columns=["error", "row"]).join(clinical, on="patient_id")
    frame = frame.sort_values(["patient_id", "modality", "path"], kind="stable")
    columns = [*MANIFEST_COLUMNS, *rules.task_columns]
    return _with_dtypes(frame.reset_index(drop=True)[columns])


def write_manifest(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest as TSV, atomically (empty stage/survival/event stay empty cells).

    Task label columns beyond :data:`MANIFEST_COLUMNS` are written after them.
    Side effects: creates ``path`` (and its parent folders).
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest frame lacks columns {missing} (has {list(frame.columns)})")
    return write_tsv(frame[_ordered_columns(frame)], path)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`, with its dtypes restored.

    Text columns are ``str`` (an empty ``mn_stage`` is ``""``), ``width_px``/``height_px``
    are ``int64``, ``survival_months`` is ``float64`` (NaN when unknown) and ``event`` is the
    nullable ``Int64``; task label columns after them are ``str``.
    """
    path = Path(path)
    table = _read_table(path, "manifest", MANIFEST_COLUMNS)
    try:
        return _with_dtypes(table[_ordered_columns(table)])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: manifest has a malformed value: {exc}") from exc


# --------------------------------------------------------------------------- loading tables


def _read_table(
    path: Path, what: str, required: Iterable[str], known: Iterable[str] | None = None
) -> pd.DataFrame:
    """Read a user table as stripped strings, checking its required columns.

    With ``known``, columns outside it (and outside ``required``) are logged as ignored.
    """
    if not path.is_file():
        raise ManifestError(f"{path}: {what} table not found")
    try:
        table = read_tsv(path, all_strings=True)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: {what} table cannot be read as TSV ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{path}: {what} table lacks required columns {missing}; "
            f"present columns: {list(table.columns)}"
        )
    if known is not None:
        _warn_unknown_columns(table.columns, path, what, {*required, *known})
    return table.map(str.strip)


def _warn_unknown_columns(columns: Iterable[str], path: Path, what: str, known: set[str]) -> None:
    """Log the columns whose values nothing reads, with the closest known name as a hint."""
    unknown = [c for c in columns if c not in known]
    if not unknown:
        return
    hints = []
    for column in unknown:
        close = difflib.get_close_matches(column, sorted(known), n=1)
        if close:
            hints.append(f"{column!r} -> {close[0]!r}?")
    log.warning(
        "%s: %s table has columns that are ignored (neither known columns nor declared task "
        "columns): %s%s; known columns: %s",
        path,
        what,
        unknown,
        f" (did you mean {', '.join(hints)})" if hints else "",
        sorted(known),
    )


def _ordered_columns(frame: pd.DataFrame) -> list[str]:
    """The fixed manifest columns, then the task label columns in the frame's order."""
    return [*MANIFEST_COLUMNS, *(c for c in frame.columns if c not in MANIFEST_COLUMNS)]


def _load_cohort_folder(
    root: Path, rules: ManifestRules
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    if not root.is_dir():
        raise ManifestError(f"{root}: cohort folder not found")
    clinical_path, images_path = root / "clinical.tsv", root / "images.tsv"
    clinical = _read_table(
        clinical_path,
        "clinical",
        ("patient_id", "disease", *rules.task_columns),
        known=CLINICAL_COLUMNS,
    )
    images = _read_table(images_path, "images", IMAGE_COLUMNS, known=("mpp",))
    for column in OPTIONAL_LABEL_COLUMNS:
        if column not in clinical.columns:
            clinical[column] = ""
    clinical["row"] = _row_numbers(clinical)
    duplicated = clinical[clinical["patient_id"].duplicated(keep=False)]
    if len(duplicated):
        lines = [
            f"patient {pid!r} on rows {list(group['row'])}"
            for pid, group in duplicated.groupby("patient_id", sort=True)
        ]
        raise ManifestError(_listing(clinical_path, "duplicate patient ids", lines))
    if "mpp" not in images.columns:
        images["mpp"] = ""
    images["row"] = _row_numbers(images)
    # only the read columns: an ignored label column (``disease``) would clash with clinical's
    images = images[[*IMAGE_COLUMNS, "mpp", "row"]]
    source = {"clinical": clinical_path, "images": images_path, "base": root}
    return images, clinical, source


def _load_user_manifest(
    path: Path, rules: ManifestRules
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    table = _read_table(
        path,
        "manifest",
        (*IMAGE_COLUMNS, "disease", *rules.task_columns),
        known=(*CLINICAL_COLUMNS, "mpp"),
    )
    for column in OPTIONAL_LABEL_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    table["row"] = _row_numbers(table)
    lines = []
    for pid, group in table[table["patient_id"] != ""].groupby("patient_id", sort=True):
        for column in (*LABEL_COLUMNS, *rules.task_columns):
            values = sorted(set(group[column]))
            if len(values) > 1:
                lines.append(f"patient {pid!r}: {column} takes values {values}")
    if lines:
        raise ManifestError(_listing(path, "inconsistent labels within a patient", lines))
    label_columns = ["patient_id", *LABEL_COLUMNS, *rules.task_columns, "row"]
    clinical = table.drop_duplicates("patient_id")[label_columns]
    if "mpp" not in table.columns:
        table["mpp"] = ""
    images = table[[*IMAGE_COLUMNS, "mpp", "row"]]
    source = {"clinical": path, "images": path, "base": path.parent}
    return images, clinical, source


def _row_numbers(table: pd.DataFrame) -> list[int]:
    """1-based line numbers in the file (the header is line 1)."""
    return list(range(2, len(table) + 2))


# --------------------------------------------------------------------------- validation


def _listing(path: Path, problem: str, lines: Sequence[str]) -> str:
    shown = [f"  - {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"  ... and {len(lines) - MAX_LISTED} more")
    return f"{path}: {problem} ({len(lines)}):\n" + "\n".join(shown)


def _parse_clinical(clinical: pd.DataFrame, path: Path, rules: ManifestRules) -> pd.DataFrame:
    """Check labels against the rules; return one row per patient indexed by patient_id."""
    empty_ids = clinical.loc[clinical["patient_id"] == "", "row"]
    if len(empty_ids):
        raise ManifestError(
            _listing(path, "empty patient_id", [f"row {r}" for r in empty_ids.tolist()])
        )

    lines = []
    for row in clinical.itertuples(index=False):
        if row.disease not in rules.classes:
            lines.append(
                f"patient {row.patient_id!r} (row {row.row}): disease {row.disease!r} "
                f"is not one of the allowed classes {list(rules.classes)}"
            )
        if row.mn_stage != "" and row.mn_stage not in rules.stages:
            lines.append(
                f"patient {row.patient_id!r} (row {row.row}): mn_stage {row.mn_stage!r} "
                f"is not one of the allowed stages {list(rules.stages)} (or empty)"
            )
    lines += _task_label_problems(clinical, rules.tasks)
    if lines:
        raise ManifestError(_listing(path, "labels outside the allowed values", lines))

    survival = pd.to_numeric(_blank_to_nan(clinical["survival_months"]), errors="coerce")
    event = pd.to_numeric(_blank_to_nan(clinical["event"]), errors="coerce")
    lines = []
    for i, row in enumerate(clinical.itertuples(index=False)):
        if row.survival_months != "" and not (survival.iloc[i] >= 0):
            lines.append(
                f"patient {row.patient_id!r} (row {row.row}): survival_months "
                f"{row.survival_months!r} is not a non-negative number"
            )
        if row.event != "" and event.iloc[i] not in (0, 1):
            lines.append(
                f"patient {row.patient_id!r} (row {row.row}): event {row.event!r} is not 0 or 1"
            )
    if lines:
        raise ManifestError(_listing(path, "malformed survival values", lines))

    parsed = clinical[["patient_id", "disease", "mn_stage", *rules.task_columns]].copy()
    parsed["survival_months"] = survival.astype("float64").to_numpy()
    parsed["event"] = event.astype("Int64").to_numpy()
    return parsed.set_index("patient_id")


def _task_label_problems(clinical: pd.DataFrame, tasks: Sequence[Task]) -> list[str]:
    """One line per patient whose task label is not a class of the task (or empty if required)."""
    lines = []
    for task in tasks:
        for pid, row, value in zip(
            clinical["patient_id"], clinical["row"], clinical[task.column], strict=True
        ):
            if value == "" and task.required:
                lines.append(f"patient {pid!r} (row {row}): {task.column} is empty (required)")
            elif value != "" and value not in task.classes:
                lines.append(
                    f"patient {pid!r} (row {row}): {task.column} {value!r} is not one of the "
                    f"classes {list(task.classes)} of task {task.name!r}"
                )
    return lines


def _check_images_table(
    images: pd.DataFrame, path: Path, base: Path, known_patients: set[str]
) -> pd.DataFrame:
    """Check ids, modalities and duplicates; add absolute ``path`` and ``image_id``."""
    images = images.copy()
    images["modality"] = images["modality"].str.upper()
    lines = []
    for row in images.itertuples(index=False):
        if row.patient_id == "" or row.path == "":
            lines.append(f"row {row.row}: empty patient_id or path")
        elif row.modality not in MODALITIES:
            lines.append(
                f"row {row.row} (patient {row.patient_id!r}): modality {row.modality!r} "
                f"is not one of {list(MODALITIES)}"
            )
        elif row.mpp != "" and not _positive_number(row.mpp):
            lines.append(
                f"row {row.row} (patient {row.patient_id!r}): mpp {row.mpp!r} is not a "
                "positive number of micrometres per pixel"
            )
    if lines:
        raise ManifestError(_listing(path, "malformed image rows", lines))

    unknown = images[~images["patient_id"].isin(known_patients)]
    if len(unknown):
        lines = [
            f"patient {pid!r} (rows {list(group['row'])})"
            for pid, group in unknown.groupby("patient_id", sort=True)
        ]
        raise ManifestError(_listing(path, "images of patients not in the clinical table", lines))

    images["path"] = [str(_absolute(base, p)) for p in images["path"]]
    images["image_id"] = [_image_id(base, Path(p)) for p in images["path"]]
    for column, what in (("path", "duplicate image paths"), ("image_id", "duplicate image ids")):
        duplicated = images[images[column].duplicated(keep=False)]
        if len(duplicated):
            lines = [
                f"{value} on rows {list(group['row'])} "
                f"(patients {sorted(set(group['patient_id']))})"
                for value, group in duplicated.groupby(column, sort=True)
            ]
            raise ManifestError(_listing(path, what, lines))
    return images


def _image_id(base: Path, path: Path) -> str:
    """The path below the cohort folder without its suffix (``om/P001``), else the stem.

    Keeping the folder makes ids unique in the common layouts with one folder per modality
    (``om/P001.jpg``, ``im/P001.jpg``) or per patient (``P001/om.jpg``). ``path`` is the
    written path (links not followed), so a link ``P001/wsi.svs`` gives ``P001/wsi`` whatever
    its target is called. The folder is tried as written, then with its links followed, so an
    absolute path written through the folder's real location is still below it.
    """
    for root in dict.fromkeys((Path(os.path.abspath(base)), base.resolve())):
        try:
            relative = path.relative_to(root)
        except ValueError:
            continue
        return (relative.parent / image_stem(relative)).as_posix()
    return image_stem(path)


def _absolute(base: Path, raw: str) -> Path:
    """``raw`` (relative to ``base``, ``~`` expanded) made absolute and normalised.

    ``os.path.abspath`` rather than ``Path.resolve``: symbolic links are kept, so the id and
    the path are the ones the user wrote, not those of the link's target.
    """
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    return Path(os.path.abspath(candidate))


def _check_required_modalities(
    images: pd.DataFrame, patients: Iterable[str], rules: ManifestRules, path: Path
) -> None:
    present = images.groupby("patient_id")["modality"].agg(set).to_dict()
    lines = []
    for pid in sorted(patients):
        missing = [m for m in rules.required_modalities if m not in present.get(pid, set())]
        if missing:
            lines.append(f"patient {pid!r} has no image of required modality {', '.join(missing)}")
    if lines:
        raise ManifestError(_listing(path, "patients missing a required modality", lines))


def _check_files_exist(images: pd.DataFrame, path: Path) -> None:
    lines = [
        f"{row.path} (patient {row.patient_id!r}, row {row.row}){_broken_link(row.path)}"
        for row in images.itertuples(index=False)
        if not os.path.exists(row.path)
    ]
    if lines:
        raise ManifestError(_listing(path, "image files not found", lines))


def _broken_link(path: str) -> str:
    """`` (a broken symbolic link to X)`` when ``path`` is one, else empty."""
    if not os.path.islink(path):
        return ""
    return f" (a broken symbolic link to {os.readlink(path)})"


def _check_unique_content(measured: pd.DataFrame, path: Path) -> None:
    """Reject one image content (sha256) on several rows, naming every row of each.

    Across patients one image could fall in two partitions of a split (leakage); within one
    patient it would weigh double (see the module docstring). Links to one file, copies and
    a file listed under two spellings are all caught here, as the digest is of the content.
    """
    duplicated = measured[measured["sha256"].duplicated(keep=False)]
    lines = []
    for digest, group in duplicated.groupby("sha256", sort=True):
        patients = sorted(set(group["patient_id"]))
        if len(patients) > 1:
            why = f"in {len(patients)} patients {patients}: one image in two partitions"
        else:
            why = f"{len(group)} times in patient {patients[0]!r}: one image counted twice"
        rows = "; ".join(
            f"row {row.row} {row.path} (patient {row.patient_id!r}, image_id {row.image_id!r})"
            for row in group.sort_values("row").itertuples(index=False)
        )
        lines.append(f"sha256 {digest[:12]}... {why}: {rows}")
    if lines:
        raise ManifestError(_listing(path, "the same image content on several rows", lines))


def _check_decoded(
    measured: pd.DataFrame, path: Path, problem: str = "images that cannot be decoded"
) -> None:
    """One line per row whose ``error`` is set (it starts with the image's path)."""
    failed = measured[measured["error"] != ""]
    lines = [
        f"patient {row.patient_id!r}, row {row.row}: {row.error}"
        for row in failed.itertuples(index=False)
    ]
    if lines:
        raise ManifestError(_listing(path, problem, lines))


def _check_pixels(
    measured: pd.DataFrame, regions_per_level: int, path: Path, progress: bool
) -> None:
    """``verify: decode``: decode every image's pixels and list every row that fails.

    Runs last, after the cheap checks, so a cohort with a typo fails in seconds rather than
    after decoding every image.
    """
    decode = functools.partial(_decode_error, regions_per_level=regions_per_level)
    # decoding holds whole micrographs and volumes in memory: fewer threads than for hashing
    errors = _map_rows(
        decode, measured, workers=4, description="decoding images", progress=progress
    )
    problem = "images whose pixels cannot be decoded (verify: decode)"
    _check_decoded(measured.assign(error=errors), path, problem)


def _check_min_size(measured: pd.DataFrame, rules: ManifestRules, path: Path) -> None:
    lines = []
    for row in measured.itertuples(index=False):
        minimum_px = rules.min_image_px.get(row.modality)
        if minimum_px is not None and min(row.width_px, row.height_px) < minimum_px:
            lines.append(
                f"{row.path} (patient {row.patient_id!r}, {row.modality}): size "
                f"{row.width_px}x{row.height_px} px, smaller than the minimum {minimum_px} px "
                f"for {row.modality}"
            )
    if lines:
        raise ManifestError(_listing(path, "images smaller than the minimum size", lines))


# --------------------------------------------------------------------------- measuring


def _measure_one(image_path: str, modality: str) -> tuple[str, int, int, str]:
    """Return ``(sha256, width_px, height_px, error)``; ``error`` is empty on success."""
    try:
        size = read_image_size(image_path, modality=modality)
    except ImageReadError as exc:
        return "", -1, -1, str(exc)
    return _checksum(Path(image_path)), size.width_px, size.height_px, ""


def _decode_error(image_path: str, modality: str, *, regions_per_level: int) -> str:
    """Why the image's pixels cannot be decoded (it starts with the path); empty if they can."""
    try:
        check_image_decodes(image_path, modality=modality, regions_per_level=regions_per_level)
    except ImageReadError as exc:
        return str(exc)
    return ""


def _checksum(path: Path) -> str:
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()} {sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _map_rows(
    function, images: pd.DataFrame, *, workers: int, description: str, progress: bool
) -> list:
    """``function(path, modality)`` of every row, in row order, on a pool of threads.

    The readers (hashlib, zlib, Pillow, OpenSlide) release the GIL while they read and
    decode, so threads overlap the work without copying images between processes.
    """
    with ThreadPoolExecutor(max_workers=min(workers, os.cpu_count() or 1)) as pool:
        results = pool.map(function, images["path"], images["modality"])
        if progress:
            from rich.progress import track

            results = track(results, total=len(images), description=description)
        return list(results)


def _measure_images(images: pd.DataFrame, *, progress: bool) -> pd.DataFrame:
    results = _map_rows(
        _measure_one,
        images,
        workers=8,
        description="hashing and sizing images",
        progress=progress,
    )
    measured = images.copy()
    columns = ["sha256", "width_px", "height_px", "error"]
    measured[columns] = pd.DataFrame(results, columns=columns, index=images.index)
    return measured


def _with_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    text_columns = ("patient_id", "modality", "image_id", "path", "sha256", "disease", "mn_stage")
    task_columns = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    for column in (*text_columns, *task_columns):
        frame[column] = frame[column].fillna("").astype(str)
    for column in ("width_px", "height_px"):
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype("int64")
    survival = pd.to_numeric(_blank_to_nan(frame["survival_months"]), errors="raise")
    frame["survival_months"] = survival.astype("float64")
    frame["event"] = pd.to_numeric(_blank_to_nan(frame["event"]), errors="raise").astype("Int64")
    frame["mpp"] = pd.to_numeric(_blank_to_nan(frame["mpp"]), errors="raise").astype("float64")
    return frame


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _blank_to_nan(series: pd.Series) -> pd.Series:
    if series.dtype != object:
        return series
    return series.where(series.astype(str).str.strip() != "", np.nan)
