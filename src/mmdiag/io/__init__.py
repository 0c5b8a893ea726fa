"""File input and output shared by every stage: atomic writes, checksums, tables."""

from mmdiag.io.atomic import (
    atomic_path,
    safetensors_metadata,
    sha256_file,
    write_json,
    write_tsv,
    write_yaml,
)

__all__ = [
    "atomic_path",
    "safetensors_metadata",
    "sha256_file",
    "write_json",
    "write_tsv",
    "write_yaml",
]
