"""MDL-IIA adapted to OM + IM + a TEM bag (a multi-modal row of CMUS-Net Tables 4 and 6).

Paper: T. Zhang, T. Tan, L. Han et al., "Predicting breast cancer types on and beyond molecular
level in a multi-modal fashion", npj Breast Cancer 9:16, 2023 (doi 10.1038/s41523-023-00517-2).
Authors' code (TensorFlow): https://github.com/Netherlands-Cancer-Institute/
Multimodal_attention_DeepLearning (``Models_MDL-IIA_4-category.py``, ``Attention_layers.py``).

MDL-IIA (multi-modal deep learning with intra- and inter-modality attention) reads two
mammography views (MLO, CC) and an ultrasound image with ResNet-50 branches. Intra-modality
attention is a self-attention over the feature maps of one modality (the two mammography views
side by side; the ultrasound alone), inter-modality attention a self-attention over the maps of
all three side by side; a channel and spatial attention (CSA) then refines the three maps
stacked along the channels, and the classifier is global average pooling per map,
concatenation, a 512-unit ReLU layer, dropout 0.3 and a softmax layer.

Adaptation (CMUS-Net, Long et al., MedIA 2025, Sec. 4.3: "inputs are replaced with OM, IM and
TEM images"): OM and IM take the places of MLO and CC (the two micrometre light-microscopy
images form the intra-modality pair) and the TEM bag that of the ultrasound image. Choices:
one unshared encoder per modality (MLO and CC share one mammography backbone; OM and IM are
different imaging); the attention modules follow the encoder's last stage (the code places
them after ResNet-50's fourth stage, ``conv4``, and runs the fifth afterwards), so any timm
encoder fits; a patient's TEM feature map is the mean of its TEM images' maps (the ultrasound
branch reads one image). The paper-scale encoder is ResNet-50, MDL-IIA's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from timm.layers import Mlp
from torch import nn

from mmdiag.models.cmus import (
    MODALITIES,
    bag_mean,
    checked_modalities,
    gives_pooled_features_only,
    modality_encoders,
)
from mmdiag.models.registry import register_model

MICROMETRE = ("OM", "IM")  # the intra-modality pair (MLO and CC in MDL-IIA)


# --------------------------------------------------------------------------- building blocks


def feature_map(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's last feature map as (B, C, H, W), whatever its layout.

    Convolutional timm models give NCHW, Swin NHWC, ViTs (B, T, C) tokens with
    ``num_prefix_tokens`` in front (dropped; the rest must form a square grid).
    """
    features = encoder.forward_features(images)
    if features.ndim == 4:
        if getattr(encoder, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features
    if features.ndim == 3:
        tokens = features[:, getattr(encoder, "num_prefix_tokens", 0) :]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens do not form a square feature map")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    raise ValueError(f"{type(encoder).__name__} gives features of shape {tuple(features.shape)}")


class SelfAttention2d(nn.Module):
    """The self-attention of MDL-IIA's intra- and inter-modality modules (SAGAN form).

    f = W_f x, g = W_g x (1x1 convolutions to C/8), h = W_h x (to C); at every pair of
    positions beta = softmax_j(g_i . f_j) (no scaling, as the code), o_i = sum_j beta_ij h_j,
    and the output is gamma * o + x with gamma learnt and starting at 0 (the code's
    ``Self_Attention``).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        reduced = max(channels // 8, 1)
        self.f = nn.Conv2d(channels, reduced, 1)
        self.g = nn.Conv2d(channels, reduced, 1)
        self.h = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output (B, C, H, W) and the weights beta (B, HW, HW)."""
        f, g, h = (conv(x).flatten(2) for conv in (self.f, self.g, self.h))  # (B, c, HW)
        beta = torch.softmax(g.transpose(1, 2) @ f, dim=-1)  # queries g, keys f
        o = (h @ beta.transpose(1, 2)).view_as(x)  # o_i = sum_j beta_ij h_j
        return self.gamma * o + x, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)[0]


def attend_side_by_side(
    attention: SelfAttention2d, maps: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Self-attention over maps placed side by side (concatenated along the width), split back."""
    joined = attention(torch.cat(list(maps), dim=-1))
    return list(joined.split([m.shape[-1] for m in maps], dim=-1))


class ChannelSpatialAttention(nn.Module):
    """MDL-IIA's channel and spatial attention (CSA) with its residual.

    Channel: a = sigmoid(MLP(maxpool x) + MLP(avgpool x)) with a shared MLP C -> rC -> C (both
    ReLU, r = 0.5, as the code); x_c = a * x. Spatial: s = sigmoid(conv3x3([max_c x_c,
    mean_c x_c])). Output: x_c * s + x.
    """

    def __init__(self, channels: int, reduction_ratio: float = 0.5) -> None:
        super().__init__()
        hidden = max(int(channels * reduction_ratio), 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.ReLU()
        )
        self.spatial = nn.Conv2d(2, 1, 3, padding=1, bias=False)

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(x.amax(dim=(2, 3))) + self.mlp(x.mean(dim=(2, 3))))

    def spatial_weights(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refined = x * self.channel_weights(x)[:, :, None, None]
        return refined * self.spatial_weights(refined) + x


# --------------------------------------------------------------------------- model


class MDLIIA(nn.Module):
    """MDL-IIA over OM, IM and the TEM bag (see the module docstring for the adaptation).

    With a subset of the modalities the intra-modality pair holds the micrometre ones present.
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        encoder: str = "resnet50",
        modalities: Sequence[str] = MODALITIES,
        hidden_dim: int = 512,
        dropout: float = 0.3,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if gives_pooled_features_only(encoder):
            raise ValueError(
                f"encoder {encoder!r} gives pooled features, not the feature map MDL-IIA's "
                "attention needs"
            )
        self.num_classes = num_classes
        self.modalities = checked_modalities(modalities)
        self.encoders = modality_encoders(encoder, self.modalities, checkpoint)
        channels = self.encoders[self.modalities[0]].num_features
        self.micrometre = [m for m in MICROMETRE if m in self.modalities]
        # intra-modality attention: the micrometre pair side by side, and TEM alone
        self.intra = nn.ModuleDict()
        if self.micrometre:
            self.intra["micrometre"] = SelfAttention2d(channels)
        if "TEM" in self.modalities:
            self.intra["TEM"] = SelfAttention2d(channels)
        self.inter = SelfAttention2d(channels)  # inter-modality attention over all maps
        self.csa = ChannelSpatialAttention(channels * len(self.modalities))
        self.num_features = channels * len(self.modalities)
        self.head = Mlp(
            self.num_features, hidden_dim, num_classes, act_layer=nn.ReLU, drop=(dropout, 0.0)
        )

    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feature maps (B, C, H, W) per modality; the TEM bag's maps averaged per patient."""
        maps = {}
        for modality in self.modalities:
            encoder = self.encoders[modality]
            if modality == "TEM":
                instances = feature_map(encoder, batch["tem"])
                maps["TEM"] = bag_mean(instances, batch["tem_patient"], batch["om"].shape[0])
            else:
                maps[modality] = feature_map(encoder, batch[modality.lower()])
        return maps

    def attend(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Intra-, then inter-modality attention, then CSA on the maps stacked by channel."""
        maps = dict(maps)
        if self.micrometre:
            attended = attend_side_by_side(
                self.intra["micrometre"], [maps[m] for m in self.micrometre]
            )
            maps |= dict(zip(self.micrometre, attended, strict=True))
        if "TEM" in maps:
            maps["TEM"] = self.intra["TEM"](maps["TEM"])
        attended = attend_side_by_side(self.inter, [maps[m] for m in self.modalities])
        refined = self.csa(torch.cat(attended, dim=1))
        parts = refined.chunk(len(self.modalities), dim=1)
        return dict(zip(self.modalities, parts, strict=True))

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Globally average-pooled refined features per modality (B, C)."""
        return {m: x.mean(dim=(2, 3)) for m, x in self.attend(self.encode(batch)).items()}

    def forward_head(self, pooled: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenation -> 512-unit ReLU layer -> dropout -> class logits."""
        return self.head(torch.cat([pooled[m] for m in self.modalities], dim=1))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))


# --------------------------------------------------------------------------- constructors


def tiny_example() -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny MDL-IIA and a batch of two patients (for the registry test)."""
    from mmdiag.models.cmus import tiny_example as cmus_batch

    _, batch = cmus_batch(size_px=64)
    return {"num_classes": 3, "encoder": "test_convnext", "hidden_dim": 16}, batch


@register_model(family="cmus", example=tiny_example)
def mdl_iia(num_classes: int = 3, **kwargs) -> MDLIIA:
    """MDL-IIA (Zhang et al., npj Breast Cancer 2023) on OM, IM and the TEM bag (Tables 4, 6)."""
    return MDLIIA(num_classes, **kwargs)
