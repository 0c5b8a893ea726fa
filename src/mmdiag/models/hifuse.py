"""HiFuse: a ConvNeXt (local) and a Swin (global) branch fused stage by stage by HFF blocks.

Paper: X. Huo et al., "HiFuse: Hierarchical multi-scale feature fusion network for medical
image classification", Biomedical Signal Processing and Control 87, 105534, 2024.
Authors' code: https://github.com/huoxiangzuo/HiFuse (``main_model.py``, commit 381c845).
A row of CMUS-Net's Tables 5 and 6 (K. Long et al., Medical Image Analysis 2025, Sec. 5.2.1),
where one HiFuse per modality gives pooled features that are concatenated and classified.

As in the authors' code: the local branch is ConvNeXt-T (depths 3-3-9-3, widths 96-768), the
global branch Swin-T (depths 2-2-6-2, 3-24 heads, window 7), both from timm here
(``features_only``, stage outputs at strides 4-32); at every stage a hierarchical feature
fusion (HFF) block combines the two branches and the previous HFF output; the last HFF map is
average-pooled, layer-normalised and classified by one linear layer.

The HFF block follows the authors' code layer by layer (its last layer is their bottleneck
``Residual``: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1, 1x1 skip). Deliberate departure: the
channel attention gates the global features with sigmoid(MLP(max) + MLP(avg)) once, as the
CBAM channel attention it is built on; the code applies the sigmoid twice.

``num_classes=0`` leaves out the classifier (the pooled, normalised features; the timm
encoder convention), the form :class:`mmdiag.models.cmus.CMUSConcat` uses. Nothing is
pretrained: the CMUS-Net paper gives no HiFuse weights; a local checkpoint of this module's
state dict loads through the shared encoder checkpoint loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn


@dataclass(frozen=True)
class HiFuseSize:
    """Widths and depths of the two branches (the HFF widths are the branch widths)."""

    dims: tuple[int, ...] = (96, 192, 384, 768)
    conv_depths: tuple[int, ...] = (3, 3, 9, 3)
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    img_size_px: int = 224
    se_reduction: int = 16


#: Encoder names a CMUS variant can give; ``test_hifuse`` is a tiny one for tests (32 px).
HIFUSE_SIZES = {
    "hifuse_tiny": HiFuseSize(),  # the authors' main_model defaults
    "test_hifuse": HiFuseSize(
        dims=(12, 24, 48, 96),  # no width equals a spatial size: layouts cannot be confused
        conv_depths=(1, 1, 1, 1),
        swin_depths=(1, 1, 1, 1),
        swin_heads=(1, 2, 2, 4),
        window_size=2,
        img_size_px=32,
        se_reduction=4,
    ),
}


def conv_bn(in_channels: int, out_channels: int, kernel: int, *, relu: bool) -> nn.Sequential:
    """Conv (same padding) + BatchNorm (+ ReLU): the ``Conv(..., bn=True)`` of the code."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)]
    layers += [nn.BatchNorm2d(out_channels)] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers)


class BottleneckResidual(nn.Module):
    """Pre-activation bottleneck with a 1x1 skip: the fused features' last layer (IRMLP)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, mid, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, out_channels, 1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.skip is None else self.skip(x))


class HierarchicalFeatureFusion(nn.Module):
    """HFF block: spatial attention on the local features, channel attention on the global
    ones, and a fusion path that also takes the previous stage's HFF output."""

    def __init__(self, dim: int, *, first: bool, se_reduction: int = 16) -> None:
        super().__init__()
        self.local_proj = conv_bn(dim, dim, 1, relu=False)  # W_l
        self.global_proj = conv_bn(dim, dim, 1, relu=False)  # W_g
        # the previous HFF output has half the channels and twice the resolution
        self.previous_proj = None if first else conv_bn(dim // 2, dim, 1, relu=True)
        self.downsample = nn.AvgPool2d(2, stride=2)
        self.fuse = conv_bn(dim * (2 if first else 3), dim, 3, relu=True)
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3, bias=False), nn.BatchNorm2d(1))
        hidden = max(dim // se_reduction, 1)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, dim, 1, bias=False)
        )
        self.residual = BottleneckResidual(3 * dim, dim)

    def spatial_attention(self, local: torch.Tensor) -> torch.Tensor:
        """Local (CNN) features gated by a 7x7 conv over their channel max and mean."""
        stats = torch.cat([local.amax(dim=1, keepdim=True), local.mean(dim=1, keepdim=True)], 1)
        return torch.sigmoid(self.spatial(stats)) * local

    def channel_attention(self, global_: torch.Tensor) -> torch.Tensor:
        """Global (transformer) features gated by a shared MLP over their max and mean pools."""
        pooled_max = self.channel_mlp(global_.amax(dim=(2, 3), keepdim=True))
        pooled_mean = self.channel_mlp(global_.mean(dim=(2, 3), keepdim=True))
        return torch.sigmoid(pooled_max + pooled_mean) * global_

    def forward(
        self, local: torch.Tensor, global_: torch.Tensor, previous: torch.Tensor | None
    ) -> torch.Tensor:
        parts = [self.local_proj(local), self.global_proj(global_)]
        if self.previous_proj is not None:
            parts.insert(0, self.downsample(self.previous_proj(previous)))
        fused = self.fuse(torch.cat(parts, dim=1))
        gated = [self.channel_attention(global_), self.spatial_attention(local), fused]
        return self.residual(torch.cat(gated, dim=1))


class HiFuse(nn.Module):
    """HiFuse classifier (``num_classes=0``: the pooled, layer-normalised fused features)."""

    def __init__(self, num_classes: int = 0, *, size: HiFuseSize = HiFuseSize()) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.local_branch = timm.create_model(
            "convnext_tiny",
            pretrained=False,
            features_only=True,
            depths=size.conv_depths,
            dims=size.dims,
        )
        self.global_branch = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            features_only=True,
            img_size=size.img_size_px,
            embed_dim=size.dims[0],
            depths=size.swin_depths,
            num_heads=size.swin_heads,
            window_size=size.window_size,
        )
        self.fusions = nn.ModuleList(
            HierarchicalFeatureFusion(dim, first=i == 0, se_reduction=size.se_reduction)
            for i, dim in enumerate(size.dims)
        )
        self.num_features = size.dims[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The HFF outputs of the four stages, (B, dim_s, H / 2^(s+2), W / 2^(s+2))."""
        local = self.local_branch(images)
        global_ = [f.permute(0, 3, 1, 2) for f in self.global_branch(images)]  # NHWC -> NCHW
        fused: list[torch.Tensor] = []
        for fusion, loc, glo in zip(self.fusions, local, global_, strict=True):
            fused.append(fusion(loc, glo, fused[-1] if fused else None))
        return fused

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stage_features(images)[-1].mean(dim=(2, 3)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def create_hifuse_encoder(encoder: str) -> HiFuse:
    """The headless HiFuse of ``encoder`` (a key of :data:`HIFUSE_SIZES`)."""
    if encoder not in HIFUSE_SIZES:
        raise ValueError(f"unknown HiFuse encoder {encoder!r}; known: {sorted(HIFUSE_SIZES)}")
    return HiFuse(0, size=HIFUSE_SIZES[encoder])


def is_hifuse_encoder(encoder: str) -> bool:
    return encoder in HIFUSE_SIZES
