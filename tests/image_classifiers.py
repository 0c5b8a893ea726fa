"""Inputs and a learning check shared by the tests of the 2D image classifiers."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_images(n: int = 2, size_px: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` seeded standard-normal RGB images ``(n, 3, size_px, size_px)``."""
    return torch.randn(n, 3, size_px, size_px, generator=torch.Generator().manual_seed(seed))


def assert_loss_falls_on_separable_images(model: torch.nn.Module, lr: float, steps: int = 8):
    """Eight images whose class shifts every pixel by 2: ``steps`` Adam steps must halve the
    cross-entropy of a classifier that learns."""
    labels = torch.tensor([0, 1] * 4)
    images = 0.3 * random_images(8) + 2.0 * labels.float().view(-1, 1, 1, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
