"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021).

Two augmented views x1, x2 of an image pass through the same encoder f (backbone + projection
MLP) and a prediction MLP h. With p = h(f(x)) and z = f(x), the loss is

    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,   D(p, z) = -cos(p, z)   (eqs 1-3)

The projector has 3 layers (BN after every linear layer, ReLU after the first two, no ReLU
after the last; 2048-d), the predictor is a bottleneck 2048 -> 512 -> 2048 with BN and ReLU
after its hidden layer only (Sec. 4, "Baseline settings").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projection_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """f's projection head: 3 linear layers with BN; the output BN has no affine parameters."""
    return nn.Sequential(
        nn.Linear(in_dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim, affine=False),
    )


def prediction_mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    """h: the bottleneck predictor (BN and ReLU on the hidden layer, plain linear output)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


class SimSiam(nn.Module):
    """A backbone (pooled features, e.g. a timm model with ``num_classes=0``) + heads."""

    def __init__(self, backbone: nn.Module, *, dim: int = 2048, predictor_dim: int = 512):
        super().__init__()
        self.backbone = backbone
        self.projector = projection_mlp(backbone.num_features, dim)
        self.predictor = prediction_mlp(dim, predictor_dim)

    def forward(self, view_1: torch.Tensor, view_2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Projections ``z1, z2`` (detached: the stop-gradient) and predictions ``p1, p2``."""
        z1 = self.projector(self.backbone(view_1))
        z2 = self.projector(self.backbone(view_2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return {"p1": p1, "p2": p2, "z1": z1.detach(), "z2": z2.detach()}


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean cosine similarity; ``z`` must already be detached (eq 2)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def simsiam_loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The symmetrised loss L (eq 3); its minimum is -1."""
    return 0.5 * negative_cosine(outputs["p1"], outputs["z2"]) + 0.5 * negative_cosine(
        outputs["p2"], outputs["z1"]
    )


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of l2-normalised projections: SimSiam's collapse indicator.

    About 1/sqrt(dim) for well-spread outputs, 0 when every image maps to the same vector.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
