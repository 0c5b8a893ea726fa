"""Gene sets in GMT format, and selecting a set's genes from an expression table.

A GMT file (the Broad/MSigDB gene matrix transposed format) has one set per line:
``name<TAB>description<TAB>gene<TAB>gene...``. Set names must be unique: a second line with
the same name makes it ambiguous which set a configuration means. A set's genes are a set, so
a gene repeated on one line is kept once (at its first position); empty fields (trailing
tabs) are ignored, and blank lines are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mmdiag.io.atomic import atomic_path

__all__ = ["GeneSetError", "read_gmt", "select_gene_set", "write_gmt"]

#: How many missing genes an error message lists.
LISTED_MISSING = 10


class GeneSetError(ValueError):
    """A GMT file is malformed, or a gene set does not fit an expression table."""


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file into ``{set name: [genes in file order]}`` (file order of the sets).

    Raises :class:`GeneSetError` naming the file and line for a line with fewer than three
    fields, an empty set name, a set without genes, or a repeated set name.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "sets.gmt").write_text("up\\tup genes\\tA\\tB\\tA\\t\\n")
    >>> read_gmt(folder / "sets.gmt")
    {'up': ['A', 'B']}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GMT file")
    gene_sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            name, genes = _parse_line(line, path, number)
            if name in gene_sets:
                raise GeneSetError(
                    f"{path}:{number}: gene set {name!r} repeats line {first_line[name]}"
                )
            gene_sets[name], first_line[name] = genes, number
    return gene_sets


def _parse_line(line: str, path: Path, number: int) -> tuple[str, list[str]]:
    fields = [field.strip() for field in line.rstrip("\r\n").split("\t")]
    if len(fields) < 3:
        raise GeneSetError(
            f"{path}:{number}: expected name<TAB>description<TAB>genes..., got "
            f"{len(fields)} field(s)"
        )
    name, genes = fields[0], [gene for gene in fields[2:] if gene]
    if not name:
        raise GeneSetError(f"{path}:{number}: empty gene set name")
    if not genes:
        raise GeneSetError(f"{path}:{number}: gene set {name!r} has no genes")
    return name, list(dict.fromkeys(genes))


def write_gmt(
    gene_sets: Mapping[str, Sequence[str]],
    path: str | os.PathLike,
    *,
    descriptions: Mapping[str, str] | None = None,
) -> Path:
    """Write gene sets as GMT, atomically; a set's description defaults to its name.

    Names, descriptions and genes must be non-empty and free of tabs and line breaks, so that
    :func:`read_gmt` reads back exactly what was written.
    """
    descriptions = descriptions or {}
    lines = []
    for name, genes in gene_sets.items():
        fields = [name, descriptions.get(name, name), *genes]
        if not genes or any(not f or any(c in f for c in "\t\r\n") for f in fields):
            raise GeneSetError(
                f"gene set {name!r}: needs genes, and non-empty fields without tabs or newlines"
            )
        lines.append("\t".join(fields) + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return Path(path)


def select_gene_set(
    table: pd.DataFrame,
    genes: Mapping[str, Sequence[str]] | Sequence[str],
    set_name: str,
    *,
    allow_missing: bool = False,
) -> pd.DataFrame:
    """Return the columns of ``table`` (samples x genes) that make up one gene set.

    Parameters
    ----------
    table : pandas.DataFrame
        Samples x genes, as :func:`mmdiag.genes.read_expression` returns.
    genes : mapping or sequence of str
        Either all gene sets (as :func:`read_gmt` returns), of which ``set_name`` is taken, or
        the set's own gene list.
    set_name : str
        The set's name, looked up in ``genes`` when it is a mapping; always used in errors.
    allow_missing : bool
        Drop the set's genes that the table lacks instead of raising (at least one must stay).

    Returns
    -------
    pandas.DataFrame
        The set's genes in set order.

    Raises
    ------
    GeneSetError
        Unknown set name, or genes missing from the table (the first ten and their count).
    """
    if isinstance(genes, Mapping):
        if set_name not in genes:
            raise GeneSetError(f"no gene set {set_name!r}; sets: {', '.join(map(repr, genes))}")
        genes = genes[set_name]
    if isinstance(genes, str):
        raise GeneSetError(f"gene set {set_name!r}: expected a list of genes, got a string")
    wanted = list(dict.fromkeys(genes))
    present = set(table.columns)
    missing = [gene for gene in wanted if gene not in present]
    if missing and (not allow_missing or len(missing) == len(wanted)):
        shown = ", ".join(missing[:LISTED_MISSING])
        more = ", ..." if len(missing) > LISTED_MISSING else ""
        raise GeneSetError(
            f"gene set {set_name!r}: {len(missing)} of {len(wanted)} genes are not in the "
            f"table: {shown}{more}"
        )
    return table[[gene for gene in wanted if gene in present]]
