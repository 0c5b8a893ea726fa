"""Embed every patch of a slide at every scale with that scale's pretrained encoder.

Batched inference in eval mode; on a GPU with pinned memory, non-blocking copies, bfloat16
autocast and channels-last, while data-loader workers decode the next batches. The input of an
encoder is the whole patch (resized to ``image_px`` when set), scaled to [0, 1] and normalised
with the pretraining mean/std -- the same pixels the SimSiam views were cut from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import BatchSampler, SequentialSampler

import mmdiag
from mmdiag.data.manifest import read_manifest
from mmdiag.features.store import write_feature_store
from mmdiag.io.atomic import atomic_path, sha256_file
from mmdiag.models.encoders import create_encoder
from mmdiag.patching.store import open_patch_store
from mmdiag.ssl.augment import AugmentSettings, normalize
from mmdiag.ssl.data import ScalePixels, pixel_loader
from mmdiag.training.loop import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSettings:
    """``features`` section of the config (the encoder name and normalisation come from ssl)."""

    backbone: str
    image_px: int | None = None
    batch_size: int = 256
    workers: int = 4
    amp: bool = True
    channels_last: bool = True
    device: str = "auto"
    mean: tuple[float, float, float] = AugmentSettings.mean
    std: tuple[float, float, float] = AugmentSettings.std

    @classmethod
    def from_config(cls, features: Mapping, ssl: Mapping) -> ExtractSettings:
        """From the ``features`` section; the encoder and its normalisation from ``ssl``."""
        fields = ("image_px", "batch_size", "workers", "amp", "channels_last", "device")
        return cls(
            backbone=ssl["backbone"],
            mean=tuple(ssl["augment"]["mean"]),
            std=tuple(ssl["augment"]["std"]),
            **{name: features[name] for name in fields},
        )


def slide_ids_of_stores(store_paths: Sequence[str | Path], manifest_path: Path) -> list[str]:
    """The manifest ``image_id`` of each patch store's slide (matched by resolved path).

    ``ValueError`` naming the store whose slide the manifest lacks, or the slides that
    several stores belong to.
    """
    manifest = read_manifest(manifest_path)
    image_of_path = {
        str(Path(p).resolve()): i
        for p, i in zip(manifest["path"], manifest["image_id"], strict=True)
    }
    image_ids = []
    for store in store_paths:
        try:
            slide = open_patch_store(store).attrs["slide_path"]
        except (ValueError, KeyError) as error:
            raise ValueError(f"patch store {store}: {error}") from error
        if slide not in image_of_path:
            raise ValueError(f"patch store {store}: its slide {slide} is not in {manifest_path}")
        image_ids.append(image_of_path[slide])
    duplicated = sorted({i for i in image_ids if image_ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"several patch stores belong to the slide(s) {duplicated}")
    return image_ids


def load_encoder(
    backbone: str, weights: str | Path, device: torch.device, settings: ExtractSettings
) -> nn.Module:
    """A timm backbone with pretrained weights from a local file, in eval mode on ``device``."""
    encoder = create_encoder(backbone, checkpoint=weights).eval().to(device)
    if settings.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder


def prepare(pixels: torch.Tensor, settings: ExtractSettings) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the normalised float batch an encoder sees."""
    images = pixels.float().div_(255.0)
    if settings.image_px and settings.image_px != images.shape[-1]:
        size = (settings.image_px, settings.image_px)
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
    images = normalize(images, AugmentSettings(mean=settings.mean, std=settings.std))
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def embed_scale(
    store_path: Path,
    scale: str,
    encoder: nn.Module,
    settings: ExtractSettings,
    device: torch.device,
    on_batch=None,
) -> np.ndarray:
    """Features (N, D) float32 of every patch of one store at one scale, in store order."""
    dataset = ScalePixels([store_path], scale)
    batches = BatchSampler(SequentialSampler(range(len(dataset))), settings.batch_size, False)
    loader = pixel_loader(
        dataset, batches, workers=settings.workers, pin_memory=device.type == "cuda"
    )
    use_amp = settings.amp and device.type == "cuda"
    outputs = []
    for batch in loader:
        images = prepare(batch["pixels"].to(device, non_blocking=True), settings)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            features = encoder(images)
        outputs.append(features.float().cpu())
        if on_batch is not None:
            on_batch(len(images))
    return torch.cat(outputs).numpy()


def extract_cohort_features(
    store_paths: Sequence[str | Path],
    image_ids: Sequence[str],
    encoder_weights: Mapping[str, str | Path],
    settings: ExtractSettings,
    *,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, float]:
    """Write ``out_dir/<image_id>.zarr`` for every patch store; return throughput figures.

    ``encoder_weights`` maps each scale of the patch stores (finest first) to the
    ``encoder.safetensors`` that SimSiam pretraining wrote for it. The encoders are loaded
    once for the whole cohort; ``out_dir`` appears complete or not at all.
    """
    device = resolve_device(settings.device)
    stores = [open_patch_store(path) for path in store_paths]
    scales = stores[0].scales if stores else []
    for store in stores:
        missing = [scale for scale in store.scales if scale not in encoder_weights]
        if missing:
            raise ValueError(f"patch store {store.path}: no encoder for scale(s) {missing}")
        if store.scales != scales:
            raise ValueError(f"patch store {store.path}: scales {store.scales} != {scales}")
    encoders = {
        scale: load_encoder(settings.backbone, encoder_weights[scale], device, settings)
        for scale in scales
    }
    provenance = _encoder_provenance(encoder_weights, scales, settings)
    total = sum(len(store) for store in stores) * len(scales)
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with (
        atomic_path(out_dir, is_dir=True) as tmp,
        Progress(*columns, TimeElapsedColumn(), disable=not progress) as bar,
    ):
        task = bar.add_task("features", total=total)
        for store, image_id in zip(stores, image_ids, strict=True):
            features = embed_store(
                store, encoders, settings, device, on_batch=lambda n: bar.advance(task, n)
            )
            write_feature_store(
                tmp / f"{image_id}.zarr",
                features,
                patch_id=store.grid["patch_id"].to_numpy(),
                centre_xy=store.grid[["centre_x", "centre_y"]].to_numpy(),
                attrs={
                    "image_id": image_id,
                    "scales": scales,
                    "patch_store": str(store.path),
                    "slide_sha256": store.attrs.get("sha256"),
                    **provenance,
                },
            )
    seconds = time.perf_counter() - started
    rate = total / seconds if seconds else float("nan")
    log.info(
        "%d slides, %d patch-scales embedded in %.1f s (%.0f patches/s)",
        len(stores),
        total,
        seconds,
        rate,
    )
    return {"patches": total, "seconds": seconds, "patches_per_s": rate}


def embed_store(store, encoders: Mapping[str, nn.Module], settings, device, on_batch=None):
    """Features (N, S, D) of one patch store with each scale's encoder."""
    if len(store) == 0:
        width = next(iter(encoders.values())).num_features
        return np.zeros((0, len(encoders), width), dtype=np.float32)
    columns = [
        embed_scale(store.path, scale, encoder, settings, device, on_batch=on_batch)
        for scale, encoder in encoders.items()
    ]
    return np.stack(columns, axis=1)


def _encoder_provenance(encoder_weights, scales, settings) -> dict:
    return {
        "encoders": {
            scale: {
                "path": str(encoder_weights[scale]),
                "sha256": sha256_file(encoder_weights[scale]),
            }
            for scale in scales
        },
        "backbone": settings.backbone,
        "image_px": settings.image_px,
        "mmdiag_version": mmdiag.__version__,
    }
