"""Reading the pipeline's tab-separated tables, the same way everywhere.

Identifier columns (``patient_id``, ``image_id`` ...) are read as strings, so that an id such
as ``007`` stays ``007`` whichever stage reads it; floats are parsed back to the exact doubles
that were written (pandas >= 3).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

#: Columns that hold identifiers: always strings, never numbers.
ID_COLUMNS = ("patient_id", "image_id", "slide_id", "case_id", "method", "variant")


def read_tsv(path: str | os.PathLike, *, all_strings: bool = False) -> pd.DataFrame:
    """Read a TSV written by the pipeline (or a user's table in the same form).

    ``all_strings`` reads every column as text with empty cells as ``""`` (user-supplied
    tables that are validated column by column afterwards). Raises ``FileNotFoundError`` or
    ``ValueError`` naming the file when it is missing or not a readable table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table")
    options = (
        {"dtype": str, "keep_default_na": False}
        if all_strings
        else {"dtype": {column: str for column in ID_COLUMNS}}
    )
    try:
        return pd.read_csv(path, sep="\t", **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable tab-separated table ({error})") from error
