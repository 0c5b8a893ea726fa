"""Small synthetic patch stores and settings shared by the SimSiam and feature tests.

Patches are textures a self-supervised encoder can tell apart: stripes (two frequencies, any
angle) or spots, in one of a few stain-like colours, with pixel noise.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmdiag.patching.store import write_patch_store
from mmdiag.ssl.train import SSLSettings

PATCH_PX = 32
COLOURS = np.array([[170, 60, 150], [90, 60, 170], [210, 150, 170], [120, 40, 60]], float)


def textured_pixels(n: int, seed: int, px: int = PATCH_PX) -> np.ndarray:
    """``n`` uint8 (px, px, 3) textures: half stripes, half spots, random colour and phase."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px].astype(float)
    images = np.empty((n, px, px, 3), dtype=np.uint8)
    for i in range(n):
        if i % 2:
            angle = rng.uniform(0, np.pi)
            frequency = rng.choice([0.25, 0.8])
            phase = rng.uniform(0, 2 * np.pi)
            wave = 0.5 + 0.5 * np.sin(frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        else:
            wave = np.zeros((px, px))
            for cx, cy in rng.uniform(0, px, (rng.integers(2, 6), 2)):
                wave += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rng.uniform(1.5, 4) ** 2))
            wave = wave.clip(0, 1)
        colour = COLOURS[rng.integers(len(COLOURS))]
        image = 235 - wave[..., None] * (235 - colour) + rng.normal(0, 6, (px, px, 3))
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images


def patch_grid(n: int, px: int = PATCH_PX, scales=("20x", "10x")) -> pd.DataFrame:
    """A row of ``n`` patches, each scale twice the size of the previous, same centres."""
    columns = {}
    for level, scale in enumerate(scales):
        size = px * 2**level
        columns[f"x_{scale}"] = np.arange(n) * px + px // 2 - size // 2
        columns[f"y_{scale}"] = np.full(n, px // 2 - size // 2)
        columns[f"size_{scale}"] = np.full(n, size)
    columns["tissue_fraction"] = np.ones(n)
    columns["patch_id"] = np.arange(n) * 3 + 7  # not the row number, to catch mix-ups
    return pd.DataFrame(columns)


def write_textured_store(
    path: str | Path,
    n: int,
    seed: int,
    *,
    px: int = PATCH_PX,
    scales=("20x", "10x"),
    with_pixels: bool = True,
) -> Path:
    """A complete patch store of ``n`` textured patches with pixels at every scale."""
    pixels = None
    if with_pixels:
        pixels = {scale: textured_pixels(n, seed * 10 + k, px) for k, scale in enumerate(scales)}
    return write_patch_store(
        path, patch_grid(n, px, scales), attrs={"slide": f"synthetic-{seed}"}, pixels=pixels
    )


def tiny_settings(**overrides) -> SSLSettings:
    """SimSiam on a tiny timm ResNet at 32 px on the CPU: about 0.2 s per 80-patch epoch."""
    values = dict(
        backbone="test_resnet",
        image_px=PATCH_PX,
        dim=64,
        predictor_dim=16,
        epochs=3,
        batch_size=16,
        base_lr=0.2,
        workers=0,
        device="cpu",
        channels_last=False,
        amp=False,
    )
    return SSLSettings(**{**values, **overrides})


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op threads: on a busy two-core machine, two threads that wait for
    each other make small CPU models up to ten times slower and their timings erratic."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
