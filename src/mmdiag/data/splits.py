"""Patient-level, stratified, seeded train/validation/test splits.

Three schemes, each a list of folds ``{"fold": k, "train": [...], "val": [...], "test": [...]}``
(sorted patient ids; ``val`` may be empty; ``k`` counts from 0):

- ``kfold``: stratified k-fold (scikit-learn ``StratifiedKFold``); every patient is in exactly
  one test fold; optionally a stratified ``val_fraction`` of each fold's training patients is
  held out for validation.
- ``holdout``: one stratified train/val/test partition by ``fractions``.
- ``repeated``: ``n_repeats`` independent holdout partitions.
- ``predefined``: the user's own partition(s), read from a TSV with columns ``patient_id``,
  ``part`` (``train``, ``val`` or ``test``) and optionally ``repeat`` (one fold per repeat).

``holdout`` and ``predefined`` take ``n_seeds``: each partition is repeated that many times,
fold ``r * n_partitions + k`` being partition ``k`` trained with seed index ``r`` (recorded as
the fold's ``seed_index``; :func:`training_seed` turns it into the trainer's seed), so a method
can report the mean of several seeds on one fixed split.

Holdout partitions allocate each class exactly: a class of ``n_c`` patients gives
``floor(n_c * f)`` patients to each part, and the leftover patients go to the parts with the
largest remainders, so every part is within one patient of its ideal share of each class.

Patients are sorted by id before anything random happens, so the folds depend only on the
set of (patient, label) pairs and the seed, never on the order of the input.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiag.io.atomic import write_json

__all__ = [
    "SCHEME_TYPES",
    "holdout_split",
    "kfold_splits",
    "load_splits",
    "make_splits",
    "predefined_splits",
    "read_partition_table",
    "repeated_splits",
    "scheme_fold_count",
    "training_seed",
    "write_splits",
]

SCHEME_TYPES: tuple[str, ...] = ("kfold", "holdout", "repeated", "predefined")
_SCHEME_PARAMS: dict[str, tuple[str, ...]] = {
    "kfold": ("n_folds", "val_fraction"),
    "holdout": ("fractions", "n_seeds"),
    "repeated": ("n_repeats", "fractions"),
    "predefined": ("path", "n_seeds"),
}
PARTS: tuple[str, ...] = ("train", "val", "test")
_SPLITS_KEYS = ("scheme", "type", "seed", "label", "n_patients", "params", "folds")
_FRACTION_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- public splitters


def kfold_splits(
    patient_ids: Sequence[str],
    labels: Sequence[str],
    *,
    n_folds: int,
    seed: int,
    val_fraction: float = 0.0,
) -> list[dict]:
    """Stratified k-fold splits of patients; each patient is in exactly one test fold.

    Parameters
    ----------
    patient_ids, labels
        One entry per patient (ids unique), the label used for stratification.
    n_folds
        Number of folds, at least 2, at most the size of the smallest class.
    seed
        Seed of the shuffle; the same seed gives the same folds.
    val_fraction
        Share of each fold's training patients held out, stratified, as validation (0 to <1).

    Raises
    ------
    ValueError
        For ``n_folds < 2``, a class with fewer patients than folds (named with its count),
        ``val_fraction`` outside ``[0, 1)``, or malformed ids/labels.
    """
    from sklearn.model_selection import StratifiedKFold

    ids, y = _validated_patients(patient_ids, labels)
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    counts = Counter(y.tolist())
    too_small = {label: n for label, n in sorted(counts.items()) if n < n_folds}
    if too_small:
        described = ", ".join(f"class {label!r} has {n}" for label, n in too_small.items())
        raise ValueError(
            f"n_folds={n_folds} needs at least {n_folds} patients per class, but {described}"
        )

    splitter = StratifiedKFold(n_splits=int(n_folds), shuffle=True, random_state=int(seed))
    folds = []
    for k, (train_idx, test_idx) in enumerate(splitter.split(ids, y)):
        val_idx = np.array([], dtype=int)
        if val_fraction > 0:
            rng = np.random.default_rng([int(seed), k])
            parts = _allocate(y[train_idx], (1.0 - val_fraction, val_fraction), rng)
            train_idx, val_idx = train_idx[parts[0]], train_idx[parts[1]]
        folds.append(_fold(k, ids, train_idx, val_idx, test_idx))
    return folds


def holdout_split(
    patient_ids: Sequence[str],
    labels: Sequence[str],
    *,
    fractions: Sequence[float],
    seed: int,
) -> list[dict]:
    """One stratified train/val/test partition of patients, as a list holding one fold.

    ``fractions`` is ``(train, val, test)``, non-negative, summing to 1, with train and test
    above 0. Raises ``ValueError`` on bad fractions or when train or test would be empty.
    """
    return repeated_splits(patient_ids, labels, n_repeats=1, fractions=fractions, seed=seed)


def repeated_splits(
    patient_ids: Sequence[str],
    labels: Sequence[str],
    *,
    n_repeats: int,
    fractions: Sequence[float],
    seed: int,
) -> list[dict]:
    """``n_repeats`` independent stratified train/val/test partitions of patients.

    Repeat ``k`` draws from ``numpy.random.default_rng([seed, k])``, so the first repeats do not
    change when ``n_repeats`` grows. ``fractions`` as in :func:`holdout_split`.
    """
    ids, y = _validated_patients(patient_ids, labels)
    fractions = _validated_fractions(fractions)
    if isinstance(n_repeats, bool) or not isinstance(n_repeats, int | np.integer) or n_repeats < 1:
        raise ValueError(f"n_repeats must be an integer >= 1, got {n_repeats!r}")
    folds = []
    for k in range(int(n_repeats)):
        rng = np.random.default_rng([int(seed), k])
        train_idx, val_idx, test_idx = _allocate(y, fractions, rng)
        for name, idx in (("train", train_idx), ("test", test_idx)):
            if len(idx) == 0:
                raise ValueError(
                    f"fractions={list(fractions)} leave the {name} set empty for "
                    f"{len(ids)} patients with class counts {dict(sorted(Counter(y).items()))}"
                )
        folds.append(_fold(k, ids, train_idx, val_idx, test_idx))
    return folds


def read_partition_table(path: str | os.PathLike) -> pd.DataFrame:
    """A predefined partition TSV: ``patient_id``, ``part`` and optionally ``repeat``.

    Returns the table with ``repeat`` filled with 0 when absent. ``ValueError`` naming the file
    for a missing file or column, a part other than train/val/test, a repeat that is not a
    non-negative integer, or a patient listed twice within one repeat.
    """
    from mmdiag.io.tables import read_tsv

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: partition table not found")
    table = read_tsv(path, all_strings=True)
    missing = [c for c in ("patient_id", "part") if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: partition table lacks columns {missing}; has {list(table.columns)}"
        )
    table = table.map(str.strip)
    if "repeat" not in table.columns:
        table["repeat"] = "0"
    bad_parts = sorted(set(table["part"]) - set(PARTS))
    if bad_parts:
        raise ValueError(f"{path}: parts {bad_parts} are not among {list(PARTS)}")
    if not table["repeat"].str.fullmatch(r"\d+").all():
        bad = sorted(set(table.loc[~table["repeat"].str.fullmatch(r"\d+"), "repeat"]))
        raise ValueError(f"{path}: repeat values {bad[:20]} are not non-negative integers")
    table["repeat"] = table["repeat"].astype(int)
    twice = table[table.duplicated(["repeat", "patient_id"], keep=False)]
    if len(twice):
        listed = sorted(set(zip(twice["repeat"], twice["patient_id"], strict=True)))[:20]
        raise ValueError(f"{path}: patients listed twice within a repeat (repeat, id): {listed}")
    return table[["patient_id", "part", "repeat"]]


def predefined_splits(
    patient_ids: Sequence[str], table: pd.DataFrame, *, where: str = "partition table"
) -> list[dict]:
    """Folds from a partition table (see :func:`read_partition_table`), one per repeat.

    Every patient of ``patient_ids`` must be in every repeat, and the table may name no other
    patient; the ``ValueError`` names ``where`` and the patients.
    """
    ids = sorted(str(p) for p in patient_ids)
    expected = set(ids)
    folds = []
    for position, (repeat, rows) in enumerate(table.groupby("repeat", sort=True)):
        listed = set(rows["patient_id"])
        unknown, absent = sorted(listed - expected), sorted(expected - listed)
        if unknown or absent:
            raise ValueError(
                f"{where}, repeat {repeat}: patients not in the cohort (or without the "
                f"label): {unknown[:20]}; cohort patients missing: {absent[:20]}"
            )
        part_of = dict(zip(rows["patient_id"], rows["part"], strict=True))
        fold = {"fold": position}
        fold |= {part: sorted(p for p in ids if part_of[p] == part) for part in PARTS}
        for part in ("train", "test"):
            if not fold[part]:
                raise ValueError(f"{where}, repeat {repeat}: the {part} part is empty")
        folds.append(fold)
    if not folds:
        raise ValueError(f"{where}: no rows")
    return folds


def with_seed_repeats(folds: list[dict], n_seeds: int) -> list[dict]:
    """Each fold ``n_seeds`` times: fold ``r * len(folds) + k`` is fold ``k`` with seed ``r``."""
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int | np.integer) or n_seeds < 1:
        raise ValueError(f"n_seeds must be an integer >= 1, got {n_seeds!r}")
    if n_seeds == 1:
        return folds
    return [
        {**fold, "fold": r * len(folds) + k, "seed_index": r}
        for r in range(int(n_seeds))
        for k, fold in enumerate(folds)
    ]


def scheme_fold_count(scheme: Mapping[str, Any]) -> int:
    """How many folds a scheme of the config makes (a predefined one reads its table)."""
    scheme_type = scheme["type"]
    if scheme_type == "kfold":
        return int(scheme.get("n_folds", 5))
    if scheme_type == "repeated":
        return int(scheme.get("n_repeats", 10))
    n_partitions = 1
    if scheme_type == "predefined":
        n_partitions = read_partition_table(scheme["path"])["repeat"].nunique()
    return n_partitions * int(scheme.get("n_seeds", 1))


def training_seed(fold: Mapping[str, Any], seed: int) -> int:
    """The trainer's seed for ``fold``: ``seed`` plus the fold's seed index (0 if none)."""
    return int(seed) + int(fold.get("seed_index", 0))


# --------------------------------------------------------------------------- scheme level


def make_splits(
    manifest: pd.DataFrame, scheme_name: str, scheme: Mapping[str, Any], *, seed: int
) -> dict:
    """Split the patients of a manifest by a named scheme from the config.

    Takes one row per patient, stratifies on ``scheme["label"]`` (default ``"disease"``) and
    leaves out patients whose label is empty, so an ``mn_stage`` scheme covers MN patients only.

    Parameters
    ----------
    manifest
        A manifest frame (see :mod:`mmdiag.data.manifest`).
    scheme_name
        The scheme's name in the config, recorded in the result.
    scheme
        ``{"type": "kfold", "n_folds": 5, "val_fraction": 0.0, "label": "disease"}``,
        ``{"type": "holdout", "fractions": [0.6, 0.1, 0.3], "label": "disease"}`` or
        ``{"type": "repeated", "n_repeats": 10, "fractions": [0.6, 0.1, 0.3], ...}`` or
        ``{"type": "predefined", "path": "splits.tsv", "n_seeds": 3}``.
    seed
        Seed of every random choice.

    Returns
    -------
    dict
        ``{"scheme", "type", "seed", "label", "n_patients", "params", "folds"}``.
    """
    if not isinstance(scheme, Mapping):
        raise ValueError(f"scheme {scheme_name!r} must be a mapping, got {type(scheme).__name__}")
    scheme_type = scheme.get("type")
    if scheme_type not in SCHEME_TYPES:
        raise ValueError(
            f"scheme {scheme_name!r}: type must be one of {list(SCHEME_TYPES)}, got {scheme_type!r}"
        )
    label = scheme.get("label", "disease")
    # keys of the other scheme types are tolerated (the config schema fills every default) and
    # left out of the result; a key no scheme type knows is a typo.
    allowed = {"type", "label", *(key for keys in _SCHEME_PARAMS.values() for key in keys)}
    unknown = sorted(set(scheme) - allowed)
    if unknown:
        raise ValueError(
            f"scheme {scheme_name!r} ({scheme_type}): unknown keys {unknown}; "
            f"allowed keys: {sorted(allowed)}"
        )
    for column in ("patient_id", label):
        if column not in manifest.columns:
            raise ValueError(
                f"scheme {scheme_name!r}: manifest has no column {column!r} "
                f"(columns: {list(manifest.columns)})"
            )

    patients = manifest[["patient_id", label]].copy()
    patients["patient_id"] = patients["patient_id"].astype(str)
    patients[label] = patients[label].fillna("").astype(str).str.strip()
    per_patient = patients.groupby("patient_id")[label].agg(lambda v: sorted(set(v)))
    inconsistent = per_patient[per_patient.map(len) > 1]
    if len(inconsistent):
        raise ValueError(
            f"scheme {scheme_name!r}: label {label!r} differs within patients: "
            f"{dict(inconsistent.head(20))}"
        )
    per_patient = per_patient.map(lambda v: v[0])
    per_patient = per_patient[per_patient != ""]
    if per_patient.empty:
        raise ValueError(f"scheme {scheme_name!r}: no patient has a non-empty {label!r} label")
    ids, y = per_patient.index.tolist(), per_patient.tolist()

    if scheme_type == "kfold":
        params = {
            "n_folds": scheme.get("n_folds", 5),
            "val_fraction": float(scheme.get("val_fraction", 0.0)),
        }
        folds = kfold_splits(ids, y, seed=seed, **params)
    elif scheme_type == "holdout":
        params = {
            "fractions": _fractions_param(scheme, scheme_name),
            "n_seeds": scheme.get("n_seeds", 1),
        }
        folds = holdout_split(ids, y, seed=seed, fractions=params["fractions"])
        folds = with_seed_repeats(folds, params["n_seeds"])
    elif scheme_type == "predefined":
        if not scheme.get("path"):
            raise ValueError(f"scheme {scheme_name!r} (predefined) needs 'path'")
        params = {"path": str(scheme["path"]), "n_seeds": scheme.get("n_seeds", 1)}
        table = read_partition_table(params["path"])
        folds = predefined_splits(ids, table, where=f"scheme {scheme_name!r}: {params['path']}")
        folds = with_seed_repeats(folds, params["n_seeds"])
    else:
        params = {
            "n_repeats": scheme.get("n_repeats", 10),
            "fractions": _fractions_param(scheme, scheme_name),
        }
        folds = repeated_splits(ids, y, seed=seed, **params)
    return {
        "scheme": str(scheme_name),
        "type": scheme_type,
        "seed": int(seed),
        "label": label,
        "n_patients": len(ids),
        "params": params,
        "folds": folds,
    }


def write_splits(splits: dict, path: str | os.PathLike) -> Path:
    """Validate ``splits`` and write it as JSON, atomically.

    Side effects: creates ``path`` (and its parent folders).
    """
    _validate_splits(splits, f"splits to be written to {path}")
    return write_json(splits, path)


def load_splits(path: str | os.PathLike) -> dict:
    """Read a splits JSON and check its structure; ``ValueError`` naming the file otherwise.

    Checks the top-level keys, that folds are numbered 0, 1, ..., that each fold's
    train/val/test lists are disjoint and together hold ``n_patients`` patients, and, for
    ``kfold``, that every patient is in exactly one test fold.
    """
    import json

    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: splits file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: splits file is not readable JSON ({exc})") from exc
    _validate_splits(splits, str(path))
    return splits


def load_fold(path: str | os.PathLike, fold: int) -> dict:
    """One fold (``{"fold", "train", "val", "test"}``) of a splits file; ``ValueError``
    naming the file and the folds it has when ``fold`` is not among them."""
    splits = load_splits(path)
    for entry in splits["folds"]:
        if entry["fold"] == fold:
            return entry
    available = [entry["fold"] for entry in splits["folds"]]
    raise ValueError(f"{path}: no fold {fold}; folds available: {available}")


# --------------------------------------------------------------------------- private helpers


def _validated_patients(
    patient_ids: Sequence[str], labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Return ids and labels as string arrays, sorted by id."""
    ids = [str(p) for p in patient_ids]
    y = [str(v) for v in labels]
    if len(ids) != len(y):
        raise ValueError(
            f"patient_ids and labels differ in length: {len(ids)} ids, {len(y)} labels"
        )
    if not ids:
        raise ValueError("patient_ids is empty")
    duplicated = sorted(p for p, n in Counter(ids).items() if n > 1)
    if duplicated:
        raise ValueError(f"patient_ids must be unique, repeated: {duplicated[:20]}")
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    return np.array(ids, dtype=object)[order], np.array(y, dtype=object)[order]


def _validated_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fractions must be three numbers, got {fractions!r}") from exc
    if len(values) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {len(values)}: {values}")
    if any(f < 0 for f in values) or values[0] == 0 or values[2] == 0:
        raise ValueError(
            f"fractions must be non-negative with train and test > 0, got {list(values)}"
        )
    if not math.isclose(sum(values), 1.0, abs_tol=_FRACTION_TOLERANCE):
        raise ValueError(f"fractions must sum to 1, got {list(values)} (sum {sum(values):g})")
    return values


def _fractions_param(scheme: Mapping[str, Any], scheme_name: str) -> list[float]:
    if "fractions" not in scheme:
        raise ValueError(f"scheme {scheme_name!r} ({scheme['type']}) needs 'fractions'")
    return [float(f) for f in _validated_fractions(scheme["fractions"])]


def _allocate(
    y: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Partition positions ``0..len(y)-1`` into ``len(fractions)`` parts, exactly per class.

    Within each class the patients are shuffled, each part gets ``floor(n_c * f)`` of them and
    the leftovers go to the parts with the largest remainders (ties to the earlier part).
    """
    parts: list[list[int]] = [[] for _ in fractions]
    for label in sorted(set(y.tolist())):
        members = rng.permutation(np.flatnonzero(y == label))
        ideal = np.array(fractions) * len(members)
        counts = np.floor(ideal + 1e-9).astype(int)
        leftover = len(members) - counts.sum()
        by_remainder = sorted(range(len(fractions)), key=lambda j: (-(ideal[j] - counts[j]), j))
        for j in by_remainder[:leftover]:
            counts[j] += 1
        start = 0
        for j, count in enumerate(counts):
            parts[j].extend(members[start : start + count].tolist())
            start += count
    return [np.array(sorted(p), dtype=int) for p in parts]


def _fold(
    k: int, ids: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, test_idx: np.ndarray
) -> dict:
    return {
        "fold": int(k),
        "train": sorted(ids[train_idx].tolist()),
        "val": sorted(ids[val_idx].tolist()),
        "test": sorted(ids[test_idx].tolist()),
    }


def _validate_splits(splits: Any, where: str) -> None:
    def fail(problem: str) -> None:
        raise ValueError(f"{where}: {problem}")

    if not isinstance(splits, dict):
        fail(f"expected a JSON object, got {type(splits).__name__}")
    missing = [key for key in _SPLITS_KEYS if key not in splits]
    if missing:
        fail(f"missing keys {missing} (present: {sorted(splits)})")
    if splits["type"] not in SCHEME_TYPES:
        fail(f"type must be one of {list(SCHEME_TYPES)}, got {splits['type']!r}")
    folds = splits["folds"]
    if not isinstance(folds, list) or not folds:
        fail("'folds' must be a non-empty list")
    n_patients = splits["n_patients"]
    if not isinstance(n_patients, int) or n_patients < 1:
        fail(f"'n_patients' must be a positive integer, got {n_patients!r}")
    if not isinstance(splits["params"], dict):
        fail("'params' must be an object")

    tested: Counter[str] = Counter()
    for position, fold in enumerate(folds):
        if not isinstance(fold, dict):
            fail(f"fold {position} is not an object")
        if fold.get("fold") != position:
            fail(f"fold at position {position} is numbered {fold.get('fold')!r}")
        seed_index = fold.get("seed_index", 0)
        if isinstance(seed_index, bool) or not isinstance(seed_index, int) or seed_index < 0:
            fail(f"fold {position}: 'seed_index' must be a non-negative integer")
        sets = {}
        for part in ("train", "val", "test"):
            members = fold.get(part)
            if not isinstance(members, list) or not all(isinstance(p, str) for p in members):
                fail(f"fold {position}: '{part}' must be a list of patient id strings")
            if len(set(members)) != len(members):
                fail(f"fold {position}: '{part}' lists a patient twice")
            sets[part] = set(members)
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = sorted(sets[a] & sets[b])
            if shared:
                fail(f"fold {position}: patients in both {a} and {b}: {shared[:20]}")
        covered = len(sets["train"]) + len(sets["val"]) + len(sets["test"])
        if covered != n_patients:
            fail(f"fold {position} holds {covered} patients, n_patients is {n_patients}")
        tested.update(sets["test"])
    if splits["type"] == "kfold":
        repeated = sorted(p for p, n in tested.items() if n > 1)
        if repeated or len(tested) != n_patients:
            fail(
                f"k-fold test sets must hold every patient exactly once; {len(tested)} of "
                f"{n_patients} patients tested, repeated: {repeated[:20]}"
            )
