"""Pieces shared by the histology-genomics models of the subspace-fusion family.

- :class:`SNNEncoder`: the self-normalising network of Klambauer et al. (NeurIPS 2017) that
  the subspace-fusion paper ("SNN", its ref. [10]), Pathomic Fusion and MCAT use to encode a
  gene-expression vector: fully connected layers, each followed by SELU and alpha dropout,
  with LeCun-normal weights (variance ``1 / fan_in``) and zero biases, which keep activations
  near zero mean and unit variance without normalisation layers.
- :func:`task_loss`: one loss for the three tasks of the paper (eqs. 6-8): class-weighted
  cross-entropy for diagnosis and grading, the discrete-time survival negative log-likelihood
  (:func:`mmdiag.training.survival.nll_survival_loss`, ``alpha = 0`` as in the authors' code)
  for survival, where the logits are one hazard logit per time bin.

Batches of this family are dicts with ``patches`` (B, N, D) patch features, ``grid``
(B, D, H, W) the same slide's features laid out by patch position and ``grid_mask``
(B, 1, H, W) (1 where a patch lies), ``genes`` (B, G), ``label`` (B,) (class, or time bin for
survival) and, for survival, ``event`` (B,) and ``time`` (B,).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmdiag.training.sampling import weighted_cross_entropy
from mmdiag.training.survival import nll_survival_loss

__all__ = ["TASK_KINDS", "SNNEncoder", "check_task", "task_loss"]

#: ``classification`` (diagnosis, grading: eqs. 6, 7) or ``survival`` (eq. 8).
TASK_KINDS = ("classification", "survival")


def check_task(task: str) -> str:
    """``task`` itself; ``ValueError`` naming the kinds when it is none of them."""
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {TASK_KINDS}, got {task!r}")
    return task


class SNNEncoder(nn.Sequential):
    """Linear -> SELU -> AlphaDropout per layer, over ``hidden_dims`` then ``out_dim``.

    The subspace-fusion paper's gene encoder G is ``[64, 48, 32] -> 128``; ``out_dim`` is the
    width of the embedding (its last layer is a block like the others, as in the paper's code).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int] = (64, 48, 32),
        out_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        widths = [int(in_dim), *map(int, hidden_dims), int(out_dim)]
        blocks = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Linear(width_in, width_out), nn.SELU(), nn.AlphaDropout(dropout)]
        super().__init__(*blocks)
        self.out_dim = int(out_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # LeCun normal: the initialisation self-normalisation assumes
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                nn.init.zeros_(module.bias)


def task_loss(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    task: str,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The task term of eqs. 6-8: (weighted) cross-entropy, or the survival NLL."""
    if check_task(task) == "classification":
        return weighted_cross_entropy(logits, batch["label"], class_weight)
    if class_weight is not None:
        raise ValueError("class weights apply to classification tasks, not to survival")
    return nll_survival_loss(logits, batch["label"], batch["event"], alpha=0.0)
