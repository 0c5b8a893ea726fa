"""A planted MIL problem and a learning check shared by the tests of the MIL baselines."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


def planted_bags(n_bags: int = 40, n_locations: int = 10, dim: int = 8, seed: int = 0) -> dict:
    """Noise bags ``(n_bags, n_locations, 3 scales, dim)``; a positive bag (every second one)
    has two locations whose features 0-2 are high at every scale."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (n_bags, n_locations, 3, dim)).astype(np.float32)
    labels = np.arange(n_bags) % 2
    for b in np.flatnonzero(labels):
        features[b, rng.choice(n_locations, 2, replace=False), :, :3] += 2.5
    return {
        "features": torch.from_numpy(features),
        "mask": torch.ones(n_bags, n_locations, dtype=torch.bool),
        "label": torch.from_numpy(labels).float(),
    }


def assert_learns_planted_bags(model: torch.nn.Module, steps: int) -> None:
    """Full-batch Adam on one planted set: the loss falls by 30 % and the held-out AUC on
    another exceeds 0.8. A model's own ``clip_gradients`` runs between backward and step,
    as in the CS-MIL trainer."""
    train, test = planted_bags(seed=0), planted_bags(seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    clip = getattr(model, "clip_gradients", None)
    losses = []
    for _ in range(steps):
        model.train()
        loss, _ = model.loss(train)
        optimiser.zero_grad()
        loss.backward()
        if clip is not None:
            clip()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    with torch.no_grad():
        scores = torch.sigmoid(model.eval()(test)).numpy()
    assert roc_auc_score(test["label"].numpy(), scores) > 0.8
