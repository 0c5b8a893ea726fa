"""Atomic file writing: outputs appear complete under their final name, or not at all.

Every stage writes through :func:`atomic_path`, so an interrupted run never leaves a
half-written file that a later stage (or Snakemake) would accept as finished. A run terminated
with ``SIGTERM`` removes its temporary itself; one killed outright leaves it behind, and the
next write of the same output removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
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

    The temporary lives in a folder ``.NAME.XXXXXXXX.tmp`` in the same folder as
    ``final_path``, so that the final ``os.replace`` is atomic. On any exception the temporary
    file (or folder) is removed and ``final_path`` is untouched; ``SIGTERM`` during the write
    becomes such an exception (:func:`exit_cleanly_on_sigterm`).

    Temporaries of the same output left by a killed run (``SIGKILL``, a lost node) are
    removed first. That is safe because one output has one writer at a time: Snakemake locks
    every output of a running job (``.snakemake/locks``), so no other job writes it; do not run
    two commands writing the same output by hand at once.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    tmp_path = Path(tmp_dir) / final_path.name
    if is_dir:
        tmp_path.mkdir()
    try:
        with exit_cleanly_on_sigterm():
            yield tmp_path
            if is_dir and final_path.exists():
                shutil.rmtree(final_path)
            os.replace(tmp_path, final_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_stale_temporaries(final_path: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.XXXXXXXX.tmp`` folders :func:`atomic_path` made for ``final_path``.

    Only folders of exactly that name pattern go (the random part holds no dot), so the
    temporaries of ``x.zarr.bak`` are not those of ``x.zarr``. Returns the folders removed.
    """
    final_path = Path(final_path)
    pattern = re.compile(rf"\.{re.escape(final_path.name)}\.[A-Za-z0-9_]+\.tmp")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(final_path.parent):
            if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def exit_cleanly_on_sigterm() -> Iterator[None]:
    """While active, ``SIGTERM`` raises ``SystemExit(143)`` in the main thread.

    By default ``SIGTERM`` (how Snakemake, SLURM and ``kill`` stop a job) ends Python at once,
    skipping ``finally`` blocks: temporaries stay and worker processes are not stopped. As an
    exception, the clean-up runs and the exit status is still 128 + 15. Only the default
    handler is replaced (a handler someone else installed is kept), only in the main thread
    (the only one Python delivers signals to), and the previous handler is restored on exit.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_system_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


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
