"""FPN as an image classifier: a timm backbone, a feature pyramid, every level pooled.

Pyramid: T.-Y. Lin et al., "Feature pyramid networks for object detection", CVPR 2017.
Its use as a classifier: K. Long et al., "Cross-modal ultra-scale learning with tri-modalities
of renal biopsy images for glomerular multi-disease auxiliary diagnosis", Medical Image
Analysis, 2025, Section 5.2.1 (Tables 5 and 6): "To adapt the FPN, originally designed for
object detection, to our classification tasks, we replace its detection head with a
classification head consisting of two fully connected layers."

The bottom-up pathway is a timm backbone's ``features_only`` outputs (C2-C5 of a ResNet); the
top-down pathway with lateral connections is torchvision's ``FeaturePyramidNetwork``.

Choices where the CMUS-Net paper says no more than the sentence above:

- backbone ResNet-50 by default: the CMUS paper names none, Lin et al. build FPN on ResNet-50
  (and ResNet-101), and ResNet-50 is already a row of Tables 5 and 6, so its ImageNet
  checkpoint serves both rows;
- levels P2-P5 (the backbone's last four feature maps) with 256 channels each, as Lin et al.;
  no P6, which Lin et al. add only for the region proposal network;
- each level global-average pooled and the pooled vectors concatenated, so every scale reaches
  the classifier with equal width;
- the two fully connected layers are those of the CMUS concatenation baseline (width 128,
  ReLU, dropout 0.5): with ``num_classes=0`` the module is a per-modality encoder giving the
  pooled pyramid, and :class:`mmdiag.models.cmus.CMUSConcat` concatenates the modalities and
  applies them (the paper's "each model extracts features of OM, IM, and TEM modalities,
  respectively, and concatenates them together for classification").

In a CMUS variant an FPN encoder is named ``fpn_<timm backbone>`` (``encoder: fpn_resnet50``);
a local checkpoint of the backbone (the timm classifier's state dict) loads into the bottom-up
pathway; the pyramid and the head start from random weights. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.layers import Mlp
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from mmdiag.models.encoders import load_encoder_checkpoint

#: A CMUS encoder named ``fpn_<backbone>`` is a :class:`FeaturePyramidClassifier` encoder.
FPN_ENCODER_PREFIX = "fpn_"
PYRAMID_LEVELS = (-4, -3, -2, -1)  # P2-P5 on a ResNet (strides 4-32), Lin et al. Sec. 3
FPN_CHANNELS = 256  # d = 256 of Lin et al. Sec. 3


def fpn_backbone(encoder: str) -> str | None:
    """The timm backbone of an FPN encoder name (``fpn_resnet50`` -> ``resnet50``), else None."""
    if encoder.startswith(FPN_ENCODER_PREFIX):
        return encoder[len(FPN_ENCODER_PREFIX) :]
    return None


def create_backbone(
    name: str, levels: Sequence[int], checkpoint: str | Path | None = None
) -> nn.Module:
    """timm ``name`` as a ``features_only`` network giving the feature maps ``levels``.

    The feature network keeps the classifier's parameter names, so a checkpoint of the timm
    classifier loads into it (its head tensors are dropped).
    """
    try:
        backbone = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=tuple(levels)
        )
    except RuntimeError as error:  # timm raises RuntimeError for unknown names
        raise ValueError(f"unknown timm backbone {name!r}: {error}") from None
    if checkpoint is not None:
        load_encoder_checkpoint(backbone, checkpoint, name=name)
    return backbone


class FeaturePyramidClassifier(nn.Module):
    """Backbone -> FPN (P2-P5) -> each level pooled and concatenated -> two FC layers.

    ``num_classes=0`` leaves out the head: ``forward`` then gives the pooled pyramid
    (``num_features`` = levels x ``fpn_channels``), the timm encoder convention.
    """

    def __init__(
        self,
        num_classes: int = 0,
        *,
        backbone: str = "resnet50",
        levels: Sequence[int] = PYRAMID_LEVELS,
        fpn_channels: int = FPN_CHANNELS,
        hidden_dim: int = 128,
        dropout: float = 0.5,
        checkpoint: str | Path | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = create_backbone(backbone, levels, checkpoint)
        # Lin et al. Sec. 3: 1x1 lateral convs, nearest upsampling + sum, 3x3 output convs
        self.fpn = FeaturePyramidNetwork(self.backbone.feature_info.channels(), fpn_channels)
        self.num_levels = len(self.backbone.feature_info.channels())
        self.num_features = self.num_levels * fpn_channels
        self.head = (
            Mlp(self.num_features, hidden_dim, num_classes, act_layer=nn.ReLU, drop=(dropout, 0.0))
            if num_classes
            else nn.Identity()
        )

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid levels P2..P5, finest first: (B, fpn_channels, H_l, W_l) each."""
        bottom_up = self.backbone(images)
        levels = self.fpn({str(i): feature for i, feature in enumerate(bottom_up)})
        return list(levels.values())

    def pool(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Global average pooling of every level, concatenated: (B, levels x fpn_channels)."""
        return torch.cat([level.mean(dim=(2, 3)) for level in levels], dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pyramid(images))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def create_fpn_encoder(encoder: str, *, checkpoint: str | Path | None = None) -> nn.Module:
    """The headless FPN encoder ``fpn_<backbone>`` (pooled pyramid; see the module docstring)."""
    backbone = fpn_backbone(encoder)
    if not backbone:
        raise ValueError(
            f"FPN encoder names are {FPN_ENCODER_PREFIX}<timm backbone>, got {encoder!r}"
        )
    return FeaturePyramidClassifier(0, backbone=backbone, checkpoint=checkpoint)
