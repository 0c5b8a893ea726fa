"""File input and output shared by every stage: atomic writes, checksums, tables."""

from mmdiag.io.atomic import (
    atomic_path,
    safetensors_metadata,
    sha256_file,
    sha256_path,
    write_json,
    write_tsv,
    write_yaml,
)
from mmdiag.io.tables import ID_COLUMNS, read_tsv

__all__ = [
    "ID_COLUMNS",
    "atomic_path",
    "read_tsv",
    "safetensors_metadata",
    "sha256_file",
    "sha256_path",
    "write_json",
    "write_tsv",
    "write_yaml",
]
