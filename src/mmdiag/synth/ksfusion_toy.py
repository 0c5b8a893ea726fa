"""A feature-level toy for KS-Fusion: patch-feature grids and gene profiles with planted programs.

The toy stands in for the glioma cohort of :mod:`mmdiag.synth.glioma` one level up, where
slides are already patch features, so that models can be tested in seconds. Per sample it
draws the same latents: the tumour program ``T`` and the TME program ``E`` (the class of
:data:`mmdiag.synth.glioma.CLASSES` fixes whether each is high or low, as
:data:`~mmdiag.synth.glioma.CLASS_PROGRAMS` says; classes are balanced round-robin) and a
grid-only necrosis factor ``W``; the labels follow them as in the cohort (diagnosis from
``(T, E)``, grade from ``T`` cut at :data:`~mmdiag.synth.glioma.GRADE_CUTS`, survival from
``T`` and ``W``).

- **Grid** ``(H, W, D)`` of patch features (the weaker view): the grid shows ``T`` and ``E``
  plus ``N(0, grid_noise)``. A rectangular **tumour region** of cells, covering the fraction
  :data:`TUMOUR_CELL_RANGE` of the grid (growing with the shown ``T``) at a random place,
  adds ``TUMOUR_STRENGTH`` times the tumour direction; **immune cells** (a fraction
  :data:`IMMUNE_CELL_RANGE` of the cells outside the tumour region, growing with the shown
  ``E``) add the immune direction; **necrotic cells** (the fraction ``NECROSIS_CELL_MAX *
  W``) add the necrosis direction; every occupied cell carries ``N(0, cell_noise)`` on each
  feature. The directions are orthonormal, drawn once per seed. ``empty_fraction`` of the
  cells are empty (mask 0, features 0), at random places.
- **Genes** (the stronger view): the ``tumour`` group (a quarter of the genes) shifts by
  ``gene_signal * loading * T``, the ``microenvironment`` group (half of them) by
  ``gene_signal * loading * E``, every gene carries ``N(0, gene_noise)``; loadings as in the
  cohort (size uniform on :data:`~mmdiag.synth.glioma.LOADING_RANGE`, some negative).

The patch-set view lists each sample's occupied cells in raster order with their ``(row,
column)`` coordinates; with a fixed number of empty cells per sample every sample has the
same number of patches, so the set view is one array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmdiag.synth import glioma
from mmdiag.synth._draw import stream_rng

__all__ = ["TASKS", "make_ksfusion_toy"]

#: The tasks whose label becomes ``y``.
TASKS = ("diagnosis", "grading", "survival")
#: Fraction of the grid the tumour region covers at a shown ``T`` of 0 and of 1.
TUMOUR_CELL_RANGE = (0.08, 0.45)
#: Fraction of the cells outside the tumour region that are immune at ``E`` of 0 and of 1.
IMMUNE_CELL_RANGE = (0.03, 0.45)
#: Fraction of the cells that are necrotic at ``W = 1``.
NECROSIS_CELL_MAX = 0.25
#: Length of the tumour, immune and necrosis directions added to a cell.
TUMOUR_STRENGTH, IMMUNE_STRENGTH, NECROSIS_STRENGTH = 1.5, 1.5, 1.0
_DESIGN, _LATENT, _GRID, _GENES, _ASSIGNMENT = range(5)


def _program(rng: np.random.Generator, level: str) -> float:
    return float(rng.uniform(*(glioma.HIGH_RANGE if level == "high" else glioma.LOW_RANGE)))


def make_ksfusion_toy(
    n_samples: int,
    *,
    grid: tuple[int, int] = (8, 8),
    feature_dim: int = 16,
    n_genes: int = 60,
    task: str = "diagnosis",
    seed: int = 0,
    grid_noise: float = 0.25,
    cell_noise: float = 1.0,
    gene_signal: float = 2.0,
    gene_noise: float = 0.5,
    grade_noise: float = 0.05,
    empty_fraction: float = 0.1,
) -> dict[str, Any]:
    """Draw ``n_samples`` toy samples; the same arguments give the same arrays.

    Parameters
    ----------
    n_samples
        Samples, at least one per class of :data:`mmdiag.synth.glioma.CLASSES`.
    grid, feature_dim
        Grid rows and columns ``(H, W)`` and the patch-feature dimension ``D`` (>= 4).
    n_genes
        Genes (>= 4): the first group of ``n_genes // 4`` is ``tumour``, the next
        ``n_genes // 2`` ``microenvironment`` (at random positions), the rest background.
    task
        One of :data:`TASKS`: what ``y`` holds.
    seed
        Seed of every draw.
    grid_noise, cell_noise
        Noise on the ``T`` and ``E`` the grid shows, and per-feature noise of a cell.
    gene_signal, gene_noise
        Scale of the program shift of a group gene and the per-gene noise.
    grade_noise
        Noise on ``T`` before the grade cut.
    empty_fraction
        Fraction of empty cells per sample (the same number in every sample).

    Returns
    -------
    dict
        ``grid`` float32 ``(n, H, W, D)``; ``mask`` bool ``(n, H, W)`` (occupied cells);
        ``patches`` float32 ``(n, N, D)`` and ``coords`` int64 ``(n, N, 2)`` (row, column) of
        the occupied cells in raster order; ``genes`` float32 ``(n, n_genes)``;
        ``gene_groups`` ``{"tumour": [...], "microenvironment": [...]}`` (sorted gene
        indices); ``diagnosis`` int64 (class index into ``CLASSES``), ``grade`` int64 (index
        into ``GRADES``), ``time`` float32 (months) and ``event`` int64 (1 observed);
        ``T``, ``E``, ``W`` float32 latents and ``tumour_cells`` bool ``(n, H, W)`` (the
        tumour region); ``y``: ``diagnosis`` or ``grade`` for a classification task,
        ``time`` for ``survival`` (with ``event``).
    """
    n_classes = len(glioma.CLASSES)
    height, width = (int(v) for v in grid)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if n_samples < n_classes:
        raise ValueError(f"n_samples must be >= {n_classes}, got {n_samples}")
    if min(height, width) < 2 or feature_dim < 4 or n_genes < 4:
        raise ValueError(
            f"need grid sides >= 2, feature_dim >= 4 and n_genes >= 4, got {grid}, "
            f"{feature_dim}, {n_genes}"
        )
    n_cells = height * width
    n_empty = int(round(empty_fraction * n_cells))
    if not 0 <= n_empty < n_cells:
        raise ValueError(f"empty_fraction must leave some cells occupied, got {empty_fraction}")
    if min(grid_noise, cell_noise, gene_noise, gene_signal, grade_noise) < 0:
        raise ValueError(
            "grid_noise, cell_noise, gene_signal, gene_noise and grade_noise must be >= 0"
        )

    design = stream_rng(seed, _DESIGN)
    directions = np.linalg.qr(design.standard_normal((feature_dim, 3)))[
        0
    ].T  # tumour, immune, necrosis
    order = design.permutation(n_genes)
    tumour_genes = np.sort(order[: n_genes // 4])
    tme_genes = np.sort(order[n_genes // 4 : n_genes // 4 + n_genes // 2])
    size = design.uniform(*glioma.LOADING_RANGE, n_genes)
    sign = np.where(design.uniform(size=n_genes) < glioma.NEGATIVE_LOADING_FRACTION, -1.0, 1.0)
    baseline = design.normal(glioma.BASELINE_MEAN, glioma.BASELINE_SD, n_genes)

    labels = np.arange(n_samples) % n_classes
    labels = labels[stream_rng(seed, _ASSIGNMENT).permutation(n_samples)]
    latent = stream_rng(seed, _LATENT)
    tumour, tme, necrosis, grade, time, event = (np.zeros(n_samples) for _ in range(6))
    for i, label in enumerate(labels):
        programs = glioma.CLASS_PROGRAMS[glioma.CLASSES[label]]
        tumour[i], tme[i] = _program(latent, programs["T"]), _program(latent, programs["E"])
        necrosis[i] = latent.uniform(0.0, 1.0)
        noisy = tumour[i] + latent.normal(0.0, grade_noise)
        grade[i] = np.searchsorted(glioma.GRADE_CUTS, noisy, side="right")
        hazard = glioma.BASE_HAZARD_PER_MONTH * np.exp(
            glioma.BETA_T * tumour[i] + glioma.BETA_W * necrosis[i]
        )
        event_time = latent.exponential(1.0 / hazard)
        censor_time = latent.uniform(*glioma.CENSOR_RANGE_MONTHS)
        time[i] = max(min(event_time, censor_time), glioma.MIN_TIME_MONTHS)
        event[i] = float(event_time <= censor_time)

    draw = stream_rng(seed, _GRID)
    features = draw.normal(0.0, cell_noise, (n_samples, n_cells, feature_dim))
    mask = np.ones((n_samples, n_cells), bool)
    tumour_cells = np.zeros((n_samples, n_cells), bool)
    rows, cols = np.divmod(np.arange(n_cells), width)
    for i in range(n_samples):
        shown_t, shown_e = np.clip([tumour[i], tme[i]] + draw.normal(0.0, grid_noise, 2), 0.0, 1.0)
        share = TUMOUR_CELL_RANGE[0] + (TUMOUR_CELL_RANGE[1] - TUMOUR_CELL_RANGE[0]) * shown_t
        block_h = int(np.clip(round(np.sqrt(share * n_cells)), 1, height))
        block_w = int(np.clip(round(share * n_cells / block_h), 1, width))
        top = draw.integers(0, height - block_h + 1)
        left = draw.integers(0, width - block_w + 1)
        in_block = (rows >= top) & (rows < top + block_h) & (cols >= left) & (cols < left + block_w)
        tumour_cells[i] = in_block
        features[i, in_block] += TUMOUR_STRENGTH * directions[0]
        rest = np.flatnonzero(~in_block)
        immune_share = (
            IMMUNE_CELL_RANGE[0] + (IMMUNE_CELL_RANGE[1] - IMMUNE_CELL_RANGE[0]) * shown_e
        )
        immune = draw.permutation(rest)[: int(round(immune_share * len(rest)))]
        features[i, immune] += IMMUNE_STRENGTH * directions[1]
        dead = draw.permutation(n_cells)[: int(round(NECROSIS_CELL_MAX * necrosis[i] * n_cells))]
        features[i, dead] += NECROSIS_STRENGTH * directions[2]
        empty = draw.permutation(n_cells)[:n_empty]
        mask[i, empty] = False
        features[i, empty] = 0.0

    program = np.zeros((n_samples, n_genes))
    program[:, tumour_genes] = tumour[:, None]
    program[:, tme_genes] = tme[:, None]
    genes = (
        baseline
        + gene_signal * (size * sign) * program
        + stream_rng(seed, _GENES).normal(0.0, gene_noise, (n_samples, n_genes))
    )

    n_patches = n_cells - n_empty
    occupied = [np.flatnonzero(m) for m in mask]
    patches = np.stack([features[i, cells] for i, cells in enumerate(occupied)])
    coords = np.stack([np.stack([rows[cells], cols[cells]], axis=1) for cells in occupied])
    result: dict[str, Any] = {
        "grid": features.reshape(n_samples, height, width, feature_dim).astype(np.float32),
        "mask": mask.reshape(n_samples, height, width),
        "patches": patches.reshape(n_samples, n_patches, feature_dim).astype(np.float32),
        "coords": coords.reshape(n_samples, n_patches, 2).astype(np.int64),
        "genes": genes.astype(np.float32),
        "gene_groups": {
            "tumour": tumour_genes.tolist(),
            "microenvironment": tme_genes.tolist(),
        },
        "diagnosis": labels.astype(np.int64),
        "grade": grade.astype(np.int64),
        "time": time.astype(np.float32),
        "event": event.astype(np.int64),
        "T": tumour.astype(np.float32),
        "E": tme.astype(np.float32),
        "W": necrosis.astype(np.float32),
        "tumour_cells": tumour_cells.reshape(n_samples, height, width),
    }
    result["y"] = {"diagnosis": result["diagnosis"], "grading": result["grade"]}.get(
        task, result["time"]
    )
    return result
