"""CMUS-Net: cross-modal ultra-scale learning over OM, IM and a bag of TEM images.

Paper: K. Long et al., "Cross-modal ultra-scale learning with tri-modalities of renal biopsy
images for glomerular multi-disease auxiliary diagnosis", Medical Image Analysis, 2025.
Authors' code: https://github.com/SMU-GL-Group/MultiModal_lkx (branch ``Classification``,
commit 8ba0d37).

A batch holds, for B patients, one OM image and one IM image each and a variable-size bag of
TEM images: ``om`` (B, 3, H, W), ``im`` (B, 3, H, W), ``tem`` (N, 3, H, W) and
``tem_patient`` (N,), the index in 0..B-1 of the patient each TEM image belongs to.

Deliberate departures from the authors' public code (MultiModal_lkx@8ba0d37): four real heads
of d/4 channels in CMSA (the public code has one head and a reshape that mixes tokens and
channels); SMIL weights are computed after the outlier cut, so they never divide by zero or
turn NaN; logits are not passed through a ReLU; AUC uses softmax probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F

from mmdiag.models.crossformer import create_crossformer_encoder, is_crossformer_encoder
from mmdiag.models.encoders import create_encoder, load_encoder_checkpoint
from mmdiag.models.fpn import create_fpn_encoder, fpn_backbone
from mmdiag.models.hifuse import create_hifuse_encoder, is_hifuse_encoder
from mmdiag.models.registry import register_model

log = logging.getLogger(__name__)

MODALITIES = ("OM", "IM", "TEM")
FUSION_ATTENTIONS = ("cmsa", "none", "self", "modality", "bidirectional")
PAPER_LOSS_WEIGHTS = {"OM": 0.3, "IM": 0.5, "TEM": 0.2}  # alpha, beta, gamma of eq. 15


# --------------------------------------------------------------------------- building blocks


def checked_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """The requested modalities in canonical order (OM, IM, TEM); ValueError otherwise."""
    unknown = set(modalities) - set(MODALITIES)
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
    return tuple(m for m in MODALITIES if m in modalities)


_warned_random_init = False  # the random-initialisation warning is given once per process


def warn_if_randomly_initialised(encoder: str, checkpoint: str | None) -> None:
    """Warn (once per process) that a real encoder without ``checkpoint`` starts from
    random weights; the paper fine-tunes ImageNet-1K weights (Section 4.2). The tiny
    ``test_*`` encoders of the demo and the tests are meant to train from scratch. An FPN
    (``fpn_<backbone>``) takes its backbone's checkpoint."""
    global _warned_random_init
    architecture = fpn_backbone(encoder) or encoder  # an FPN's weights are its backbone's
    if checkpoint is not None or architecture.startswith("test_") or _warned_random_init:
        return
    _warned_random_init = True
    log.warning(
        "CMUS encoder %r has no checkpoint: it starts from random weights, while the paper "
        "fine-tunes ImageNet-1K weights. For paper numbers set the variant's `checkpoint:` "
        "to a local ImageNet checkpoint file of %r (.safetensors or a torch state dict); "
        "nothing is downloaded.",
        encoder,
        architecture,
    )


def gives_pooled_features_only(encoder: str) -> bool:
    """FPN, HiFuse and CrossFormer++ encoders (Tables 5-6) give pooled vectors, no token map."""
    return bool(fpn_backbone(encoder)) or non_timm_encoder(encoder) is not None


def non_timm_encoder(encoder: str) -> Callable[[str], nn.Module] | None:
    """The constructor of a HiFuse or CrossFormer++ encoder name, else None."""
    if is_hifuse_encoder(encoder):
        return create_hifuse_encoder
    if is_crossformer_encoder(encoder):
        return create_crossformer_encoder
    return None


def create_modality_encoder(encoder: str, checkpoint: str | None) -> nn.Module:
    """A timm encoder, the FPN encoder ``fpn_<timm backbone>``, a HiFuse or a CrossFormer++
    (Tables 5-6); ``checkpoint`` is a local state dict of the backbone (FPN) or the encoder."""
    if fpn_backbone(encoder):
        return create_fpn_encoder(encoder, checkpoint=checkpoint)
    constructor = non_timm_encoder(encoder)
    if constructor is None:
        return create_encoder(encoder, checkpoint=checkpoint)
    model = constructor(encoder)
    if checkpoint is not None:
        load_encoder_checkpoint(model, checkpoint, name=encoder)
    return model


def modality_encoders(
    encoder: str, modalities: Sequence[str], checkpoint: str | None
) -> nn.ModuleDict:
    """One unshared encoder per modality (E_OM, E_IM, E_TEM)."""
    encoders = nn.ModuleDict({m: create_modality_encoder(encoder, checkpoint) for m in modalities})
    warn_if_randomly_initialised(encoder, checkpoint)
    return encoders


def bag_mean(features: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Mean of the instance features of each bag: (N, ...) with bag ids (N,) -> (n_bags, ...)."""
    flat = features.reshape(features.shape[0], -1)
    sums = flat.new_zeros(n_bags, flat.shape[1]).index_add_(0, bag_index, flat)
    counts = torch.bincount(bag_index, minlength=n_bags).clamp_min(1).to(flat.dtype)
    return (sums / counts[:, None]).reshape(n_bags, *features.shape[1:])


def token_map(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's last feature map as tokens (B, T, C), whatever its layout.

    Convolutional timm models give (B, C, H, W), Swin (B, H, W, C) and ViTs (B, T, C) with
    ``num_prefix_tokens`` class/register tokens in front, which are dropped.
    """
    features = encoder.forward_features(images)
    if features.ndim == 4:
        if getattr(encoder, "output_fmt", "NCHW") == "NHWC":
            return features.flatten(1, 2)
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 3:
        return features[:, getattr(encoder, "num_prefix_tokens", 0) :]
    raise ValueError(f"{type(encoder).__name__} gives features of shape {tuple(features.shape)}")


def sparse_mil_aggregate(features: torch.Tensor, t: float = 1.5) -> torch.Tensor:
    """Sparse multi-instance aggregation of one patient's TEM instances (SMIL, eqs. 3-7).

    ``features`` is (n, ...) — one feature (vector or token map) per TEM image; returns one
    aggregate of the trailing shape. Distances, the selection and the weights are computed
    without gradient; gradients flow through the selected features.

    Edge cases (documented choices): n = 1 returns the single instance; with n = 2 the first
    instance is central (equal distance sums, lowest index) and the other is kept with weight 1;
    instances at distance 0 from the central one (duplicate images) share the whole weight
    equally, the limit of inverse-distance weights; when every other instance is cut,
    the central instance alone is returned.
    """
    n = features.shape[0]
    if n == 0:
        raise ValueError("sparse_mil_aggregate needs at least one instance")
    if n == 1:
        return features[0]
    with torch.no_grad():
        flat = features.detach().reshape(n, -1).double()
        distances = torch.cdist(flat[None], flat[None])[0]  # eq. 4: Euclidean distances
        central = int(torch.argmin(distances.sum(dim=1)))  # first index on ties
        upper = torch.triu_indices(n, n, offset=1)
        mean_distance = distances[upper[0], upper[1]].mean()  # eq. 5: mean pairwise distance
        to_central = distances[central]
        others = torch.arange(n) != central
        kept = others & (to_central <= t * mean_distance)  # eq. 6: drop outliers
        weights = torch.zeros(n, dtype=flat.dtype)
        if kept.any():
            duplicates = kept & (to_central == 0)
            if duplicates.any():
                weights[duplicates] = 1.0 / duplicates.sum()
            else:
                inverse = 1.0 / to_central[kept]  # eq. 7: inverse distance, normalised
                weights[kept] = inverse / inverse.sum()
        weights = weights.to(features.dtype)
    # eq. 7: f'_TEM = f_c + sum_i w_i f_i over the kept non-central instances
    weighted = (weights.view(n, *([1] * (features.ndim - 1))) * features).sum(dim=0)
    return features[central] + weighted


class CrossModalScaleAttention(nn.Module):
    """CMSA (eqs. 8-10): TEM tokens query the OM (or IM) tokens; heads concatenated + residual.

    Q = f'_TEM W_q, K = f_X W_k, V = f_X W_v with ``num_heads`` heads of d/h channels each;
    head_h = softmax(Q_h K_h^T / sqrt(d/h)) V_h (eq. 8); f'_X = Concat(heads) + f_X (eq. 9, 10).
    The token grids of the two modalities must have the same length (the same encoder
    architecture and input size), since the residual adds them token by token.
    """

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"feature width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        return tokens.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, tem: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``tem``: (B, T, d) aggregated TEM tokens; ``other``: (B, T, d) OM or IM tokens."""
        q = self._split_heads(self.query(tem))
        k, v = self._split_heads(self.key(other)), self._split_heads(self.value(other))
        heads = F.scaled_dot_product_attention(q, k, v)  # eq. 8, scale 1/sqrt(d/h)
        heads = heads.transpose(1, 2).reshape(other.shape)  # (B, T, h, d/h) -> (B, T, d)
        return heads + other  # eq. 9 / 10: residual


class ModalitySelfAttention(nn.Module):
    """Fig. 3 'self-attention': multi-head self-attention over the pooled modality vectors."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled``: (B, M, d), one vector per modality -> (B, M, d)."""
        attended, _ = self.attention(pooled, pooled, pooled, need_weights=False)
        return pooled + attended


class ModalityExcitation(nn.Module):
    """Fig. 3 'modality-based attention': squeeze-and-excitation over the modalities."""

    def __init__(self, dim: int, n_modalities: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(n_modalities * dim // reduction, 1)
        self.gate = nn.Sequential(
            nn.Linear(n_modalities * dim, hidden), nn.ReLU(), nn.Linear(hidden, n_modalities)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.gate(pooled.flatten(1)))  # (B, M)
        return pooled * weights[..., None]


class BidirectionalCrossAttention(nn.Module):
    """Fig. 3 'cross-modal attention': TEM and each micrometre modality attend to each other."""

    def __init__(self, dim: int, others: Sequence[str], num_heads: int = 4) -> None:
        super().__init__()
        self.to_other = nn.ModuleDict(
            {m: nn.MultiheadAttention(dim, num_heads, batch_first=True) for m in others}
        )
        self.to_tem = nn.ModuleDict(
            {m: nn.MultiheadAttention(dim, num_heads, batch_first=True) for m in others}
        )

    def forward(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tem, out = tokens["TEM"], dict(tokens)
        updates = []
        for modality, attention in self.to_other.items():
            other = tokens[modality]
            out[modality] = other + attention(other, tem, tem, need_weights=False)[0]
            updates.append(self.to_tem[modality](tem, other, other, need_weights=False)[0])
        out["TEM"] = tem + torch.stack(updates).mean(dim=0)
        return out


# --------------------------------------------------------------------------- models


class CMUSNet(nn.Module):
    """CMUS-Net with switchable parts, so every row of the paper's ablations is configuration.

    ``smil`` (off: mean of the TEM instances), ``fusion_attention`` (``cmsa`` as the paper;
    ``none``; or the alternatives of Fig. 3: ``self``, ``modality``, ``bidirectional``),
    ``weighted_loss`` (eqs. 13-15; off: the fusion loss alone) and the input ``modalities``
    (Table 3). With one modality the model degenerates into a unimodal classifier.
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        encoder: str = "swin_base_patch4_window7_224",
        modalities: Sequence[str] = MODALITIES,
        smil: bool = True,
        smil_threshold: float = 1.5,
        fusion_attention: str = "cmsa",
        num_heads: int = 4,
        weighted_loss: bool = True,
        loss_weights: Mapping[str, float] = PAPER_LOSS_WEIGHTS,
        hidden_dim: int = 128,
        dropout: float = 0.5,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if fusion_attention not in FUSION_ATTENTIONS:
            raise ValueError(
                f"fusion_attention must be one of {FUSION_ATTENTIONS}, got {fusion_attention!r}"
            )
        if gives_pooled_features_only(encoder):
            raise ValueError(
                f"encoder {encoder!r} gives pooled features, not the token map CMUS-Net's "
                "attention needs; use it with model cmus_concat"
            )
        self.num_classes = num_classes
        self.modalities = checked_modalities(modalities)
        self.smil, self.smil_threshold = smil, smil_threshold
        self.fusion_attention = fusion_attention
        self.weighted_loss = weighted_loss
        # eq. 15's weights of the modalities used, as configured (the paper's by default): a
        # unimodal or bimodal variant keeps them as they are, not renormalised to sum to 1
        self.loss_weights = {m: float(loss_weights.get(m, 0.0)) for m in self.modalities}
        self.encoders = modality_encoders(encoder, self.modalities, checkpoint)
        dim = self.encoders[self.modalities[0]].num_features
        micrometre = [m for m in ("OM", "IM") if m in self.modalities]
        has_tem = "TEM" in self.modalities
        if fusion_attention == "cmsa" and has_tem and micrometre:
            self.cmsa = nn.ModuleDict(
                {m: CrossModalScaleAttention(dim, num_heads) for m in micrometre}
            )
        elif fusion_attention == "bidirectional" and has_tem and micrometre:
            self.bidirectional = BidirectionalCrossAttention(dim, micrometre, num_heads)
        elif fusion_attention == "self":
            self.self_attention = ModalitySelfAttention(dim, num_heads)
        elif fusion_attention == "modality":
            self.excitation = ModalityExcitation(dim, len(self.modalities))
        # eq. 11-12: a classifier of two fully connected layers on the fused features
        fused = dim * len(self.modalities)
        self.head = Mlp(fused, hidden_dim, num_classes, act_layer=nn.ReLU, drop=(dropout, 0.0))
        # eq. 14: one fully connected layer per modality for the weighted loss
        self.modality_heads = nn.ModuleDict(
            {m: nn.Linear(dim, num_classes) for m in self.modalities}
        )
        self.num_features = fused

    # -- features --------------------------------------------------------------------------

    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token maps (B, T, d) per modality; TEM bags aggregated by SMIL or the mean."""
        tokens = {}
        for modality in self.modalities:
            encoder = self.encoders[modality]
            if modality != "TEM":
                tokens[modality] = token_map(encoder, batch[modality.lower()])
                continue
            instances = token_map(encoder, batch["tem"])  # eq. 3: the bag B
            n_patients = batch["om"].shape[0]
            if self.smil:
                tokens["TEM"] = torch.stack(
                    [
                        sparse_mil_aggregate(
                            instances[batch["tem_patient"] == p], self.smil_threshold
                        )
                        for p in range(n_patients)
                    ]
                )
            else:
                tokens["TEM"] = bag_mean(instances, batch["tem_patient"], n_patients)
        return tokens

    def interact(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-modal interaction on token maps, then pooling: (B, d) per modality."""
        if hasattr(self, "cmsa"):  # eqs. 8-10
            tokens = dict(tokens) | {
                m: cmsa(tokens["TEM"], tokens[m]) for m, cmsa in self.cmsa.items()
            }
        elif hasattr(self, "bidirectional"):
            tokens = self.bidirectional(tokens)
        pooled = {m: tokens[m].mean(dim=1) for m in self.modalities}
        if hasattr(self, "self_attention") or hasattr(self, "excitation"):
            stacked = torch.stack([pooled[m] for m in self.modalities], dim=1)
            module = getattr(self, "self_attention", None) or self.excitation
            stacked = module(stacked)
            pooled = {m: stacked[:, i] for i, m in enumerate(self.modalities)}
        return pooled

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pooled per-modality features f'_OM, f'_IM, f'_TEM after SMIL and interaction."""
        return self.interact(self.encode(batch))

    def forward_head(self, pooled: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fusion logits: Concat(f'_OM, f'_TEM, f'_IM) (eq. 11) -> classifier (eq. 12)."""
        order = [m for m in ("OM", "TEM", "IM") if m in self.modalities]
        return self.head(torch.cat([pooled[m] for m in order], dim=1))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))

    # -- loss ------------------------------------------------------------------------------

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss (eq. 15 with weighted loss on, eq. 13 alone off) and the fusion logits.

        Multi-class cross-entropy stands for the binary form the paper writes (eqs. 13-14).
        Unimodal and bimodal variants keep the auxiliary head losses of the modalities they
        use with their eq. 15 weights (the paper's by default, e.g. IM + TEM: 0.5 and 0.2),
        which are not renormalised to sum to one; the fusion loss keeps weight 1.
        """
        pooled = self.forward_features(batch)
        logits = self.forward_head(pooled)
        total = F.cross_entropy(logits, batch["label"])  # eq. 13: L_fusion
        if self.weighted_loss:
            for modality, weight in self.loss_weights.items():  # eq. 14-15
                modality_logits = self.modality_heads[modality](pooled[modality])
                total = total + weight * F.cross_entropy(modality_logits, batch["label"])
        return total, logits


class CMUSConcat(nn.Module):
    """Concatenation fusion of Tables 5 and 6: one encoder per modality, its pooled features.

    One unshared encoder per modality; the TEM bag is reduced to the mean of its instance
    features; the features are concatenated and classified by two fully connected layers.
    Works with every timm classifier backbone (VGG, DenseNet, Inception, CrossViT ...), which
    need not give a token map, with the FPN encoders ``fpn_<timm backbone>`` (the FPN row,
    :mod:`mmdiag.models.fpn`), ``hifuse_tiny`` (the HiFuse row, :mod:`mmdiag.models.hifuse`)
    and ``crossformerpp_small`` (the CrossFormer++ row, :mod:`mmdiag.models.crossformer`).
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        encoder: str = "swin_base_patch4_window7_224",
        hidden_dim: int = 128,
        dropout: float = 0.5,
        modalities: Sequence[str] = MODALITIES,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.modalities = checked_modalities(modalities)
        self.encoders = modality_encoders(encoder, self.modalities, checkpoint)
        self.num_features = sum(e.num_features for e in self.encoders.values())
        self.head = Mlp(
            self.num_features, hidden_dim, num_classes, act_layer=nn.ReLU, drop=(dropout, 0.0)
        )

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pooled features per modality; the TEM bag averaged per patient."""
        n_patients = batch["om"].shape[0]
        pooled = {}
        for modality in self.modalities:
            encoder = self.encoders[modality]
            if modality == "TEM":
                pooled["TEM"] = bag_mean(encoder(batch["tem"]), batch["tem_patient"], n_patients)
            else:
                pooled[modality] = encoder(batch[modality.lower()])
        return pooled

    def forward_head(self, pooled: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([pooled[m] for m in self.modalities], dim=1))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))


# --------------------------------------------------------------------------- constructors


def tiny_example(
    n_patients: int = 2, tem_counts: Sequence[int] = (2, 3), size_px: int = 32
) -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny CMUS model's arguments and a batch of ``n_patients`` (for the registry test)."""
    generator = torch.Generator().manual_seed(0)
    batch = {
        "om": torch.randn(n_patients, 3, size_px, size_px, generator=generator),
        "im": torch.randn(n_patients, 3, size_px, size_px, generator=generator),
        "tem": torch.randn(sum(tem_counts), 3, size_px, size_px, generator=generator),
        "tem_patient": torch.repeat_interleave(torch.arange(n_patients), torch.tensor(tem_counts)),
        "label": torch.arange(n_patients) % 3,
    }
    return {"num_classes": 3, "encoder": "test_convnext", "hidden_dim": 16}, batch


@register_model(family="cmus", example=tiny_example)
def cmus_net(num_classes: int = 3, **kwargs) -> CMUSNet:
    """CMUS-Net (SMIL + CMSA + weighted loss by default; every part switchable)."""
    return CMUSNet(num_classes, **kwargs)


@register_model(family="cmus", example=tiny_example)
def cmus_concat(num_classes: int = 3, **kwargs) -> CMUSConcat:
    """Concatenation baseline of Table 5 with any timm encoder."""
    return CMUSConcat(num_classes, **kwargs)
