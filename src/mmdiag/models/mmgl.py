"""MMGL adapted to OM + IM + a TEM bag (a multi-modal row of CMUS-Net Tables 4 and 6).

Paper: S. Zheng, Z. Zhu, Z. Liu, Z. Guo, Y. Liu, Y. Yang and Y. Zhao, "Multi-modal graph
learning for disease prediction", IEEE Transactions on Medical Imaging 41(9), 2022.
Authors' code: https://github.com/SsGood/MMGL (``MMGL_inductive``, commit c13b05c).

MMGL takes one feature vector per modality and predicts a disease per patient in four steps:
modality-specific transform matrices (one query/key/value projection per modality), a
modality-aware representation learnt by attention across the modalities, adaptive graph
learning of a population graph over the patients from those representations, and a GCN on
that graph. CMUS-Net (Long et al., MedIA 2025, Sec. 4.3) replaces MMGL's inputs by the OM, IM
and TEM images and remarks (Sec. 5.2.1) that MMGL's transform matrices extract "simple
features". Hence the default modality vector is the image itself, average-pooled to a small
grid and flattened (``encoder="pixels"``), so the transform matrices are the only feature
extractor, as in MMGL; any timm encoder name gives its pooled features instead. A patient's
TEM vector is the mean of its TEM images' vectors.

Inductive population graph (MMGL's inductive form, ``MMGL_inductive``): the graph is learnt
over training patients, and an unseen patient is joined to them by the learnt similarity.
Here the training population is a fixed-size bank of the modality-aware representations of
the most recent training patients (features only, never labels), written in training mode
after each step. A training step's graph spans the bank and the batch; its loss reads the
batch's labels only. At evaluation nothing is written, and each patient is predicted on its
own graph of the bank and itself, so its prediction depends on its images and the trained
state only: never on labels, nor on the other patients of the batch. Under data parallelism
DDP broadcasts the first process's bank.

Deliberate departures from the authors' code: attention scores are the plain scaled dot
product (the code also divides them by their smallest magnitude and L2-normalises them before
the softmax); the GCN is trained jointly with the graph learner and the representation, as the
paper describes (the code detaches the graph and the features before the GCN); the GCN's
logits are not passed through a ReLU; edge weights are the learnt similarities (the code's DGL
convolution ignores them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mmdiag.models.cmus import (
    MODALITIES,
    bag_mean,
    checked_modalities,
    create_modality_encoder,
    warn_if_randomly_initialised,
)
from mmdiag.models.registry import register_model

PIXEL_ENCODER = "pixels"


# --------------------------------------------------------------------------- building blocks


class PixelFeatures(nn.Module):
    """MMGL's 'simple features' of an image: average-pooled to grid x grid px, flattened."""

    def __init__(self, grid_px: int) -> None:
        super().__init__()
        self.grid_px = grid_px
        self.num_features = 3 * grid_px * grid_px

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.grid_px).flatten(1)


def mmgl_modality_encoders(
    encoder: str, modalities: Sequence[str], checkpoint: str | None, pixel_grid_px: int
) -> nn.ModuleDict:
    """Pixel features, or one unshared timm (or CMUS Table 5) encoder per modality."""
    if encoder == PIXEL_ENCODER:
        return nn.ModuleDict({m: PixelFeatures(pixel_grid_px) for m in modalities})
    encoders = nn.ModuleDict({m: create_modality_encoder(encoder, checkpoint) for m in modalities})
    warn_if_randomly_initialised(encoder, checkpoint)
    return encoders


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, M, h * d) -> (B, h, M, d)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, M, d) -> (B, M, h * d)."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def modality_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) V across the modality tokens; returns output and weights."""
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return dropout(weights) @ v, weights


class ModalityTransform(nn.Module):
    """Modality-specific transform matrices and the first modality-aware attention.

    Modality m's vector x_m gives q_m = W_q^m x_m, k_m = W_k^m x_m, v_m = W_v^m x_m (no bias,
    ``num_heads`` heads of ``head_dim``); attention across the M modality tokens, a linear
    layer, the values as residual and LayerNorm (the code's ``VariLengthInputLayer``).
    """

    def __init__(
        self, input_dims: Sequence[int], head_dim: int, num_heads: int, dropout: float
    ) -> None:
        super().__init__()
        width = head_dim * num_heads
        self.num_heads = num_heads
        self.query = nn.ModuleList(nn.Linear(d, width, bias=False) for d in input_dims)
        self.key = nn.ModuleList(nn.Linear(d, width, bias=False) for d in input_dims)
        self.value = nn.ModuleList(nn.Linear(d, width, bias=False) for d in input_dims)
        self.attention_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """M vectors (B, d_m) -> tokens (B, M, h * d) and attention weights (B, h, M, M)."""

        def project(layers: nn.ModuleList) -> torch.Tensor:
            tokens = torch.stack(
                [layer(x) for layer, x in zip(layers, vectors, strict=True)], dim=1
            )
            return split_heads(tokens, self.num_heads)

        q, k, v = project(self.query), project(self.key), project(self.value)
        attended, weights = modality_attention(q, k, v, self.attention_dropout)
        tokens = self.dropout(self.out(merge_heads(attended))) + merge_heads(v)
        return self.norm(tokens), weights


class ModalityEncoderLayer(nn.Module):
    """Self-attention over the modality tokens, then a GELU feed-forward (both residual + LN)."""

    def __init__(self, head_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        width = head_dim * num_heads
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.attention_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.feed_forward = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.Dropout(dropout)
        )
        self.feed_forward_norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(tokens).chunk(3, dim=-1))
        attended, weights = modality_attention(q, k, v, self.attention_dropout)
        tokens = self.norm(self.dropout(self.out(merge_heads(attended))) + tokens)
        return self.feed_forward_norm(self.feed_forward(tokens) + tokens), weights


def weighted_cosine_graph(z: torch.Tensor, projection: nn.Linear, threshold: float) -> torch.Tensor:
    """Adaptive graph learning ('weighted-cosine', the authors' scripts' choice).

    A_ij = s_ij [s_ij > threshold] with s_ij the cosine similarity of P z_i and P z_j, P a
    learnt matrix; the mask is not differentiated. A is symmetric, with ones on the diagonal
    (a nonzero node is its own most similar one) and entries in [0, 1].
    """
    p = F.normalize(projection(z), dim=-1)
    similarity = p @ p.T
    keep = (similarity > threshold).detach().to(similarity.dtype)
    return similarity * keep


def normalised_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """GCN propagation matrix D^-1/2 (A + I) D^-1/2, D the degrees of A + I (symmetric)."""
    with_self = adjacency + torch.eye(adjacency.shape[0], dtype=adjacency.dtype).to(adjacency)
    inverse_sqrt = with_self.sum(dim=1).rsqrt()
    return inverse_sqrt[:, None] * with_self * inverse_sqrt[None, :]


def graph_regulariser(
    z: torch.Tensor, adjacency: torch.Tensor, smooth: float, degree: float, sparsity: float
) -> torch.Tensor:
    """The graph-learning loss of the authors' code (``GraphConstructLoss``).

    smooth * tr(Z^T L Z) / N^2  -  degree * 1^T log(A 1) / N  +  sparsity * ||A||_F^2 / N^2,
    with L = diag(A 1) - A the graph Laplacian: similar patients linked, no isolated node,
    few strong edges.
    """
    n = adjacency.shape[0]
    degrees = adjacency.sum(dim=1)
    laplacian = torch.diag(degrees) - adjacency
    smoothness = torch.trace(z.T @ laplacian @ z) / n**2
    connectivity = torch.log(degrees + 1e-5).sum() / n
    return smooth * smoothness - degree * connectivity + sparsity * adjacency.pow(2).sum() / n**2


class GCN(nn.Module):
    """Two graph convolutions: Â relu(Â Z W1) W2 (the code's ``GCN``; logits, no last ReLU)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.first = nn.Linear(in_dim, hidden_dim)
        self.second = nn.Linear(hidden_dim, num_classes)
        self.dropout = dropout  # functional: the rows are graph nodes, not batch samples

    def forward(self, nodes: torch.Tensor, propagation: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(propagation @ self.first(nodes))
        hidden = F.dropout(hidden, self.dropout, training=self.training)
        return propagation @ self.second(hidden)


# --------------------------------------------------------------------------- model


class MMGL(nn.Module):
    """MMGL over OM, IM and the TEM bag, with an inductive population graph (see module doc).

    ``head_dim`` x ``num_heads`` is the width of the modality tokens (the authors' TADPOLE
    script: 24 x 4), ``num_layers`` the modality encoder layers after the transform (1),
    ``hidden_dim`` the width of the output layer on the flattened tokens (the code's
    n_head x n_hidden), ``graph_threshold`` the cosine cut of the learnt graph (0.9),
    ``population_size`` the training patients the graph holds, and ``smooth``/``degree``/
    ``sparsity`` the graph regulariser's weights (1, 0.5, 0).
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        encoder: str = PIXEL_ENCODER,
        pixel_grid_px: int = 32,
        modalities: Sequence[str] = MODALITIES,
        head_dim: int = 24,
        num_heads: int = 4,
        num_layers: int = 1,
        hidden_dim: int = 96,
        dropout: float = 0.0,
        graph_threshold: float = 0.9,
        population_size: int = 512,
        smooth: float = 1.0,
        degree: float = 0.5,
        sparsity: float = 0.0,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.modalities = checked_modalities(modalities)
        self.encoders = mmgl_modality_encoders(encoder, self.modalities, checkpoint, pixel_grid_px)
        n_modalities = len(self.modalities)
        dims = [self.encoders[m].num_features for m in self.modalities]
        self.transform = ModalityTransform(dims, head_dim, num_heads, dropout)
        self.layers = nn.ModuleList(
            ModalityEncoderLayer(head_dim, num_heads, dropout) for _ in range(num_layers)
        )
        token_width = head_dim * num_heads
        self.output = nn.Sequential(
            nn.LayerNorm(n_modalities * token_width),
            nn.Linear(n_modalities * token_width, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        # the representation: the output layer's features and the modality attention map
        self.num_features = hidden_dim + n_modalities**2
        self.auxiliary_head = nn.Linear(self.num_features, num_classes)
        self.graph_projection = nn.Linear(self.num_features, self.num_features)
        self.gcn = GCN(self.num_features, self.num_features // 2, num_classes, dropout)
        self.graph_threshold = graph_threshold
        self.regulariser_weights = (smooth, degree, sparsity)
        self.register_buffer("population", torch.zeros(population_size, self.num_features))
        self.register_buffer("population_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("population_next", torch.zeros((), dtype=torch.long))

    # -- features --------------------------------------------------------------------------

    def modality_vectors(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One vector per patient and modality; the TEM bag averaged per patient."""
        n_patients = batch["om"].shape[0]
        vectors = {}
        for modality in self.modalities:
            if modality == "TEM":
                instances = self.encoders["TEM"](batch["tem"])
                vectors["TEM"] = bag_mean(instances, batch["tem_patient"], n_patients)
            else:
                vectors[modality] = self.encoders[modality](batch[modality.lower()])
        return vectors

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Modality-aware representation z (B, hidden_dim + M^2) of each patient."""
        vectors = self.modality_vectors(batch)
        tokens, weights = self.transform([vectors[m] for m in self.modalities])
        for layer in self.layers:
            tokens, weights = layer(tokens)
        attention_map = weights.mean(dim=1).flatten(1)  # the last layer's M x M map
        return torch.cat([self.output(tokens.flatten(1)), attention_map], dim=1)

    # -- population graph ------------------------------------------------------------------

    def population_nodes(self) -> torch.Tensor:
        """The banked training representations (features only; a constant)."""
        return self.population[: int(self.population_filled)].clone()

    @torch.no_grad()
    def remember(self, z: torch.Tensor) -> None:
        """Write a training batch's representations into the ring bank (training mode only)."""
        size = self.population.shape[0]
        if size == 0:
            return
        rows = (self.population_next + torch.arange(len(z), device=z.device)) % size
        self.population[rows[-size:]] = z.detach()[-size:].to(self.population.dtype)
        self.population_next.copy_((self.population_next + len(z)) % size)
        self.population_filled.copy_(torch.clamp(self.population_filled + len(z), max=size))

    def graph(self, nodes: torch.Tensor) -> torch.Tensor:
        """The learnt adjacency A over ``nodes`` (weighted cosine, thresholded)."""
        return weighted_cosine_graph(nodes, self.graph_projection, self.graph_threshold)

    def graph_logits(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GCN logits of every node and the learnt adjacency."""
        adjacency = self.graph(nodes)
        return self.gcn(nodes, normalised_adjacency(adjacency)), adjacency

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """GCN logits of the batch's patients on the population graph.

        Training: one graph over the bank and the whole batch. Evaluation: each patient on its
        own graph of the bank and itself (inductive; independent of the batch's other
        patients).
        """
        population = self.population_nodes()
        if self.training:
            logits, _ = self.graph_logits(torch.cat([population, z]))
            return logits[len(population) :]
        rows = [self.graph_logits(torch.cat([population, z_i[None]]))[0][-1] for z_i in z]
        return torch.stack(rows)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z = self.forward_features(batch)
        logits = self.forward_head(z)
        if self.training:
            self.remember(z)
        return logits

    # -- loss ------------------------------------------------------------------------------

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GCN cross-entropy + the representation's own cross-entropy + graph regulariser.

        The auxiliary classifier on z is the code's modality-fusion loss (its 'simple-2'
        mode); the regulariser is taken over the training step's whole graph. Only the
        batch's labels are read.
        """
        z = self.forward_features(batch)
        nodes = torch.cat([self.population_nodes(), z])
        logits, adjacency = self.graph_logits(nodes)
        logits = logits[len(nodes) - len(z) :]
        total = F.cross_entropy(logits, batch["label"])
        total = total + F.cross_entropy(self.auxiliary_head(z), batch["label"])
        total = total + graph_regulariser(nodes, adjacency, *self.regulariser_weights)
        if self.training:
            self.remember(z)
        return total, logits


# --------------------------------------------------------------------------- constructors


def tiny_example() -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny MMGL on pixel features and a batch of two patients (for the registry test)."""
    from mmdiag.models.cmus import tiny_example as cmus_batch

    _, batch = cmus_batch()
    kwargs = {
        "num_classes": 3,
        "pixel_grid_px": 4,
        "head_dim": 4,
        "num_heads": 2,
        "hidden_dim": 8,
        "population_size": 6,
        "graph_threshold": 0.0,
    }
    return kwargs, batch


@register_model(family="cmus", example=tiny_example)
def mmgl(num_classes: int = 3, **kwargs) -> MMGL:
    """MMGL (Zheng et al., TMI 2022) on OM, IM and the TEM bag (CMUS-Net Tables 4 and 6)."""
    return MMGL(num_classes, **kwargs)
