"""Patch stores: one zarr v3 group per slide holding patch coordinates and, optionally, pixels.

Layout of ``<slide>.zarr``::

    coords_<scale>    int64 (N, 3)          x, y, size in level-0 pixels, one per scale
    tissue_fraction   float64 (N,)
    patch_id          int64 (N,)            grid cell index (row * n_cols + col)
    pixels_<scale>    uint8 (N, S, S, 3)    optional; one patch per chunk, zstd-compressed
    attrs             provenance (slide, sha256, mpp, parameters, version) and "complete"

The store is built under a temporary name beside its final path and renamed into place, and
``attrs["complete"]`` is written last, so a store without it is never read. A run stopped with
``SIGTERM`` removes its temporary; one killed outright leaves it, and the next write of the same
store removes it (:func:`~mmdiag.io.atomic.atomic_path`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from mmdiag.io.atomic import atomic_path
from mmdiag.patching.tiling import grid_scales


def _jsonable(value):
    """Attrs must be JSON: paths become strings, numpy scalars Python numbers."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"attrs value of type {type(value).__name__} is not JSON-serialisable")


def _mark_complete(group: zarr.Group) -> None:
    group.attrs["complete"] = True


def write_patch_store(
    path: str | os.PathLike,
    grid: pd.DataFrame,
    *,
    attrs: dict,
    pixels: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a patch store for one slide at ``path`` (a ``.zarr`` folder), atomically.

    Parameters
    ----------
    grid
        A :func:`~mmdiag.patching.tiling.concentric_grid` table (or rows sampled from it).
    attrs
        Provenance stored in the group's attributes: slide path, sha256, mpp, mpp_source,
        magnifications, patch_px, every parameter, mmdiag version. ``complete`` is added.
    pixels
        Optional ``{scale: uint8 (N, S, S, 3)}``, rows aligned with ``grid``.

    Side effects: replaces ``path``; nothing appears there unless the write completes.
    """
    scales = grid_scales(grid)
    if not scales:
        raise ValueError("grid has no size_<scale> columns")
    attrs = _jsonable(dict(attrs))
    attrs.pop("complete", None)
    pixels = dict(pixels or {})
    for scale, array in pixels.items():
        if scale not in scales:
            raise ValueError(f"pixels scale {scale!r} is not in the grid's scales {scales}")
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
            raise ValueError(f"pixels[{scale!r}] must be uint8 (N, S, S, 3), got {array.shape}")
        if array.shape[0] != len(grid):
            raise ValueError(f"pixels[{scale!r}] has {array.shape[0]} rows, grid has {len(grid)}")
    with atomic_path(path, is_dir=True) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        for scale in scales:
            coords = grid[[f"x_{scale}", f"y_{scale}", f"size_{scale}"]].to_numpy(np.int64)
            group.create_array(f"coords_{scale}", data=coords)
        group.create_array("tissue_fraction", data=grid["tissue_fraction"].to_numpy(np.float64))
        group.create_array("patch_id", data=grid["patch_id"].to_numpy(np.int64))
        for scale, array in pixels.items():
            n, height, width, _ = array.shape
            stored = group.create_array(
                f"pixels_{scale}",
                shape=array.shape,
                dtype=np.uint8,
                chunks=(1, height, width, 3),
                compressors=zarr.codecs.ZstdCodec(level=3),
            )
            if n:
                stored[...] = array
        group.attrs.update({**attrs, "scales": scales, "pixel_scales": sorted(pixels)})
        _mark_complete(group)
    return Path(path)


@dataclass
class PatchStore:
    """A complete patch store opened for reading."""

    path: Path
    group: zarr.Group
    attrs: dict
    scales: list[str]
    grid: pd.DataFrame = field(repr=False)

    @property
    def pixel_scales(self) -> list[str]:
        return [scale for scale in self.scales if f"pixels_{scale}" in self.group]

    def pixels(self, scale: str, index) -> np.ndarray:
        """The uint8 pixels of patch(es) ``index`` (an int, slice or array) at ``scale``."""
        name = f"pixels_{scale}"
        if name not in self.group:
            raise KeyError(f"store {self.path} has no pixels for scale {scale!r}")
        array = self.group[name]
        if isinstance(index, (int, np.integer, slice)):
            return np.asarray(array[index])
        return np.asarray(array.get_orthogonal_selection((np.asarray(index),)))

    def __len__(self) -> int:
        return len(self.grid)


def open_complete_group(path: Path, kind: str) -> tuple[zarr.Group, dict]:
    """Open a zarr group written with a ``complete`` mark, and its attributes.

    Raises ``ValueError`` naming the ``kind`` of store and ``path`` when it is missing, not a
    zarr group, or was never finished.
    """
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception as error:  # missing folder or not a zarr group
        raise ValueError(f"{kind} {path}: cannot open ({error})") from error
    attrs = dict(group.attrs)
    if attrs.get("complete") is not True:
        raise ValueError(f"{kind} {path}: incomplete (no 'complete' attribute); rebuild it")
    return group, attrs


def open_patch_store(path: str | os.PathLike) -> PatchStore:
    """Open a patch store; raises ``ValueError`` naming ``path`` unless it is complete."""
    path = Path(path)
    group, attrs = open_complete_group(path, "patch store")
    scales = list(attrs["scales"])
    data = {"patch_id": np.asarray(group["patch_id"][...])}
    for scale in scales:
        coords = np.asarray(group[f"coords_{scale}"][...])
        data[f"x_{scale}"], data[f"y_{scale}"], data[f"size_{scale}"] = coords.T
    base = scales[0]
    data["centre_x"] = data[f"x_{base}"] + data[f"size_{base}"] // 2
    data["centre_y"] = data[f"y_{base}"] + data[f"size_{base}"] // 2
    data["tissue_fraction"] = np.asarray(group["tissue_fraction"][...])
    return PatchStore(path=path, group=group, attrs=attrs, scales=scales, grid=pd.DataFrame(data))


def patch_index_table(store_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """One row per patch store of a cohort: slide, patch count and µm/px (each checked
    complete; ``ValueError`` naming a store that is not)."""
    rows = []
    for path in store_paths:
        store = open_patch_store(path)
        rows.append(
            {
                "store": str(path),
                "slide_path": store.attrs["slide_path"],
                "n_patches": len(store.grid),
                "mpp": store.attrs["mpp"],
                "mpp_source": store.attrs["mpp_source"],
            }
        )
    return pd.DataFrame(rows, columns=["store", "slide_path", "n_patches", "mpp", "mpp_source"])
