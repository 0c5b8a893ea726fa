"""Raw patch pixels of one scale from many patch stores, decoded in data-loader workers.

Workers only read and decompress (zstd chunks of one patch each) and hand over uint8 batches;
conversion to float and every augmentation happen on the training device
(:mod:`mmdiag.ssl.augment`). Batches are fetched store by store with one orthogonal selection
each, so zarr decodes a batch's chunks together.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmdiag.patching.dataset import StoreHandles
from mmdiag.patching.store import open_patch_store
from mmdiag.training.distributed import DistContext, global_batches, rank_share


class ScalePixels(Dataset):
    """Every patch at ``scale`` of ``store_paths``; ``dataset[[i, j]]`` is a uint8 batch."""

    def __init__(self, store_paths: Sequence[str | os.PathLike], scale: str) -> None:
        self.store_paths = [Path(p) for p in store_paths]
        if not self.store_paths:
            raise ValueError("no patch stores given")
        self.scale = scale
        lengths, shapes = [], set()
        for path in self.store_paths:
            store = open_patch_store(path)
            if f"pixels_{scale}" not in store.group:
                raise ValueError(
                    f"patch store {path}: no pixels at scale {scale!r} (has "
                    f"{store.pixel_scales}); set patching.save_pixels: true"
                )
            lengths.append(len(store))
            if len(store):
                shapes.add(store.group[f"pixels_{scale}"].shape[1:])
        if len(shapes) > 1:
            raise ValueError(f"patch stores disagree on the {scale} patch shape: {sorted(shapes)}")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise ValueError(f"the {len(self.store_paths)} patch stores hold no patches")
        self.patch_shape = shapes.pop()  # (H, W, 3)
        self._stores = StoreHandles(self.store_paths)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(store index, patch index within the store) of global item numbers."""
        stores = np.searchsorted(self.offsets, items, side="right") - 1
        return stores, items - self.offsets[stores]

    def __getitems__(self, items: Sequence[int]) -> dict[str, torch.Tensor]:
        items = np.asarray(items, dtype=np.int64)
        if len(items) and (items.min() < 0 or items.max() >= len(self)):
            raise IndexError(f"patch numbers out of range 0..{len(self) - 1}")
        pixels = np.empty((len(items), *self.patch_shape), dtype=np.uint8)
        stores, patches = self.locate(items)
        for store_index in np.unique(stores):
            rows = np.flatnonzero(stores == store_index)
            pixels[rows] = self._stores[int(store_index)].pixels(self.scale, patches[rows])
        return {
            "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2),  # uint8 (B, 3, H, W)
            "item": torch.from_numpy(items),
        }

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([item])
        return {"pixels": batch["pixels"][0], "item": batch["item"][0]}


class EpochBatches(Sampler[list[int]]):
    """This rank's share of each global batch of an epoch (:func:`global_batches`).

    The permutation is seeded by ``(seed, epoch)``, so an epoch's batches are the same
    whatever the number of processes and whether the run was resumed. Call :meth:`set_epoch`
    before iterating.
    """

    def __init__(self, n_items: int, batch_size: int, context: DistContext, seed: int) -> None:
        if batch_size > n_items:
            raise ValueError(
                f"batch size {batch_size} (ssl.batch_size) exceeds the {n_items} patches of "
                "the cohort: lower ssl.batch_size or patch more tissue"
            )
        self.n_items, self.batch_size, self.context, self.seed = n_items, batch_size, context, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return global_batches(self.n_items, self.batch_size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield rank_share(batch, self.context).tolist()

    def __len__(self) -> int:
        return self.n_items // self.batch_size


def pixel_loader(
    dataset: Dataset, batch_sampler: Sampler, *, workers: int, pin_memory: bool
) -> DataLoader:
    """A loader whose workers decode whole batches (``__getitems__``) ahead of the trainer."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=_identity,
    )


def _identity(batch):
    """``__getitems__`` already returns the batch."""
    return batch
