"""A torch Dataset over the pixels of one or more patch stores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmdiag.patching.store import PatchStore, open_patch_store


class StoreHandles:
    """Patch stores opened lazily, once per process: a forked data-loader worker must not use
    its parent's handles, and a pickled copy starts empty."""

    def __init__(self, paths) -> None:
        self.paths = [Path(p) for p in paths]
        self._open: dict[int, PatchStore] = {}
        self._pid: int | None = None

    def __getitem__(self, index: int) -> PatchStore:
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if index not in self._open:
            self._open[index] = open_patch_store(self.paths[index])
        return self._open[index]

    def __getstate__(self):
        return {"paths": self.paths, "_open": {}, "_pid": None}


class PatchDataset(Dataset):
    """All patches of all ``store_paths`` that hold pixels.

    An item is ``(image, store_index, patch_index)``: ``image`` is float32 in [0, 1] of shape
    (n_scales, 3, H, W), finest scale first. Stores are opened lazily and per process, so
    the dataset is safe to use with ``DataLoader(num_workers > 0)``.
    """

    def __init__(self, store_paths, *, scales=None, transform=None) -> None:
        self.store_paths = [Path(p) for p in store_paths]
        if not self.store_paths:
            raise ValueError("store_paths is empty")
        self.transform = transform
        self._stores = StoreHandles(self.store_paths)
        lengths, chosen = [], None
        for index, path in enumerate(self.store_paths):
            store = open_patch_store(path)
            available = store.pixel_scales
            wanted = list(scales) if scales is not None else available
            missing = [scale for scale in wanted if scale not in available]
            if missing or not wanted:
                raise ValueError(
                    f"patch store {path}: no pixels for scales {missing or wanted} "
                    f"(has {available})"
                )
            if chosen is not None and wanted != chosen:
                raise ValueError(f"patch store {path}: scales {wanted} differ from {chosen}")
            chosen = wanted
            lengths.append(len(store))
            del index
        self.scales: list[str] = chosen
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, item: int):
        if not -len(self) <= item < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} patches")
        item = int(item) % len(self)
        store_index = int(np.searchsorted(self._offsets, item, side="right") - 1)
        patch_index = item - int(self._offsets[store_index])
        store = self._stores[store_index]
        stack = np.stack([store.pixels(scale, patch_index) for scale in self.scales])
        image = torch.from_numpy(np.ascontiguousarray(stack)).permute(0, 3, 1, 2).float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image, store_index, patch_index
