"""A feature-level toy for DeepGuide: latents where guidance must help.

The inferior latent z_I carries the class only non-linearly: its first two coordinates lie on
a ring whose radius is the class (1, 2, 3 for classes 0, 1, 2) at a uniformly random angle,
so no linear decoder of z_I separates the classes (every half-plane cuts every ring). The
superior latent z_S carries it linearly: z_S is the class's one-hot code on its first
``n_classes`` coordinates plus small non-negative noise everywhere (non-negative, as CLAM's
attention-pooled ReLU features are). A guidance MLP G can learn the map from the ring radius
to the one-hot code, after which a linear decoder of [G(z_I) ⌢ z_I] separates the classes:
the toy checks the claim of eq. 5 (G(I) + I beats I) on data where it must hold.
"""

from __future__ import annotations

import numpy as np

RING_RADII = (1.0, 2.0, 3.0)


def guidance_toy_latents(
    labels, *, seed: int = 0, inferior_dim: int = 8, superior_dim: int = 6, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """``(z_inferior (n, inferior_dim), z_superior (n, superior_dim))`` float32 for class
    indices ``labels`` in ``[0, 3)``; ``noise`` is the radial jitter of the rings, the standard
    deviation of z_I's other coordinates and the scale of z_S's non-negative noise."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(RING_RADII)):
        raise ValueError(f"labels must be in [0, {len(RING_RADII)}), got {np.unique(labels)}")
    if inferior_dim < 2 or superior_dim < len(RING_RADII):
        raise ValueError(
            f"need inferior_dim >= 2 and superior_dim >= {len(RING_RADII)}, got "
            f"{inferior_dim}, {superior_dim}"
        )
    rng = np.random.default_rng(seed)
    n = len(labels)
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    radius = np.asarray(RING_RADII)[labels] + rng.normal(0.0, noise, n)
    z_inferior = rng.normal(0.0, noise, (n, inferior_dim))
    z_inferior[:, 0], z_inferior[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    z_superior = np.abs(rng.normal(0.0, noise, (n, superior_dim)))
    z_superior[np.arange(n), labels] += 1.0
    return z_inferior.astype(np.float32), z_superior.astype(np.float32)
