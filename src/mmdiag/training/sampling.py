"""Class balance for the training loop: class weights of the loss and the epoch's sample order.

- :func:`balanced_class_weights`: ``n / (K * n_c)`` from the training labels, so that every
  class contributes the same total weight to an epoch's loss.
- :func:`weighted_cross_entropy`: the per-sample mean of ``w[y_i] * CE_i``. It is not PyTorch's
  ``cross_entropy(weight=...)``, which divides by the batch's sum of weights: a per-sample mean
  lets a data-parallel process weight its share of the batch by its size (see
  :mod:`.loop`), and with balanced weights the mean weight over the training set is one, so
  the loss keeps the scale of the plain cross-entropy.
- :func:`epoch_order`: a seeded permutation (``shuffle``) or ``n`` draws with replacement,
  with probability proportional to ``1 / n_class`` (``balanced``). Both come from the generator
  that every process shares, so all processes draw the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SAMPLERS = ("shuffle", "balanced")


def class_counts(labels: torch.Tensor) -> torch.Tensor:
    """Samples per class ``0 .. max(labels)``; ``ValueError`` when a class has none.

    Balancing needs every class among the training labels: a class without samples would get
    an infinite weight.
    """
    counts = torch.bincount(labels)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"classes {missing} have no training sample; they cannot be balanced")
    return counts


def balanced_class_weights(labels: torch.Tensor) -> torch.Tensor:
    """``n / (K * n_c)`` per class ``c`` (float64), from the training labels only."""
    counts = class_counts(labels).double()
    return len(labels) / (len(counts) * counts)


def class_weight_tensor(
    setting: str | Sequence[float], labels: torch.Tensor
) -> torch.Tensor | None:
    """The loss's class weights for a ``class_weights`` setting (``None``: unweighted)."""
    if isinstance(setting, str):
        if setting == "none":
            return None
        if setting == "balanced":
            return balanced_class_weights(labels)
        raise ValueError(f"unknown class_weights {setting!r}: none, balanced or a list")
    return torch.tensor([float(w) for w in setting], dtype=torch.float64)


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy, each sample's term times its class weight, averaged over samples."""
    if class_weight is None:
        return nn.functional.cross_entropy(logits, labels)
    if len(class_weight) != logits.shape[1]:
        raise ValueError(
            f"{len(class_weight)} class weights for logits of {logits.shape[1]} classes"
        )
    per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
    return (per_sample * class_weight.to(per_sample)[labels]).mean()


def balanced_sample_weights(labels: torch.Tensor) -> torch.Tensor:
    """Each sample's drawing weight ``1 / n_class`` (every class equally likely per draw)."""
    return 1.0 / class_counts(labels).double()[labels]


def epoch_order(
    n_items: int,
    generator: torch.Generator,
    *,
    sampler: str = "shuffle",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The indices of one epoch's ``n_items`` samples, drawn from ``generator``.

    ``balanced`` needs the ``labels`` of the ``n_items`` samples.
    """
    if sampler == "shuffle":
        return torch.randperm(n_items, generator=generator)
    if sampler == "balanced":
        if labels is None or len(labels) != n_items:
            raise ValueError(f"the balanced sampler needs the labels of all {n_items} samples")
        weights = balanced_sample_weights(labels)
        return torch.multinomial(weights, n_items, replacement=True, generator=generator)
    raise ValueError(f"unknown sampler {sampler!r}: one of {SAMPLERS}")
