"""MSAN's multi-scale attention subnet on OM, IM and a bag of TEM images (CMUS-Net Table 4).

Paper: X. He, Y. Deng, L. Fang and Q. Peng, "Multi-Modal Retinal Image Classification With
Modality-Specific Attention Network", IEEE Transactions on Medical Imaging 40(6), 2021. MSAN
extracts fundus features with a multi-scale attention subnet and OCT features with a
region-guided attention subnet, concatenates the two modality-specific features and classifies
the multi-modal feature. CMUS-Net (Long et al., MedIA 2025, Sec. 4.3) uses the multi-scale
attention subnet for every modality, since the region-guided one is designed for 3D OCT; the
CMUS authors' adaptation (MultiModal_lkx, ``MyModel/MSAN/MultiScaleAttn_3M3Loss_240926.py``)
is followed for the structure of the subnet and the loss.

Multi-scale attention subnet: a convolutional backbone (ResNet-18 in MSAN and in the CMUS
adaptation) with a position attention module (the non-local spatial attention of DANet, with a
learnable residual weight γ) after each of its four residual stages, so attention reweighs the
features at every scale, from local detail (stride 4) to global layout (stride 32); the last
map is average-pooled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import timm
import torch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F

from mmdiag.models.cmus import (
    MODALITIES,
    PAPER_LOSS_WEIGHTS,
    bag_mean,
    checked_modalities,
    tiny_example,
    warn_if_randomly_initialised,
)
from mmdiag.models.encoders import load_encoder_checkpoint
from mmdiag.models.registry import register_model


class PositionAttention(nn.Module):
    """DANet's position attention module, as MSAN uses it: every position attends to every
    other, ``out = γ · V softmax(Q K^T)^T + x`` with 1x1 projections Q, K to C/8 channels and V
    to C (no 1/sqrt(d) scaling); γ starts at ``gamma_init`` (0 in DANet and MSAN, so the subnet
    starts as its backbone)."""

    def __init__(self, channels: int, gamma_init: float = 0.0) -> None:
        super().__init__()
        reduced = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, reduced, 1)
        self.key = nn.Conv2d(channels, reduced, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C/8)
        k = self.key(x).flatten(2).transpose(1, 2)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, N, C)
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # softmax(QK^T) V
        return self.gamma * attended.transpose(1, 2).reshape(x.shape) + x


def create_feature_encoder(encoder: str, checkpoint: str | None) -> nn.Module:
    """A timm convolutional encoder in its ``features_only`` form (a FeatureListNet).

    ``checkpoint`` is a local state dict with the names of that form; for ResNets they are
    those of the classifier model (a timm or torchvision ImageNet ResNet loads as it is).
    """
    try:
        model = timm.create_model(encoder, pretrained=False, features_only=True)
    except RuntimeError as error:
        raise ValueError(f"unknown timm encoder {encoder!r}: {error}") from None
    if checkpoint is not None:
        load_encoder_checkpoint(model, checkpoint, name=encoder)
    return model


def feature_levels(features: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (stride, channels)}`` of a FeatureListNet's levels, in order."""
    info = features.feature_info
    levels = zip(features.return_layers, info.reduction(), info.channels(), strict=True)
    return {name: (stride, channels) for name, stride, channels in levels}


def attended_layers(features: nn.Module) -> dict[str, int]:
    """The stages MSAN attends after, with their channels: every feature level of stride 4
    or more (the four residual stages of a ResNet; not its stem)."""
    levels = feature_levels(features).items()
    return {name: channels for name, (stride, channels) in levels if stride >= 4}


class MultiScaleAttentionSubnet(nn.Module):
    """MSAN's multi-scale attention subnet: the backbone ``encoder`` (a timm ``features_only``
    model) with a :class:`PositionAttention` after each of its stages of stride >= 4; returns
    the average-pooled last map ``(n, C)``.

    ``attention`` holds the modules by stage name.
    """

    def __init__(self, encoder: nn.Module, gamma_init: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        layers = attended_layers(encoder)
        self.attention = nn.ModuleDict(
            {name: PositionAttention(channels, gamma_init) for name, channels in layers.items()}
        )
        self.last_layer = list(layers)[-1]
        self.num_features = layers[self.last_layer]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for name, module in self.encoder.items():
            x = module(x)
            if name in self.attention:
                x = self.attention[name](x)  # position attention at this scale
            if name == self.last_layer:
                break
        return x.mean(dim=(2, 3))


class CMUSMSAN(nn.Module):
    """MSAN on OM, IM and the TEM bag: a multi-scale attention subnet per modality (unshared),
    the modality features concatenated (MSAN's fusion) and classified by two fully connected
    layers, with one linear classifier per modality for the auxiliary losses.

    Loss: the fusion cross-entropy plus the modality cross-entropies weighted as CMUS-Net's
    eq. 15 (OM 0.3, IM 0.5, TEM 0.2), as the CMUS authors trained MSAN (MSAN's own weighs its
    two subnets' losses; ``weighted_loss=False`` keeps the fusion loss alone).

    Choices: the TEM bag is reduced to the mean of its images' pooled features (the CMUS
    authors fed one TEM image per patient; the mean uses them all, as the Table 5 baselines);
    the backbone is any convolutional timm encoder (paper config ResNet-18, as MSAN and the CMUS
    adaptation; the latter trained it from random weights).
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        encoder: str = "resnet18",
        modalities: Sequence[str] = MODALITIES,
        weighted_loss: bool = True,
        loss_weights: Mapping[str, float] = PAPER_LOSS_WEIGHTS,
        hidden_dim: int = 128,
        dropout: float = 0.5,
        gamma_init: float = 0.0,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.modalities = checked_modalities(modalities)
        self.weighted_loss = weighted_loss
        self.loss_weights = {m: float(loss_weights.get(m, 0.0)) for m in self.modalities}
        self.encoders = nn.ModuleDict(
            {
                m: MultiScaleAttentionSubnet(
                    create_feature_encoder(encoder, checkpoint), gamma_init
                )
                for m in self.modalities
            }
        )
        warn_if_randomly_initialised(encoder, checkpoint)
        dim = self.encoders[self.modalities[0]].num_features
        self.num_features = dim * len(self.modalities)
        self.head = Mlp(
            self.num_features, hidden_dim, num_classes, act_layer=nn.ReLU, drop=(dropout, 0.0)
        )
        self.modality_heads = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
                for m in self.modalities
            }
        )

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pooled multi-scale-attention features per modality; the TEM bag averaged."""
        n_patients = batch["om"].shape[0]
        features = {}
        for modality in self.modalities:
            pooled = self.encoders[modality](batch[modality.lower()])
            if modality == "TEM":
                pooled = bag_mean(pooled, batch["tem_patient"], n_patients)
            features[modality] = pooled
        return features

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """MSAN's fusion: the modality-specific features concatenated, then classified."""
        return self.head(torch.cat([features[m] for m in self.modalities], dim=1))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion cross-entropy plus the weighted modality cross-entropies; and the logits."""
        features = self.forward_features(batch)
        logits = self.forward_head(features)
        total = F.cross_entropy(logits, batch["label"])
        if self.weighted_loss:
            for modality, weight in self.loss_weights.items():
                modality_logits = self.modality_heads[modality](features[modality])
                total = total + weight * F.cross_entropy(modality_logits, batch["label"])
        return total, logits


def _tiny_msan_example() -> tuple[dict, dict[str, torch.Tensor]]:
    arguments, batch = tiny_example()
    return arguments | {"gamma_init": 0.5}, batch  # γ ≠ 0: every attention weight learns


@register_model(family="cmus", example=_tiny_msan_example)
def cmus_msan(num_classes: int = 3, **kwargs) -> CMUSMSAN:
    """MSAN's multi-scale attention subnet on OM, IM and the TEM bag (Tables 4 and 6)."""
    return CMUSMSAN(num_classes, **kwargs)
