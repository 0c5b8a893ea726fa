"""Feature stores: one zarr v3 group per slide holding every patch's embedding at every scale.

Layout of ``<slide>.zarr``::

    features    float32 (N, S, D)   patch x scale (finest first) x feature
    patch_id    int64 (N,)          grid cell of the patch (as in the patch store)
    centre_xy   int64 (N, 2)        level-0 centre of the patch (all scales share it)
    attrs       image_id, scales, encoders (path, sha256, backbone per scale), image_px,
                patch_store, mmdiag_version, and "complete" (written last)

Rows are in the patch store's order. The store is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from mmdiag.io.atomic import atomic_path
from mmdiag.patching.store import _jsonable, open_complete_group


def write_feature_store(
    path: str | os.PathLike,
    features: np.ndarray,
    *,
    patch_id: np.ndarray,
    centre_xy: np.ndarray,
    attrs: dict,
) -> Path:
    """Write one slide's features (N, S, D) atomically; ``attrs`` must name ``scales``."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3:
        raise ValueError(f"features must be (patches, scales, dim), got shape {features.shape}")
    if len(attrs.get("scales", ())) != features.shape[1]:
        raise ValueError(f"attrs scales {attrs.get('scales')} do not match {features.shape}")
    if len(patch_id) != len(features) or len(centre_xy) != len(features):
        raise ValueError("patch_id and centre_xy need one row per patch")
    with atomic_path(path, is_dir=True) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        rows = max(1, min(len(features), 4096))
        group.create_array("features", data=features, chunks=(rows, *features.shape[1:]))
        group.create_array("patch_id", data=np.asarray(patch_id, dtype=np.int64))
        group.create_array("centre_xy", data=np.asarray(centre_xy, dtype=np.int64).reshape(-1, 2))
        group.attrs.update(_jsonable({k: v for k, v in attrs.items() if k != "complete"}))
        group.attrs["complete"] = True
    return Path(path)


@dataclass(frozen=True)
class FeatureStore:
    """A complete feature store, read into memory (features of a slide are small)."""

    path: Path
    features: np.ndarray  # float32 (N, S, D)
    patch_id: np.ndarray
    centre_xy: np.ndarray
    attrs: dict

    @property
    def scales(self) -> list[str]:
        return list(self.attrs["scales"])

    @property
    def image_id(self) -> str:
        return self.attrs["image_id"]

    def __len__(self) -> int:
        return len(self.features)


def open_feature_store(path: str | os.PathLike) -> FeatureStore:
    """Read a feature store; ``ValueError`` naming ``path`` when missing or incomplete."""
    path = Path(path)
    group, attrs = open_complete_group(path, "feature store")
    return FeatureStore(
        path=path,
        features=np.asarray(group["features"][...]),
        patch_id=np.asarray(group["patch_id"][...]),
        centre_xy=np.asarray(group["centre_xy"][...]),
        attrs=attrs,
    )


def feature_store_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Feature stores given directly (``*.zarr``) or as folders holding them (searched);
    ``ValueError`` naming a path that is neither, or when none is found."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.suffix == ".zarr":
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("*.zarr")))
        else:
            raise ValueError(f"{path}: neither a feature store (.zarr) nor a folder of them")
    if not found:
        raise ValueError(f"no feature stores in {[str(p) for p in paths]}")
    return found
