"""Atomic file writing: outputs appear complete under their final name, or not at all.

Every stage writes through :func:`atomic_path`, so an interrupted run never leaves a
half-written file that a later stage (or Snakemake) would accept as finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

#: Files whose bytes a folder's fingerprint includes (see :func:`sha256_path`).
METADATA_SUFFIXES = frozenset({".json", ".tsv", ".yaml"})


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place on success.

    The temporary name lives in the same folder so that the final ``os.replace`` is atomic.
    On any exception the temporary file (or folder) is removed and ``final_path`` is untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    tmp_path = Path(tmp_dir) / final_path.name
    if is_dir:
        tmp_path.mkdir()
    try:
        yield tmp_path
        if is_dir and final_path.exists():
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_tsv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` as a tab-separated table without the index, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as YAML (keys in insertion order), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Checksum of an input file, or a fingerprint of an input folder (a zarr store...).

    A file's is the SHA-256 of its bytes. A folder's covers, for every file below it, its
    relative path and size, plus the bytes of its metadata documents (``*.json``, ``*.tsv``,
    ``*.yaml``): a zarr store's attributes (its inputs' checksums, the complete mark) and
    array shapes, without reading chunk data, which for a cohort's stores can be hundreds of
    gigabytes.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        if file.suffix in METADATA_SUFFIXES:
            digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def safetensors_metadata(**fields: Any) -> dict[str, str]:
    """Checkpoint metadata as one ``mmdiag`` key holding sorted JSON.

    safetensors writes several metadata keys in an arbitrary order, so the same weights
    could give different bytes; one key keeps checkpoints byte-reproducible.
    """
    return {"mmdiag": json.dumps(fields, sort_keys=True)}
