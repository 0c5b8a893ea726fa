"""Argument validators shared by the statistical tests and measures of :mod:`mmdiag.stats`.

Every validator raises ``ValueError`` naming the argument and the value it got, and returns the
argument in the form the computation needs (a 1-D float64 or bool array, a float, an int).
Unified: ``check_level`` takes any real number but a bool (numpy too), checked as a float.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

__all__ = [
    "as_1d",
    "as_binary",
    "as_finite_float",
    "as_grades",
    "as_labels",
    "as_scores",
    "as_two_class_labels",
    "check_flag",
    "check_integer",
    "check_level",
    "check_same_length",
    "check_seed",
    "describe",
]


def describe(value: object) -> str:
    """``repr`` of ``value`` (arrays as lists) cut to 80 characters, for error messages."""
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------- scalars


def check_level(level: object) -> float:
    """Return a confidence level as a float; raise unless it is a real number in (0, 1).

    Examples
    --------
    >>> check_level(np.float32(0.5))
    0.5
    """
    if (
        isinstance(level, bool | np.bool_)
        or not isinstance(level, numbers.Real)
        or not 0.0 < float(level) < 1.0
    ):
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    return float(level)


def check_integer(value: object, name: str, *, minimum: int) -> int:
    """Return ``value`` as an int; raise unless it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(seed: object) -> None:
    """Raise unless ``seed`` is ``None`` or a non-negative integer (not a bool)."""
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
    ):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")


def check_flag(value: object, name: str) -> None:
    """Raise unless ``value`` is a bool (Python or numpy): ``"yes"`` or ``1`` is a mistake."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")


# ----------------------------------------------------------------------------------- arrays


def as_1d(values: object, name: str) -> np.ndarray:
    """``values`` as a numpy array; raise unless it is one-dimensional."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one-dimensional), got shape {array.shape}")
    return array


def check_same_length(arrays: Mapping[str, np.ndarray], *, unit: str = "pairs") -> int:
    """Return the common length of ``arrays``; raise if lengths differ or it is below 2.

    ``unit`` names what one position is (``"pairs"``, ``"patients"``) in the message.
    """
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"lengths differ: {lengths}")
    n = next(iter(lengths.values()))
    if n < 2:
        raise ValueError(f"need at least 2 {unit}, got {n}")
    return n


def _first_bad(array: np.ndarray, bad: np.ndarray) -> tuple[object, int]:
    index = int(np.flatnonzero(bad)[0])
    return array[index], index


def as_finite_float(values: object, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array; raise unless numeric (not bool) and all finite."""
    array = as_1d(values, name)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        value, index = _first_bad(array, bad)
        raise ValueError(f"{name} must be finite, got {value} at index {index}")
    return array


def as_binary(values: object, name: str) -> np.ndarray:
    """``values`` as a 1-D bool array; raise unless it holds bools or the numbers 0 and 1."""
    array = as_1d(values, name)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be boolean or 0/1, got dtype {array.dtype}")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        value, index = _first_bad(array, bad)
        raise ValueError(f"{name} must be boolean or 0/1, got {value} at index {index}")
    return array.astype(bool)


def as_labels(values: object, name: str) -> np.ndarray:
    """``values`` as a 1-D array of class labels of any type; raise on a missing value."""
    array = as_1d(values, name)
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise ValueError(f"{name} contains NaN at index {np.flatnonzero(np.isnan(array))[0]}")
    if array.dtype == object and any(v is None or v != v for v in array):
        raise ValueError(f"{name} contains a missing value (None or NaN)")
    return array


def as_grades(values: object, name: str, n_classes: int) -> np.ndarray:
    """``values`` as a 1-D intp array; raise unless every value is an integer in 0..K-1."""
    array = as_1d(values, name)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must hold integer grades, got dtype {array.dtype}")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            value, index = _first_bad(array, bad)
            raise ValueError(f"{name} must hold integer grades, got {value} at {index}")
    outside = (array < 0) | (array > n_classes - 1)
    if outside.any():
        value, index = _first_bad(array, outside)
        raise ValueError(
            f"{name} must lie in 0..{n_classes - 1} (n_classes={n_classes}), "
            f"got {value} at index {index}"
        )
    return array.astype(np.intp)


def as_two_class_labels(values: object, name: str = "y_true") -> np.ndarray:
    """``values`` as a 1-D bool array; raise unless non-empty, 0/1 or bool, both classes.

    Unlike :func:`as_binary`, a sample of one class only is rejected (an ROC curve needs
    positives and negatives), and the offending values are listed rather than located.
    """
    y = as_1d(values, name)
    if y.size == 0:
        raise ValueError(f"{name} must not be empty, got 0 samples")
    if y.dtype != bool:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise ValueError(f"{name} must hold 0/1 or bool labels, got dtype {y.dtype}")
        found = np.unique(y)
        if not np.all(np.isin(found, [0, 1])):
            raise ValueError(f"{name} must hold 0/1 or bool labels, got values {describe(found)}")
        y = y == 1
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        absent = 1 if n_pos == 0 else 0
        raise ValueError(
            f"{name} must hold both classes, class {absent} is absent ({y.size} samples)"
        )
    return y


def as_scores(values: object, name: str, n: int, *, reference: str = "y_true") -> np.ndarray:
    """``values`` as a 1-D float64 array of length ``n``; raise unless numeric and NaN-free.

    Bools and infinities are allowed: a score only has to be ordered. ``reference`` names
    the argument that fixed ``n``.
    """
    s = as_1d(values, name)
    if s.shape[0] != n:
        raise ValueError(f"{name} has length {s.shape[0]}, but {reference} has length {n}")
    if not (np.issubdtype(s.dtype, np.number) or s.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    is_nan = np.isnan(s)
    n_nan = int(is_nan.sum())
    if n_nan:
        first = int(np.flatnonzero(is_nan)[0])
        raise ValueError(f"{name} must not contain NaN, got {n_nan} (first at index {first})")
    return s
