"""Expression preprocessing fitted on the training samples of a fold, applied to all samples.

Every statistic (gene means and standard deviations, which genes are most variable) comes from
the samples passed to :meth:`ExpressionPreprocessor.fit` only, so that validation and test
samples never influence their own features: fitting on the whole cohort would leak the test
distribution into training. The fitted parameters are a JSON-able dict
(:meth:`~ExpressionPreprocessor.state_dict`), stored with the fold and read back with
:meth:`~ExpressionPreprocessor.from_state`.

Steps, in this order, each optional:

1. ``log1p``: ``log(1 + x)``, for counts or normalised counts (values must be >= 0).
2. ``n_top_variable``: keep the genes with the largest variance over the training samples
   (population variance, after ``log1p``); ties in variance are broken by gene name, in
   ascending order, so the selection does not depend on column order. The kept genes stay in
   the table's column order.
3. ``zscore``: subtract each kept gene's training mean and divide by its training standard
   deviation (population, ``ddof=0``). A gene whose training values are all equal gets
   standard deviation 1 (and its exact value as mean), so it maps to 0 on the training
   samples and to its offset from that value elsewhere, instead of dividing by zero.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mmdiag.genes.tables import GeneTableError, validate_expression

__all__ = ["ExpressionPreprocessor"]

#: ``format`` entry of a state dict, and the version of its layout.
STATE_FORMAT = "mmdiag.genes.ExpressionPreprocessor"
STATE_VERSION = 1
_STATE_KEYS = {
    "format",
    "version",
    "log1p",
    "zscore",
    "n_top_variable",
    "n_train_samples",
    "genes",
    "mean",
    "std",
}


class ExpressionPreprocessor:
    """Fit-on-train, apply-to-any normalisation and gene selection for expression tables.

    Parameters
    ----------
    log1p : bool
        Apply ``log(1 + x)`` first.
    zscore : bool
        Standardise each gene with its training mean and standard deviation.
    n_top_variable : int, optional
        Keep only this many most variable genes (by training variance); None keeps all.

    Attributes
    ----------
    genes_ : list of str
        The genes :meth:`transform` returns, in order (set by :meth:`fit`).
    mean_, std_ : numpy.ndarray or None
        Per-gene training mean and standard deviation of ``genes_`` (None without ``zscore``).
    n_train_samples_ : int
        How many samples the parameters were fitted on.

    Examples
    --------
    >>> train = pd.DataFrame({"A": [1.0, 3.0], "B": [5.0, 5.0]}, index=["s1", "s2"])
    >>> pre = ExpressionPreprocessor(zscore=True).fit(train)
    >>> pre.mean_.tolist(), pre.std_.tolist()
    ([2.0, 5.0], [1.0, 1.0])
    >>> pre.transform(pd.DataFrame({"A": [4.0], "B": [7.0]}, index=["t1"])).to_numpy().tolist()
    [[2.0, 2.0]]
    """

    def __init__(
        self, *, log1p: bool = False, zscore: bool = True, n_top_variable: int | None = None
    ) -> None:
        self.log1p = bool(log1p)
        self.zscore = bool(zscore)
        self.n_top_variable = _check_top(n_top_variable)
        self.genes_: list[str] | None = None
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None
        self.n_train_samples_: int | None = None

    def __repr__(self) -> str:
        return (
            f"ExpressionPreprocessor(log1p={self.log1p}, zscore={self.zscore}, "
            f"n_top_variable={self.n_top_variable})"
        )

    # ------------------------------------------------------------------------------ fitting

    def fit(self, table: pd.DataFrame) -> ExpressionPreprocessor:
        """Fit the parameters on ``table`` (the training samples x genes) and return self."""
        table = validate_expression(table, source="training table")
        values = self._log(table.to_numpy(), table, "training table")
        genes = list(table.columns)
        if not all(isinstance(gene, str) for gene in genes):
            raise GeneTableError("training table: gene names must be strings")
        if self.n_top_variable is not None:
            keep = top_variable(values, genes, self.n_top_variable)
            values, genes = values[:, keep], [genes[i] for i in keep]
        self.genes_, self.n_train_samples_ = genes, len(table)
        self.mean_, self.std_ = standardisation(values) if self.zscore else (None, None)
        return self

    def transform(self, table: pd.DataFrame) -> pd.DataFrame:
        """Apply the fitted steps to any samples; returns samples x :attr:`genes_` float64."""
        if self.genes_ is None:
            raise RuntimeError("ExpressionPreprocessor is not fitted; call fit first")
        present = set(table.columns)
        missing = [gene for gene in self.genes_ if gene not in present]
        if missing:
            raise GeneTableError(
                f"table lacks {len(missing)} of the {len(self.genes_)} fitted genes: "
                f"{', '.join(map(repr, missing[:10]))}{', ...' if len(missing) > 10 else ''}"
            )
        block = validate_expression(table[self.genes_], source="table to transform")
        values = self._log(block.to_numpy(), block, "table to transform")
        if self.zscore:
            values = (values - self.mean_) / self.std_
        return pd.DataFrame(values, index=block.index, columns=list(self.genes_))

    def fit_transform(self, table: pd.DataFrame) -> pd.DataFrame:
        """:meth:`fit` on ``table``, then :meth:`transform` it."""
        return self.fit(table).transform(table)

    def _log(self, values: np.ndarray, table: pd.DataFrame, source: str) -> np.ndarray:
        if not self.log1p:
            return values
        rows, cols = np.nonzero(values < 0)
        if len(rows):
            raise GeneTableError(
                f"{source}: log1p needs values >= 0, got {values[rows[0], cols[0]]} for sample "
                f"{table.index[rows[0]]!r}, gene {table.columns[cols[0]]!r} ({len(rows)} cells)"
            )
        return np.log1p(values)

    # ------------------------------------------------------------------------ saved state

    def state_dict(self) -> dict[str, Any]:
        """The settings and fitted parameters as a JSON-able dict (floats round-trip exactly)."""
        if self.genes_ is None:
            raise RuntimeError("ExpressionPreprocessor is not fitted; nothing to save")
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "log1p": self.log1p,
            "zscore": self.zscore,
            "n_top_variable": self.n_top_variable,
            "n_train_samples": self.n_train_samples_,
            "genes": list(self.genes_),
            "mean": _floats(self.mean_),
            "std": _floats(self.std_),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ExpressionPreprocessor:
        """Rebuild a fitted preprocessor from :meth:`state_dict` output."""
        _check_state(state)
        pre = cls(
            log1p=state["log1p"], zscore=state["zscore"], n_top_variable=state["n_top_variable"]
        )
        pre.genes_ = [str(gene) for gene in state["genes"]]
        pre.n_train_samples_ = int(state["n_train_samples"])
        if pre.zscore:
            pre.mean_ = np.asarray(state["mean"], dtype=np.float64)
            pre.std_ = np.asarray(state["std"], dtype=np.float64)
        return pre


# --------------------------------------------------------------------------------- helpers


def top_variable(values: np.ndarray, genes: Sequence[str], n_top: int) -> list[int]:
    """Column positions of the ``n_top`` most variable genes, in column order.

    Rank by population variance, largest first, ties broken by gene name (ascending).

    Examples
    --------
    >>> values = np.array([[0.0, 1.0, 0.0, 5.0], [2.0, 1.0, 2.0, 5.0]])
    >>> top_variable(values, ["C", "B", "A", "D"], 1)
    [2]
    """
    if n_top > len(genes):
        raise GeneTableError(f"n_top_variable={n_top} exceeds the {len(genes)} genes")
    variance = values.var(axis=0)
    ranked = sorted(range(len(genes)), key=lambda i: (-variance[i], genes[i]))
    return sorted(ranked[:n_top])


def standardisation(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population std; constant columns get (their value, 1)."""
    mean, std = values.mean(axis=0), values.std(axis=0)
    constant = np.ptp(values, axis=0) == 0
    mean[constant], std[constant] = values[0, constant], 1.0
    return mean, std


def _floats(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _check_top(n_top: object) -> int | None:
    if n_top is None:
        return None
    if isinstance(n_top, bool) or not isinstance(n_top, numbers.Integral) or n_top < 1:
        raise ValueError(f"n_top_variable must be a positive integer or None, got {n_top!r}")
    return int(n_top)


def _check_state(state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not an ExpressionPreprocessor state (format {STATE_FORMAT!r})")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported state version {state.get('version')!r}")
    if set(state) != _STATE_KEYS:
        raise ValueError(f"state keys differ from {sorted(_STATE_KEYS)}: {sorted(state)}")
    n_genes = len(state["genes"])
    for key in ("mean", "std"):
        expected = n_genes if state["zscore"] else None
        got = None if state[key] is None else len(state[key])
        if got != expected:
            raise ValueError(f"state {key!r} has length {got}, expected {expected}")
