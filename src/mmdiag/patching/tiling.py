"""Concentric multi-scale patch grids over tissue, and fixed-size patch samplers.

A base patch of ``patch_px`` pixels at ``base_mpp`` (0.5 µm/px, i.e. 20x) lies on a
non-overlapping grid over level 0. Each kept base patch has context patches that share its
centre and cover ``factor`` times its side (2 -> 10x, 4 -> 5x once resized to ``patch_px``),
as in multi-scale (concentric) patch extraction. Every coordinate in a grid is an integer
in level-0 pixels; context squares may extend beyond the slide (reading pads them white).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmdiag.patching.slide import SlideError, SlideInfo, magnification_from_mpp


def scale_name(mpp: float) -> str:
    """Magnification label of ``mpp`` µm/px: 0.5 -> ``"20x"``, 2.0 -> ``"5x"``, 4 -> ``"2.5x"``."""
    return f"{magnification_from_mpp(mpp):g}x"


def grid_scales(grid: pd.DataFrame) -> list[str]:
    """The scale labels of a grid, finest first (from its ``size_<scale>`` columns)."""
    names = [column[len("size_") :] for column in grid.columns if column.startswith("size_")]
    return sorted(names, key=lambda name: grid[f"size_{name}"].iloc[0] if len(grid) else 0)


def base_patch_level0_px(info: SlideInfo, base_mpp: float, patch_px: int) -> int:
    """Level-0 side of a base patch, rounded to an even number so context centres are exact."""
    return max(2, 2 * int(round(patch_px * base_mpp / info.mpp / 2)))


def concentric_grid(
    info: SlideInfo,
    mask: np.ndarray,
    mask_mpp: float,
    *,
    base_mpp: float = 0.5,
    patch_px: int = 256,
    context_factors: tuple[int, ...] = (2, 4),
    min_tissue: float = 0.5,
) -> pd.DataFrame:
    """Return the tissue patches of a slide with their concentric context squares.

    Parameters
    ----------
    info
        The slide (level-0 size and µm/px).
    mask
        Boolean tissue mask of the whole slide at ``mask_mpp`` µm/px (e.g. of the thumbnail).
    base_mpp, patch_px
        Resolution and pixel size of the base patches.
    context_factors
        Integer side multiples of the context squares (same centre as the base patch).
    min_tissue
        Keep a base patch when the tissue fraction of its footprint in ``mask`` is at least
        this.

    Returns
    -------
    DataFrame with ``patch_id, x_<s>, y_<s>, size_<s>`` for every scale ``s`` (finest first),
    ``centre_x, centre_y, tissue_fraction``; ``x, y`` are top-left corners in level-0 pixels.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    if not mask_mpp > 0 or not base_mpp > 0:
        raise ValueError(f"mask_mpp and base_mpp must be > 0, got {mask_mpp!r}, {base_mpp!r}")
    if int(patch_px) != patch_px or patch_px < 1:
        raise ValueError(f"patch_px must be a positive integer, got {patch_px!r}")
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue!r}")
    factors = tuple(int(f) for f in context_factors)
    if any(f < 2 or f != g for f, g in zip(factors, context_factors, strict=True)):
        raise ValueError(f"context_factors must be integers >= 2, got {context_factors!r}")

    size = base_patch_level0_px(info, base_mpp, patch_px)
    width0, height0 = info.level_dimensions[0]
    n_cols, n_rows = width0 // size, height0 // size
    columns = _empty_columns(base_mpp, factors)
    if n_cols == 0 or n_rows == 0:
        raise SlideError(f"slide {info.path}: no tissue found (slide smaller than one patch)")

    # Tissue fraction per grid cell from the mask's integral image.
    mask_per_level0 = info.mpp / mask_mpp
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    cols, rows = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
    x0 = (cols * size).ravel()
    y0 = (rows * size).ravel()
    mx0 = np.clip(np.floor(x0 * mask_per_level0).astype(np.int64), 0, mask.shape[1] - 1)
    my0 = np.clip(np.floor(y0 * mask_per_level0).astype(np.int64), 0, mask.shape[0] - 1)
    mx1 = np.clip(np.ceil((x0 + size) * mask_per_level0).astype(np.int64), mx0 + 1, mask.shape[1])
    my1 = np.clip(np.ceil((y0 + size) * mask_per_level0).astype(np.int64), my0 + 1, mask.shape[0])
    tissue_px = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
    fraction = tissue_px / ((mx1 - mx0) * (my1 - my0))
    keep = fraction >= min_tissue if min_tissue > 0 else np.ones_like(fraction, bool)
    keep &= fraction > 0
    if not keep.any():
        raise SlideError(
            f"slide {info.path}: no tissue found (no {patch_px}-px patch at {base_mpp} µm/px "
            f"has tissue fraction >= {min_tissue})"
        )

    x0, y0 = x0[keep], y0[keep]
    centre_x, centre_y = x0 + size // 2, y0 + size // 2
    data = {"patch_id": (rows.ravel() * n_cols + cols.ravel())[keep].astype(np.int64)}
    for factor, name in zip((1, *factors), columns, strict=True):
        side = size * factor
        data[f"x_{name}"] = (centre_x - side // 2).astype(np.int64)
        data[f"y_{name}"] = (centre_y - side // 2).astype(np.int64)
        data[f"size_{name}"] = np.full(len(x0), side, np.int64)
    data["centre_x"] = centre_x.astype(np.int64)
    data["centre_y"] = centre_y.astype(np.int64)
    data["tissue_fraction"] = fraction[keep].astype(np.float64)
    grid = pd.DataFrame(data)
    grid.attrs.update(
        {"slide": str(info.path), "mpp": info.mpp, "base_mpp": base_mpp, "patch_px": patch_px}
    )
    grid.attrs["scales"] = list(columns)
    return grid


def _empty_columns(base_mpp: float, factors: tuple[int, ...]) -> list[str]:
    names = [scale_name(base_mpp * factor) for factor in (1, *factors)]
    if len(set(names)) != len(names):
        raise ValueError(f"context_factors give duplicate scales: {names}")
    return names


def _check_n(grid: pd.DataFrame, n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if len(grid) == 0:
        raise ValueError("grid is empty: nothing to sample")


def sample_fixed(grid: pd.DataFrame, n: int, *, seed: int, mode: str = "random") -> pd.DataFrame:
    """Return exactly ``n`` rows of ``grid`` (e.g. 2 500 patches per slide).

    ``mode="random"``: ``n`` distinct rows drawn with ``seed``; a slide with fewer rows
    gives all of them once, then rows drawn with replacement to fill up.
    ``mode="uniform"``: rows evenly spaced through the grid's order; fewer rows are cycled.
    """
    _check_n(grid, n)
    count = len(grid)
    if mode == "random":
        rng = np.random.default_rng(seed)
        if count >= n:
            index = rng.choice(count, size=n, replace=False)
        else:
            extra = rng.choice(count, size=n - count, replace=True)
            index = np.concatenate([rng.permutation(count), extra])
    elif mode == "uniform":
        if count >= n:
            index = np.floor(np.arange(n) * count / n).astype(np.int64)
        else:
            index = np.arange(n) % count
    else:
        raise ValueError(f"mode must be 'random' or 'uniform', got {mode!r}")
    return grid.iloc[index].reset_index(drop=True)


def ordered_sequence(grid: pd.DataFrame, n: int = 24) -> pd.DataFrame:
    """Return ``n`` tissue patches in reading order (row-major by centre), evenly spaced.

    With fewer than ``n`` patches, all are returned in order and the last is repeated.
    """
    _check_n(grid, n)
    ordered = grid.sort_values(["centre_y", "centre_x"], kind="stable").reset_index(drop=True)
    count = len(ordered)
    if count >= n:
        index = np.rint(np.linspace(0, count - 1, n)).astype(np.int64)
    else:
        index = np.minimum(np.arange(n), count - 1)
    return ordered.iloc[index].reset_index(drop=True)
