"""CS-MIL bags: patches drawn evenly from a patient's phenotype clusters, and their batches.

Paper: R. Deng et al., "Cross-scale Multi-instance Learning for Pathological Image Diagnosis",
2024, Sections 3.1 and 4.2: "The patches were gathered equally from different clusters in each
bag"; "100 image bags were randomly generated, each with a size of 8 [...], and the mean value
of bag scores was calculated as the final prediction at the slide level".

The sampling rule (``sample_bag``, stratified):

1. The bag's ``bag_size`` slots are dealt round-robin over the clusters present in the slide,
   in a random order of the clusters, so every present cluster gets ``bag_size // k`` or one
   more slot (k = number of present clusters). Absent cluster ids get no slot: they produce no
   instance at all.
2. Each cluster fills its slots with distinct patches drawn uniformly from its members. A
   cluster with fewer patches than slots gives all its patches once and its remaining slots
   become padding (index 0, mask False).

Why: the authors' loader draws one count m ~ N(3, 1) per bag and then ``min(m, cluster size)``
patches from every cluster (all clusters get the same count, capped by the cluster's size) and
adds, for each absent cluster, a zero instance with mask 0. Masked instances get zero attention,
so the absent clusters' padding changes nothing; step 1 keeps the equal share per cluster with
a fixed bag size, and step 2 keeps the cap. Patches are drawn without replacement, so no patch
is counted twice in one bag (the authors draw with replacement even after the cap, which can
repeat a patch and double its attention weight).

The unstratified sampler of Table 3's "CS-Attention (Naive)" row draws ``bag_size`` distinct
patches uniformly from the whole slide, padding only when the slide has fewer patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch


class BagScores(NamedTuple):
    """A slide's score from its test bags' probabilities: mean (the paper's), median, max."""

    mean: float
    median: float
    max: float


# --------------------------------------------------------------------------- validation


def _checked_clusters(clusters: np.ndarray) -> np.ndarray:
    clusters = np.asarray(clusters)
    if clusters.ndim != 1 or clusters.size == 0:
        raise ValueError(f"clusters must be a non-empty 1-D array, got shape {clusters.shape}")
    if not np.issubdtype(clusters.dtype, np.integer):
        raise ValueError(f"clusters must hold integer cluster ids, got dtype {clusters.dtype}")
    if clusters.min() < 0:
        raise ValueError(f"clusters must be >= 0, got {clusters.min()}")
    return clusters


def _checked_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _checked_rng(rng: np.random.Generator) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


# --------------------------------------------------------------------------- sampling


def _padded(chosen: np.ndarray, bag_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real indices first, then padding slots (index 0, mask False) up to ``bag_size``."""
    indices = np.zeros(bag_size, dtype=np.int64)
    indices[: len(chosen)] = chosen
    mask = np.arange(bag_size) < len(chosen)
    return indices, mask


def _stratified(
    clusters: np.ndarray, bag_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    present = np.unique(clusters)
    order = rng.permutation(present)  # which clusters get the remainder slots is random
    slots = np.full(len(order), bag_size // len(order))
    slots[: bag_size % len(order)] += 1
    chosen = []
    for cluster, n_slots in zip(order, slots, strict=True):
        members = np.flatnonzero(clusters == cluster)
        n_drawn = min(int(n_slots), len(members))  # the cap of the authors' loader
        chosen.append(rng.choice(members, size=n_drawn, replace=False))
    return _padded(rng.permutation(np.concatenate(chosen)), bag_size)


def _uniform(
    n_patches: int, bag_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    return _padded(rng.choice(n_patches, size=min(bag_size, n_patches), replace=False), bag_size)


def sample_bag(
    clusters: np.ndarray, bag_size: int, rng: np.random.Generator, *, stratified: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one bag of patch indices from a slide (or patient) with phenotype cluster ids.

    Parameters
    ----------
    clusters : int array (n_patches,)
        The k-means cluster id (>= 0) of each patch; ids may be missing.
    bag_size : int
        Slots in the bag.
    rng : numpy.random.Generator
        The only source of randomness: the same seed gives the same bag.
    stratified : bool, keyword-only
        Draw evenly from the clusters (the paper); False draws uniformly from all patches
        (Table 3, without clustering).

    Returns
    -------
    indices : int64 array (bag_size,)
        Patch indices; real ones first, in random order, then padding slots holding 0.
    mask : bool array (bag_size,)
        True for real instances. Padding appears only when a cluster (or, unstratified, the
        slide) has fewer patches than its slots.

    Notes
    -----
    With k clusters present, each gets ``bag_size // k`` or ``bag_size // k + 1`` slots; see
    the module docstring for the rule and its relation to the authors' loader.

    Examples
    --------
    >>> clusters = np.array([0, 0, 0, 2, 2, 2, 2])
    >>> indices, mask = sample_bag(clusters, 4, np.random.default_rng(0))
    >>> np.bincount(clusters[indices[mask]], minlength=3).tolist()
    [2, 0, 2]
    """
    clusters = _checked_clusters(clusters)
    bag_size = _checked_count("bag_size", bag_size)
    rng = _checked_rng(rng)
    if stratified:
        return _stratified(clusters, bag_size, rng)
    return _uniform(len(clusters), bag_size, rng)


def sample_bags(
    clusters: np.ndarray,
    bag_size: int,
    n_bags: int,
    rng: np.random.Generator,
    *,
    stratified: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``n_bags`` independent bags of one slide, for testing (the paper: 100 bags of 8).

    Returns indices int64 (n_bags, bag_size) and mask bool (n_bags, bag_size), each row as
    ``sample_bag`` gives it.
    """
    n_bags = _checked_count("n_bags", n_bags)
    bags = [sample_bag(clusters, bag_size, rng, stratified=stratified) for _ in range(n_bags)]
    return np.stack([b[0] for b in bags]), np.stack([b[1] for b in bags])


def aggregate_bag_probabilities(probabilities: np.ndarray) -> BagScores:
    """The slide score from its bags' probabilities: the mean (the paper's), median and max.

    >>> aggregate_bag_probabilities(np.array([0.2, 0.4, 0.9]))
    BagScores(mean=0.5, median=0.4, max=0.9)
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 1 or probabilities.size == 0:
        raise ValueError(
            f"probabilities must be a non-empty 1-D array, got shape {probabilities.shape}"
        )
    return BagScores(
        mean=float(probabilities.mean()),
        median=float(np.median(probabilities)),
        max=float(probabilities.max()),
    )


# --------------------------------------------------------------------------- batches


def collate_bags(
    items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float]],
) -> dict[str, torch.Tensor]:
    """Bags -> the models' batch dict (see ``mmdiag.models.csmil``).

    Each item is (features (n_patches, S, D) of the slide, indices (n,), mask (n,), label).
    Gives ``features`` float32 (B, N, S, D) with padded instances all zero, ``mask`` bool
    (B, N) and ``label`` float32 (B,); bags shorter than the longest are padded with masked
    instances.
    """
    if not items:
        raise ValueError("items must hold at least one bag")
    n = max(len(indices) for _, indices, _, _ in items)
    features_shape = np.asarray(items[0][0]).shape[1:]
    features = np.zeros((len(items), n, *features_shape), dtype=np.float32)
    mask = np.zeros((len(items), n), dtype=bool)
    for b, (slide_features, indices, bag_mask, _) in enumerate(items):
        slide_features, indices = np.asarray(slide_features), np.asarray(indices)
        bag_mask = np.asarray(bag_mask, dtype=bool)
        if slide_features.shape[1:] != features_shape or indices.shape != bag_mask.shape:
            raise ValueError(
                f"bag {b}: features {slide_features.shape[1:]} vs {features_shape}, "
                f"indices {indices.shape} vs mask {bag_mask.shape}"
            )
        real = indices[bag_mask]
        features[b, : len(indices)][bag_mask] = slide_features[real]
        mask[b, : len(indices)] = bag_mask
    labels = np.array([float(label) for *_, label in items], dtype=np.float32)
    return {
        "features": torch.from_numpy(features),
        "mask": torch.from_numpy(mask),
        "label": torch.from_numpy(labels),
    }
