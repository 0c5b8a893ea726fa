"""Reading gene-expression tables: samples x genes, float64, validated.

Two sources give the same result, a :class:`pandas.DataFrame` indexed by sample id with one
float64 column per gene:

* delimited text (``.tsv``/``.txt``/``.tab`` tab-separated, ``.csv`` comma-separated, each
  optionally ``.gz``/``.bz2``/``.xz`` compressed): one row per sample, the sample ids in the
  ``sample_id`` column (or the first column), every other column a gene;
* AnnData ``.h5ad`` files, read directly with h5py following the AnnData on-disk format: the
  current encoding (``encoding-type`` attributes, anndata >= 0.8), the 0.7 encoding
  (categoricals referenced from ``__categories``) and the pre-0.7 one (``obs``/``var`` as
  compound datasets, categories in ``uns/<column>_categories``, sparse groups marked
  ``h5sparse_format``, raw data in ``raw.X``/``raw.var``).

Every problem raises :class:`GeneTableError` naming the file and what is wrong (the sample and
gene of a bad cell), because a table that is silently misread (a duplicated gene mangled into
``GENE.1``, a stray ``NA`` read as a number column of strings) would corrupt every model
trained on it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["GeneTableError", "read_expression", "read_obs", "validate_expression"]

#: Suffixes of delimited text tables and their separators.
TEXT_SEPARATORS = {".tsv": "\t", ".txt": "\t", ".tab": "\t", ".csv": ","}
#: Compression suffixes accepted after a text suffix, and how to open them as text.
_OPENERS = {"": open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
#: Cell texts (compared stripped and lower-cased) read as missing values, not as non-numbers.
MISSING_TOKENS = frozenset({"", "na", "nan", "-nan", "n/a", "#n/a", "<na>", "null", "none"})
#: How many offending cells or names an error message lists.
LISTED = 5


class GeneTableError(ValueError):
    """A gene-expression table (or its file) is not a valid samples x genes table."""


# ------------------------------------------------------------------------------------ public


def read_expression(
    path: str | os.PathLike,
    *,
    sample_column: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
) -> pd.DataFrame:
    """Read a gene-expression table as samples x genes float64.

    Parameters
    ----------
    path : path-like
        A delimited text table (see the module notes for suffixes) or an ``.h5ad`` file.
    sample_column : str, optional
        Text tables only: the column of sample ids; by default ``sample_id`` if the header has
        it, else the first column. In an ``.h5ad`` the samples are the ``obs`` index.
    layer : str, optional
        ``.h5ad`` only: read ``layers/<layer>`` instead of ``X``.
    use_raw : bool
        ``.h5ad`` only: read the raw matrix (``raw/X``, or ``raw.X`` in pre-0.7 files) with the
        raw gene names (``raw/var`` or ``raw.var``) instead of ``X``.

    Returns
    -------
    pandas.DataFrame
        Index: sample ids (strings, unique, named after the sample column, ``obs_names`` for
        ``.h5ad``); columns: gene names (unique); values float64, all finite.

    Raises
    ------
    GeneTableError
        Unknown suffix, empty table, duplicate sample ids or gene names, non-numeric cells
        (naming sample and gene) or missing/non-finite values (naming the first few cells).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such expression table")
    if path.suffix.lower() == ".h5ad":
        if sample_column is not None:
            raise GeneTableError(f"{path}: sample ids of an .h5ad are its obs index")
        table = _read_h5ad_expression(path, layer=layer, use_raw=use_raw)
    else:
        if layer is not None or use_raw:
            raise GeneTableError(f"{path}: layer and use_raw apply to .h5ad files only")
        table = _read_text_expression(path, sample_column)
    return validate_expression(table, source=str(path))


def read_obs(path: str | os.PathLike) -> pd.DataFrame:
    """Read the per-sample annotation table (``obs``) of an ``.h5ad`` file.

    Categorical columns come back as :class:`pandas.Categorical` (so a column such as a cell
    type can serve as a label), strings as strings, numbers as numbers; the index is the obs
    names, as in :func:`read_expression`.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .h5ad file")
    with h5py.File(path, "r") as handle:
        if "obs" not in handle:
            raise GeneTableError(f"{path}: no obs table")
        return _read_frame(handle["obs"], path)


def validate_expression(table: pd.DataFrame, *, source: str = "table") -> pd.DataFrame:
    """Check a samples x genes table and return it as float64.

    ``source`` names the table in error messages (a file path). Checks: at least one sample
    and one gene, unique sample ids and gene names, numeric cells, finite values.
    """
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise GeneTableError(
            f"{source}: empty table ({table.shape[0]} samples x {table.shape[1]} genes)"
        )
    _check_unique(table.index, "sample ids", source)
    _check_unique(table.columns, "gene names", source)
    bad = [column for column in table.columns if not pd.api.types.is_numeric_dtype(table[column])]
    if bad:
        raise GeneTableError(f"{source}: non-numeric gene columns {_listing(bad)}")
    values = table.to_numpy(dtype=np.float64)
    _check_finite(values, table.index, table.columns, source)
    return pd.DataFrame(values, index=table.index.copy(), columns=table.columns.copy())


# ---------------------------------------------------------------------------- checks, errors


def _listing(items: Sequence[object], limit: int = LISTED) -> str:
    shown = ", ".join(repr(item) for item in list(items)[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_unique(names: pd.Index, what: str, source: str) -> None:
    duplicated = names[names.duplicated()].unique().tolist()
    if duplicated:
        raise GeneTableError(f"{source}: duplicate {what} {_listing(duplicated)}")


def _check_finite(values: np.ndarray, samples: pd.Index, genes: pd.Index, source: str) -> None:
    rows, cols = np.nonzero(~np.isfinite(values))
    if len(rows):
        cells = [
            f"(sample {samples[r]!r}, gene {genes[c]!r}: {values[r, c]})"
            for r, c in zip(rows[:LISTED], cols[:LISTED], strict=True)
        ]
        more = f", ... ({len(rows)} cells in all)" if len(rows) > LISTED else ""
        raise GeneTableError(f"{source}: NaN or infinite values at {', '.join(cells)}{more}")


# ------------------------------------------------------------------------------- text tables


def _text_format(path: Path) -> tuple[str, object]:
    """Return (separator, opener) from the suffixes, e.g. ``.tsv.gz`` -> tab, gzip."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in _OPENERS else ""
    rest = suffixes[:-1] if compression else suffixes
    text = rest[-1] if rest else ""
    if text not in TEXT_SEPARATORS:
        raise GeneTableError(
            f"{path}: unknown table format; expected .h5ad or one of "
            f"{', '.join(TEXT_SEPARATORS)} (optionally .gz, .bz2, .xz)"
        )
    return TEXT_SEPARATORS[text], _OPENERS[compression]


def _read_header(path: Path, separator: str, opener) -> list[str]:
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle, delimiter=separator), None)
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise GeneTableError(f"{path}: not a readable text table ({error})") from error
    if not header:
        raise GeneTableError(f"{path}: empty table (no header line)")
    return header


def _sample_position(header: list[str], sample_column: str | None, path: Path) -> int:
    if sample_column is None:
        return header.index("sample_id") if "sample_id" in header else 0
    if sample_column not in header:
        raise GeneTableError(
            f"{path}: no sample column {sample_column!r}; header starts {_listing(header)}"
        )
    return header.index(sample_column)


def _read_text_expression(path: Path, sample_column: str | None) -> pd.DataFrame:
    separator, opener = _text_format(path)
    header = _read_header(path, separator, opener)
    position = _sample_position(header, sample_column, path)
    genes = header[:position] + header[position + 1 :]
    if "" in genes:
        raise GeneTableError(
            f"{path}: empty gene name in the header (column "
            f"{header.index('', position + 1 if position == 0 else 0) + 1})"
        )
    _check_unique(pd.Index(genes), "gene names", str(path))
    try:
        frame = pd.read_csv(path, sep=separator, dtype={position: str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise GeneTableError(f"{path}: not a readable text table ({error})") from error
    frame.columns = header  # pandas renames empty or repeated names; restore the file's
    samples = frame.pop(header[position])
    frame.index = pd.Index(samples.astype(str), name=header[position] or "sample_id")
    _check_sample_ids(frame.index, path)
    return _numeric_columns(frame, path)


def _check_sample_ids(samples: pd.Index, path: Path) -> None:
    empty = np.flatnonzero(samples.str.strip() == "")
    if len(empty):
        rows = ", ".join(str(row + 2) for row in empty[:LISTED])  # 1-based, after the header
        raise GeneTableError(f"{path}: empty sample id on line(s) {rows}")


def _numeric_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Convert text columns to numbers; missing tokens become NaN, anything else is an error."""
    converted = {}
    for gene in frame.columns:
        column = frame[gene]
        if pd.api.types.is_numeric_dtype(column):
            converted[gene] = column.astype(np.float64)
            continue
        numbers = pd.to_numeric(column, errors="coerce").astype(np.float64)
        texts = column.astype(str).str.strip()
        bad = numbers.isna() & ~texts.str.lower().isin(MISSING_TOKENS)
        if bad.any():
            sample = frame.index[int(np.flatnonzero(bad.to_numpy())[0])]
            raise GeneTableError(
                f"{path}: non-numeric value {texts[bad].iloc[0]!r} for sample {sample!r}, "
                f"gene {gene!r} ({int(bad.sum())} such cells in this gene)"
            )
        converted[gene] = numbers
    return pd.DataFrame(converted, index=frame.index)


# -------------------------------------------------------------------------------------- h5ad


def _read_h5ad_expression(path: Path, *, layer: str | None, use_raw: bool) -> pd.DataFrame:
    import h5py

    if layer is not None and use_raw:
        raise GeneTableError(f"{path}: give layer or use_raw, not both")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise GeneTableError(f"{path}: not a readable HDF5 file ({error})") from error
    with handle:
        matrix, var = _matrix_and_var(handle, path, layer=layer, use_raw=use_raw)
        samples = _read_index(handle["obs"], path) if "obs" in handle else None
        genes = _read_index(var, path)
        if samples is None:
            raise GeneTableError(f"{path}: no obs table (sample ids)")
        values = _read_matrix(matrix, path)
        if values.shape != (len(samples), len(genes)):
            raise GeneTableError(
                f"{path}: matrix {matrix.name} is {values.shape[0]} x {values.shape[1]} but obs "
                f"has {len(samples)} samples and var {len(genes)} genes"
            )
    return pd.DataFrame(values, index=pd.Index(samples, name="obs_names"), columns=pd.Index(genes))


def _matrix_and_var(handle, path: Path, *, layer: str | None, use_raw: bool):
    """Return the (matrix element, var element) pair that ``layer``/``use_raw`` select."""
    if use_raw:
        for matrix, var in (("raw/X", "raw/var"), ("raw.X", "raw.var")):
            if matrix in handle and var in handle:
                return handle[matrix], handle[var]
        raise GeneTableError(f"{path}: no raw matrix (raw/X with raw/var, or raw.X with raw.var)")
    if "var" not in handle:
        raise GeneTableError(f"{path}: no var table (gene names)")
    if layer is None:
        if "X" not in handle:
            raise GeneTableError(f"{path}: no X matrix")
        return handle["X"], handle["var"]
    layers = list(handle["layers"]) if "layers" in handle else []
    if layer not in layers:
        raise GeneTableError(f"{path}: no layer {layer!r}; layers: {_listing(layers)}")
    return handle["layers"][layer], handle["var"]


def _attr(element, name: str, default=None):
    value = element.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _read_matrix(element, path: Path) -> np.ndarray:
    """A dense float64 array from a dense dataset or a CSR/CSC group."""
    import h5py

    if isinstance(element, h5py.Dataset):
        values = np.asarray(element[()], dtype=np.float64)
        if values.ndim != 2:
            raise GeneTableError(f"{path}: {element.name} is not a 2-D matrix")
        return values
    encoding = _attr(element, "encoding-type") or _attr(element, "h5sparse_format")
    shape = element.attrs.get("shape", element.attrs.get("h5sparse_shape"))
    layout = {"csr_matrix": "csr", "csc_matrix": "csc", "csr": "csr", "csc": "csc"}.get(encoding)
    if layout is None or shape is None:
        raise GeneTableError(f"{path}: {element.name} is not a dense, CSR or CSC matrix")
    arrays = {key: element[key][()] for key in ("data", "indices", "indptr") if key in element}
    if len(arrays) != 3:
        raise GeneTableError(f"{path}: {element.name} lacks data, indices or indptr")
    return densify(
        layout,
        arrays["data"],
        arrays["indices"],
        arrays["indptr"],
        tuple(shape),
        source=f"{path}: {element.name}",
    )


def densify(layout, data, indices, indptr, shape, *, source="matrix") -> np.ndarray:
    """Expand a compressed sparse row (``"csr"``) or column (``"csc"``) matrix to dense float64.

    The three arrays are those of the standard compressed layout (as in scipy and AnnData);
    repeated entries of one cell are summed, as scipy does. Raises :class:`GeneTableError`
    naming ``source`` when the arrays do not describe a matrix of ``shape``.

    Examples
    --------
    >>> densify("csr", [1.0, 2.0, 3.0], [0, 2, 1], [0, 2, 3], (2, 3))
    array([[1., 0., 2.],
           [0., 3., 0.]])
    """
    n_rows, n_cols = (int(size) for size in shape)
    major, minor = (n_rows, n_cols) if layout == "csr" else (n_cols, n_rows)
    data, indices, indptr = (np.asarray(a) for a in (data, indices, indptr))
    if (
        len(indptr) != major + 1
        or indptr[0] != 0
        or indptr[-1] != len(data)
        or len(indices) != len(data)
        or np.any(np.diff(indptr) < 0)
        or (len(indices) and (indices.min() < 0 or indices.max() >= minor))
    ):
        raise GeneTableError(f"{source}: inconsistent {layout.upper()} arrays for shape {shape}")
    dense = np.zeros((major, minor), dtype=np.float64)
    majors = np.repeat(np.arange(major), np.diff(indptr))
    np.add.at(dense, (majors, indices), data.astype(np.float64))
    return dense if layout == "csr" else dense.T.copy()


def _strings(values: np.ndarray) -> np.ndarray:
    """Decode fixed-length or variable-length byte strings to an object array of str."""
    if values.dtype.kind == "S" or (
        values.dtype.kind == "O" and len(values) and isinstance(values.flat[0], bytes)
    ):
        return np.array([v.decode("utf-8") for v in values.ravel()], dtype=object)
    return values


def _read_values(dataset) -> np.ndarray:
    import h5py

    info = h5py.check_string_dtype(dataset.dtype)
    if info is not None and dataset.dtype.kind == "O":
        return np.asarray(dataset.asstr()[()], dtype=object)
    return _strings(np.asarray(dataset[()]))


def _read_index(element, path: Path) -> list[str]:
    """The index (obs or var names) of a dataframe element, as strings."""
    import h5py

    if isinstance(element, h5py.Dataset):  # pre-0.7: compound dataset, index = first field
        first = element.dtype.names[0] if element.dtype.names else None
        if first is None:
            raise GeneTableError(f"{path}: {element.name} is not a dataframe")
        return [str(v) for v in _strings(element[first])]
    index_name = _attr(element, "_index")
    if index_name is None or index_name not in element:
        raise GeneTableError(f"{path}: {element.name} has no _index column")
    return [str(v) for v in _read_values(element[index_name])]


def _read_frame(element, path: Path) -> pd.DataFrame:
    """A whole dataframe element (all columns decoded), indexed by its index column."""
    import h5py

    index = pd.Index(_read_index(element, path), name="obs_names")
    if isinstance(element, h5py.Dataset):
        return _read_legacy_frame(element, index)
    order = element.attrs.get("column-order", [])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(order)]
    columns = {name: _read_column(element[name]) for name in names}
    return pd.DataFrame(columns, index=index)


def _read_legacy_frame(element, index: pd.Index) -> pd.DataFrame:
    """Pre-0.7 compound dataset; integer codes with ``uns/<name>_categories`` are categorical."""
    records = element[()]
    uns = element.file["uns"] if "uns" in element.file else {}
    columns = {}
    for name in records.dtype.names[1:]:
        values = _strings(records[name])
        key = f"{name}_categories"
        if key in uns and values.dtype.kind in "iu":
            categories = _read_values(uns[key])
            if np.all(values < len(categories)):  # as anndata: else the codes are not its own
                values = pd.Categorical.from_codes(values.astype(np.int64), categories)
        columns[name] = values
    return pd.DataFrame(columns, index=index)


def _read_column(element):
    """One dataframe column: plain, categorical (0.7 or current) or nullable."""
    import h5py

    if isinstance(element, h5py.Group):
        encoding = _attr(element, "encoding-type")
        if encoding == "categorical":
            return pd.Categorical.from_codes(
                element["codes"][()].astype(np.int64),
                _read_values(element["categories"]),
                ordered=bool(element.attrs.get("ordered", False)),
            )
        dtypes = {
            "nullable-integer": "Int64",
            "nullable-boolean": "boolean",
            "nullable-string-array": "string",
        }
        if encoding not in dtypes:
            raise GeneTableError(
                f"{element.file.filename}: {element.name}: unsupported column encoding {encoding!r}"
            )
        series = pd.Series(_read_values(element["values"]), dtype=dtypes[encoding])
        series[element["mask"][()].astype(bool)] = pd.NA
        return series.array
    reference = element.attrs.get("categories")
    if isinstance(reference, h5py.Reference):  # anndata 0.7
        categories = element.file[reference]
        return pd.Categorical.from_codes(
            element[()].astype(np.int64),
            _read_values(categories),
            ordered=bool(categories.attrs.get("ordered", False)),
        )
    return _read_values(element)
