"""CS-MIL: cross-scale multi-instance learning, with the baselines and ablations of its tables.

Paper: R. Deng et al., "Cross-scale Multi-instance Learning for Pathological Image Diagnosis",
2024 (journal extension of the MMMI 2022 workshop paper "Cross-scale attention guided
multi-instance learning for Crohn's disease diagnosis with pathological images").
Authors' code: https://github.com/hrlblab/CS-MIL (commit e052cec)

Baselines of Table 1, each with its own public code or paper:
DeepAttnMISL (J. Yao et al., Medical Image Analysis 2020; https://github.com/uta-smile/DeepAttnMISL),
Gated Attention MIL (M. Ilse et al., ICML 2018), MS-DA-MIL (N. Hashimoto et al., CVPR 2020) and
DS-MIL (B. Li et al., CVPR 2021; https://github.com/binli123/dsmil-wsi). DTFD-MIL (H. Zhang et al.,
CVPR 2022) and HAG-MIL (C. Xiong et al., IJCAI 2023) have their own files,
:mod:`mmdiag.models.dtfd` and :mod:`mmdiag.models.hag_mil`.

Batch contract, shared by every model here: a dict with
``features`` float32 (B, N, S, D) — B bags of N instances, each instance the phenotype features
F_s of one location at S scales ordered finest first (20x, 10x, 5x; eq. 1), D wide;
``mask`` bool (B, N), True for real instances and False for padding; ``label`` float32 (B,) in
{0, 1} (only the loss reads it). Every model returns one logit per bag, (B,); the probability is
its sigmoid. Padded instances are zeroed on entry and get exactly zero attention, so whatever
they hold never reaches the output.

Deliberate departures and choices (against hrlblab/CS-MIL@e052cec):
- Instance pooling is gated attention by default (``gated=True``).
  The authors' code and DeepAttnMISL's code pool with the ungated form a = w^T tanh(V h); with
  ``gated=False`` the parameter counts equal the paper's Table 6 exactly (D = 2048: 135,362 for
  DeepAttnMISL and MS-DA-MIL, 137,475 for CS-MIL).
- The cross-scale scores are softmax-normalised over the scales as eq. 3 writes
  (``scale_softmax=True``); the authors' main code multiplies the raw scores (``False``).
- The model returns a logit and the loss is binary cross-entropy on it (eq. 6, the negative
  log-likelihood of the bag label), computed stably from the logit rather than from a clamped
  sigmoid as the authors do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F

from mmdiag.models.registry import register_model

SCALE_NAMES = ("20x", "10x", "5x")  # finest first, the order of the batch's scale axis
FUSIONS = ("attention", "mean", "concat")
SCALE_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
SCALE_INPUTS = ("single", "instances", "sum", "concat")


# --------------------------------------------------------------------------- batch checks


def checked_batch(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, N, S, D) with padded instances zeroed, and the mask (B, N).

    Raises ``ValueError`` on wrong shapes or a bag without any real instance (its attention
    would be undefined).
    """
    features, mask = batch["features"], batch["mask"]
    if features.ndim != 4:
        raise ValueError(f"features must be (B, N, S, D), got shape {tuple(features.shape)}")
    if mask.shape != features.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool of shape {tuple(features.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every bag needs at least one real instance (mask all False)")
    return features.masked_fill(~mask[:, :, None, None], 0.0), mask


def scale_instances(
    features: torch.Tensor, mask: torch.Tensor, scale_input: str, scale_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """How a scale-agnostic MIL model sees the S scales: instances (B, N', D') and mask (B, N').

    ``single``: one scale alone, the others never read (Table 1, DeepAttnMISL at 20x/10x/5x);
    ``instances``: every (location, scale) an independent instance, N' = N * S (Table 1, Gated
    Attention and DeepAttnMISL on multiple scales); ``sum``: the features of one location added
    across scales (MS-DA-MIL); ``concat``: concatenated across scales, D' = S * D (DS-MIL).
    """
    batch, n, s, d = features.shape
    if scale_input == "single":
        if not 0 <= scale_index < s:
            raise ValueError(f"scale_index must be in 0..{s - 1}, got {scale_index}")
        return features[:, :, scale_index], mask
    if scale_input == "instances":
        return features.reshape(batch, n * s, d), mask.repeat_interleave(s, dim=1)
    if scale_input == "sum":
        return features.sum(dim=2), mask
    if scale_input == "concat":
        return features.reshape(batch, n, s * d), mask
    raise ValueError(f"scale_input must be one of {SCALE_INPUTS}, got {scale_input!r}")


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``mask``; masked entries get exactly 0."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


# --------------------------------------------------------------------------- building blocks


class MIFCN(nn.Module):
    """MI-FCN of DeepAttnMISL: a 1x1 convolution (a per-instance linear layer) and ReLU."""

    def __init__(self, in_dim: int, out_dim: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class CrossScaleAttention(nn.Module):
    """Cross-scale attention (eq. 3): a score per scale from two 1x1 layers, L -> M -> 1.

    a_s = softmax_s(W^T act(V f_s)) with ``softmax=True`` (the paper); the raw scores
    W^T act(V f_s) with ``softmax=False`` (the authors' main code). ``activation`` is ReLU in
    eq. 3 and the reference row of Table 2; tanh is Table 2's alternative.
    """

    def __init__(
        self, dim: int = 64, hidden_dim: int = 32, activation: str = "relu", softmax: bool = True
    ) -> None:
        super().__init__()
        if activation not in SCALE_ACTIVATIONS:
            raise ValueError(
                f"scale_activation must be one of {tuple(SCALE_ACTIVATIONS)}, got {activation!r}"
            )
        self.score = nn.Sequential(
            nn.Linear(dim, hidden_dim),  # V
            SCALE_ACTIVATIONS[activation](),
            nn.Linear(hidden_dim, 1),  # W
        )
        self.softmax = softmax

    def forward(self, scale_features: torch.Tensor) -> torch.Tensor:
        """``scale_features`` f_s: (B, N, S, L) -> scale attention a_s: (B, N, S)."""
        scores = self.score(scale_features).squeeze(-1)
        return torch.softmax(scores, dim=-1) if self.softmax else scores  # eq. 3


class AttentionPooling(nn.Module):
    """Attention-based MIL pooling over a bag's instances (Ilse et al. 2018; DeepAttnMISL).

    Gated: a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))); ungated: softmax_k(w^T tanh(V h_k)).
    The softmax runs over the real instances only, so padding gets exactly zero weight.
    """

    def __init__(self, dim: int, hidden_dim: int, gated: bool = True) -> None:
        super().__init__()
        self.tanh_branch = nn.Linear(dim, hidden_dim)  # V
        self.gate = nn.Linear(dim, hidden_dim) if gated else None  # U
        self.weight = nn.Linear(hidden_dim, 1)  # w

    def scores(self, instances: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores w^T (tanh(V h_k) [* sigmoid(U h_k)]) (..., N) of h_k (..., N, L)."""
        hidden = torch.tanh(self.tanh_branch(instances))
        if self.gate is not None:
            hidden = hidden * torch.sigmoid(self.gate(instances))
        return self.weight(hidden).squeeze(-1)

    def weights(self, instances: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention a_k (B, N) of instances h_k (B, N, L); sums to 1 over each bag."""
        return masked_softmax(self.scores(instances), mask)

    def forward(
        self, instances: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bag embedding sum_k a_k h_k (B, L) and the attention (B, N)."""
        attention = self.weights(instances, mask)
        return torch.einsum("bn,bnl->bl", attention, instances), attention


def classifier_head(dim: int, hidden_dim: int | None, dropout: float) -> nn.Module:
    """DeepAttnMISL's head Linear -> ReLU -> Dropout -> Linear to one logit; a single Linear
    when ``hidden_dim`` is None (Ilse et al.'s classifier)."""
    if hidden_dim is None:
        return nn.Linear(dim, 1)
    return Mlp(dim, hidden_dim, 1, act_layer=nn.ReLU, drop=(dropout, 0.0))


class BagLossMixin:
    """Eq. 6: the negative log-likelihood of the bag label, BCE on the logit."""

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the batch and the logits (B,)."""
        logits = self(batch)
        return F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype)), logits


# --------------------------------------------------------------------------- models


class CrossScaleMIL(BagLossMixin, nn.Module):
    """CS-MIL (Fig. 2c) with the switches of Tables 2 and 3.

    ``shared_encoder``: one E_MS for all scales (the paper) or one per scale; ``scale_activation``
    and ``scale_softmax``: eq. 3's hidden activation and normalisation; ``fusion``: learned
    cross-scale attention (eq. 4), or the fixed 1:1:1 mean-vector or concatenation of Table 3.
    """

    num_classes = 1  # one logit; sigmoid for the probability of the positive class

    def __init__(
        self,
        in_dim: int = 2048,
        *,
        num_scales: int = 3,
        embed_dim: int = 64,
        attention_dim: int = 32,
        hidden_dim: int = 32,
        dropout: float = 0.5,
        shared_encoder: bool = True,
        scale_activation: str = "relu",
        scale_softmax: bool = True,
        fusion: str = "attention",
        gated: bool = True,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.num_scales, self.fusion = num_scales, fusion
        # eq. 2: E_MS, one siamese MI-FCN for every scale, or one per scale (Table 2)
        if shared_encoder:
            self.encoder: nn.Module = MIFCN(in_dim, embed_dim)
        else:
            self.encoder = nn.ModuleList(MIFCN(in_dim, embed_dim) for _ in range(num_scales))
        if fusion == "attention":
            self.scale_attention = CrossScaleAttention(
                embed_dim, attention_dim, scale_activation, scale_softmax
            )
        fused_dim = embed_dim * num_scales if fusion == "concat" else embed_dim
        self.pooling = AttentionPooling(fused_dim, attention_dim, gated)
        self.head = classifier_head(fused_dim, hidden_dim, dropout)
        self.num_features = fused_dim

    def encode_scales(self, features: torch.Tensor) -> torch.Tensor:
        """f_s = E_MS(F_s) for every scale (eq. 2): (B, N, S, D) -> (B, N, S, L)."""
        if isinstance(self.encoder, nn.ModuleList):
            return torch.stack(
                [encoder(features[:, :, s]) for s, encoder in enumerate(self.encoder)], dim=2
            )
        return self.encoder(features)

    def fuse(self, scale_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-scale representation F_cs (B, N, L') and the scale weights (B, N, S)."""
        if self.fusion == "attention":
            scale_attention = self.scale_attention(scale_features)  # eq. 3
            fused = (scale_attention[..., None] * scale_features).sum(dim=2)  # eq. 4
            return fused, scale_attention
        fixed = scale_features.new_full(scale_features.shape[:3], 1.0 / self.num_scales)
        if self.fusion == "mean":  # Table 3: eq. 4 with fixed a_s = 1/S
            return scale_features.mean(dim=2), fixed
        return scale_features.flatten(2), fixed  # Table 3: concatenation, 1:1:1

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bag embedding ``bag`` (B, L'), ``instance`` attention (B, N), ``scale`` (B, N, S)."""
        features, mask = checked_batch(batch)
        if features.shape[2] != self.num_scales:
            raise ValueError(f"model expects {self.num_scales} scales, got {features.shape[2]}")
        fused, scale_attention = self.fuse(self.encode_scales(features))
        bag, instance_attention = self.pooling(fused, mask)  # eq. 5: pooling operator C
        return {"bag": bag, "instance": instance_attention, "scale": scale_attention}

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features["bag"]).squeeze(-1)  # eq. 5: Y_pred (as a logit)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))

    @torch.no_grad()
    def attention(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Instance attention (B, N) and cross-scale attention a_s (B, N, S) for attention maps
        (Section 3.3); with fixed fusion ``scale`` holds the fixed 1/S."""
        features = self.forward_features(batch)
        return {"instance": features["instance"], "scale": features["scale"]}


class AttentionMIL(BagLossMixin, nn.Module):
    """DeepAttnMISL (and Ilse et al.'s gated attention MIL) on scale-agnostic instances.

    MI-FCN embedding, attention pooling over the bag, classifier head. ``scale_input`` says how
    the S scales become instances (see ``scale_instances``); ``hidden_dim=None`` gives
    Ilse et al.'s single linear classifier instead of DeepAttnMISL's two-layer head.
    """

    num_classes = 1

    def __init__(
        self,
        in_dim: int = 2048,
        *,
        scale_input: str = "single",
        scale_index: int = 0,
        embed_dim: int = 64,
        attention_dim: int = 32,
        hidden_dim: int | None = 32,
        dropout: float = 0.5,
        gated: bool = True,
    ) -> None:
        super().__init__()
        if scale_input not in ("single", "instances", "sum"):
            raise ValueError(
                f"scale_input must be 'single', 'instances' or 'sum', got {scale_input!r}"
            )
        self.scale_input, self.scale_index = scale_input, scale_index
        self.encoder = MIFCN(in_dim, embed_dim)
        self.pooling = AttentionPooling(embed_dim, attention_dim, gated)
        self.head = classifier_head(embed_dim, hidden_dim, dropout)
        self.num_features = embed_dim

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bag embedding ``bag`` (B, L) and ``instance`` attention per location (B, N).

        With ``scale_input="instances"`` the attention over the N * S instances is also given
        as ``instance_scale`` (B, N, S); ``instance`` is its sum over scales.
        """
        features, mask = checked_batch(batch)
        instances, instance_mask = scale_instances(
            features, mask, self.scale_input, self.scale_index
        )
        bag, attention = self.pooling(self.encoder(instances), instance_mask)
        if self.scale_input != "instances":
            return {"bag": bag, "instance": attention}
        per_scale = attention.reshape(features.shape[:3])
        return {"bag": bag, "instance": per_scale.sum(dim=2), "instance_scale": per_scale}

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features["bag"]).squeeze(-1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))

    @torch.no_grad()
    def attention(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Instance attention (B, N); per (location, scale) as well for pooled scales."""
        features = self.forward_features(batch)
        return {k: v for k, v in features.items() if k != "bag"}


class DSMIL(nn.Module):
    """DS-MIL (Li et al. 2021) on features concatenated across scales.

    Instance stream: a linear instance classifier; its highest-scoring real instance m is the
    critical instance and its score the max-pooling logit c_m. Bag stream: queries
    q_i = W_q h_i (two layers with tanh, as the DS-MIL code's ``nonlinear=True``), attention
    U_i = softmax_i(<q_i, q_m> / sqrt(|q|)) over the real instances, bag embedding
    b = sum_i U_i h_i (``passing_v=False``: v_i = h_i), bag logit c_b = W_b b. The returned
    logit is (c_m + c_b) / 2, DS-MIL's test-time score; the loss is DS-MIL's
    0.5 BCE(c_m) + 0.5 BCE(c_b).
    """

    num_classes = 1

    def __init__(self, in_dim: int = 2048, *, num_scales: int = 3, query_dim: int = 128) -> None:
        super().__init__()
        self.num_scales = num_scales
        dim = in_dim * num_scales
        self.instance_classifier = nn.Linear(dim, 1)
        self.query = nn.Sequential(
            nn.Linear(dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.bag_classifier = nn.Linear(dim, 1)  # DS-MIL's Conv1d(1, 1, kernel_size=dim)
        self.num_features = dim

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bag embedding ``bag`` (B, S*D), ``max_logit`` (B,), ``instance`` attention (B, N)
        and ``instance_logit`` (B, N) of the instance classifier."""
        features, mask = checked_batch(batch)
        if features.shape[2] != self.num_scales:
            raise ValueError(f"model expects {self.num_scales} scales, got {features.shape[2]}")
        instances, _ = scale_instances(features, mask, "concat")
        instance_logit = self.instance_classifier(instances).squeeze(-1)
        critical = instance_logit.masked_fill(~mask, float("-inf")).argmax(dim=1)
        rows = torch.arange(len(critical), device=critical.device)
        queries = self.query(instances)
        similarity = torch.einsum("bnq,bq->bn", queries, queries[rows, critical])
        attention = masked_softmax(similarity / math.sqrt(queries.shape[-1]), mask)
        return {
            "bag": torch.einsum("bn,bnd->bd", attention, instances),
            "max_logit": instance_logit[rows, critical],
            "instance": attention,
            "instance_logit": instance_logit,
        }

    def stream_logits(
        self, features: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The max-pooling logit c_m and the bag logit c_b, each (B,)."""
        return features["max_logit"], self.bag_classifier(features["bag"]).squeeze(-1)

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        max_logit, bag_logit = self.stream_logits(features)
        return (max_logit + bag_logit) / 2

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """DS-MIL's loss, the mean of the two streams' BCE, and the combined logits (B,)."""
        features = self.forward_features(batch)
        max_logit, bag_logit = self.stream_logits(features)
        label = batch["label"].to(bag_logit.dtype)
        loss = 0.5 * F.binary_cross_entropy_with_logits(max_logit, label)
        loss = loss + 0.5 * F.binary_cross_entropy_with_logits(bag_logit, label)
        return loss, (max_logit + bag_logit) / 2

    @torch.no_grad()
    def attention(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bag-stream attention (B, N) and the instance classifier's logits (B, N)."""
        features = self.forward_features(batch)
        return {"instance": features["instance"], "instance_logit": features["instance_logit"]}


# --------------------------------------------------------------------------- constructors


def tiny_example(n_bags: int = 3, n_instances: int = 5, in_dim: int = 16):
    """A small MIL model's arguments and a padded batch of bags (for the registry test)."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(n_bags, n_instances, dtype=torch.bool)
    mask[0, 3:] = False  # padded instances
    batch = {
        "features": torch.randn(n_bags, n_instances, len(SCALE_NAMES), in_dim, generator=generator),
        "mask": mask,
        "label": (torch.arange(n_bags) % 2).float(),
    }
    return {"in_dim": in_dim}, batch


@register_model(family="csmil", example=tiny_example)
def csmil(in_dim: int = 2048, **kwargs) -> CrossScaleMIL:
    """CS-MIL; options ``shared_encoder``, ``scale_activation``, ``scale_softmax``, ``fusion``,
    ``gated``, ``num_scales``, ``embed_dim``, ``attention_dim``, ``hidden_dim``, ``dropout``."""
    return CrossScaleMIL(in_dim, **kwargs)


@register_model(family="csmil", example=tiny_example)
def deepattnmisl(in_dim: int = 2048, **kwargs) -> AttentionMIL:
    """DeepAttnMISL on one scale (``scale_index``, default 0 = 20x) or, with
    ``scale_input="instances"``, on every scale's features as independent instances."""
    return AttentionMIL(in_dim, **kwargs)


@register_model(family="csmil", example=tiny_example)
def gated_attention(in_dim: int = 2048, **kwargs) -> AttentionMIL:
    """Gated attention MIL (Ilse et al. 2018): embedding L = 500, attention width 128, a linear
    classifier, on every scale's features as independent instances by default."""
    options = dict(
        scale_input="instances", embed_dim=500, attention_dim=128, hidden_dim=None, gated=True
    )
    return AttentionMIL(in_dim, **(options | kwargs))


@register_model(family="csmil", example=tiny_example)
def ms_da_mil(in_dim: int = 2048, **kwargs) -> AttentionMIL:
    """MS-DA-MIL as Table 1 runs it: one location's features added across scales, then
    DeepAttnMISL."""
    return AttentionMIL(in_dim, **({"scale_input": "sum"} | kwargs))


@register_model(family="csmil", example=tiny_example)
def ds_mil(in_dim: int = 2048, **kwargs) -> DSMIL:
    """DS-MIL on the features of one location concatenated across scales."""
    return DSMIL(in_dim, **kwargs)


# --------------------------------------------------------------------------- paper rows


class Variant(NamedTuple):
    """One row of the paper's tables: registered model, its options, how bags are drawn.

    ``clustering`` is the table's Clustering column: the scale whose features the k-means
    phenotype clusters are computed on ("multiple": patches of all scales clustered together),
    or None for bags drawn uniformly without clusters.
    """

    model: str
    options: dict
    clustering: str | None = "20x"


PAPER_VARIANTS: dict[str, Variant] = {
    # Table 1
    "DeepAttnMISL(20x)": Variant("deepattnmisl", {"scale_index": 0}, "20x"),
    "DeepAttnMISL(10x)": Variant("deepattnmisl", {"scale_index": 1}, "10x"),
    "DeepAttnMISL(5x)": Variant("deepattnmisl", {"scale_index": 2}, "5x"),
    "Gated Attention": Variant("gated_attention", {}, "multiple"),
    "DeepAttnMISL": Variant("deepattnmisl", {"scale_input": "instances"}, "multiple"),
    "MS-DA-MIL": Variant("ms_da_mil", {}),
    "DS-MIL": Variant("ds_mil", {}),
    "CS-MIL": Variant("csmil", {}),
    # Table 2 (rows: E_MS kernel sharing x activation of eq. 3); Sharing + ReLU is CS-MIL
    "Non-sharing, Tanh": Variant("csmil", {"shared_encoder": False, "scale_activation": "tanh"}),
    "Non-sharing, ReLU": Variant("csmil", {"shared_encoder": False}),
    "Sharing, Tanh": Variant("csmil", {"scale_activation": "tanh"}),
    # Table 3 (fusion x clustering); CS-Attention (Ours) is CS-MIL
    "Mean-vector": Variant("csmil", {"fusion": "mean"}),
    "Concatenation": Variant("csmil", {"fusion": "concat"}),
    "CS-Attention (Naive)": Variant("csmil", {}, None),
}
