"""AGGN on OM, IM and a bag of TEM images (CMUS-Net Table 4).

Paper: P. Wu et al., "AGGN: Attention-based glioma grading network with multi-scale feature
extraction and multi-modal information fusion", Computers in Biology and Medicine 152, 106457,
2023. AGGN grades gliomas from four MRI sequences: one convolutional branch per modality with a
multi-scale feature extraction module (multi-branch convolutions, then convolution-pooling
stages, then multi-branch pooling), a dual-domain attention (channel and spatial) that
highlights key modalities and locations, and a multi-modal information fusion module that
merges the modalities' low-level detailed and high-level semantic features stage by stage.
The structure of each block follows the CMUS authors' 2D adaptation of AGGN's code
(MultiModal_lkx, ``MyModel/AGGN/AGGN_250106.py``); CMUS-Net Sec. 4.3 replaces the inputs by
OM, IM and TEM.

Choices and departures (the CMUS paper states none of these):

- One unshared branch per modality ("an equal number of convolutional branches", CMUS-Net
  Sec. 4.3); the CMUS authors' code runs one encoder on every modality.
- Dual-domain attention: AGGN weighs the stacked input images; with a bag of TEM images per
  patient there is no single TEM image to stack, so here it weighs the stacked stage maps of the
  modalities (after the bag mean) in front of each stage's fusion block, where "key modalities
  and locations" are still told apart (channel attention over the modalities' channels, spatial
  attention over the locations).
- The stage fusion keeps the multi-branch 3D convolutions across modalities and the
  multi-branch pooling, and drops the adaptive three-branch reduction between them (a fixed
  input size only); the multi-stage fusion is kept (the CMUS authors' last version removed it
  to test its effect, while CMUS-Net Sec. 6 describes AGGN as fusing multi-scale features).
- TEM bag: every image runs through the TEM branch; the patient's stage maps and pooled
  feature are the means over its images (the CMUS authors used the first TEM image).
- ``encoder="aggn"`` builds AGGN's own branch (widths 64-128-256, features 512 as the CMUS
  authors); a timm convolutional encoder name instead lets that encoder's last three stages
  stand for the three convolution-pooling stages (used by the tests at tiny sizes).
- Classifier: two fully connected layers on the concatenated features after dropout, as the
  other rows of Tables 4-6 (AGGN: dropout 0.4 and one linear layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from timm.layers import Mlp
from torch import nn

from mmdiag.models.cmus import MODALITIES, bag_mean, checked_modalities, tiny_example
from mmdiag.models.encoders import load_encoder_checkpoint
from mmdiag.models.msan import create_feature_encoder, feature_levels
from mmdiag.models.registry import register_model

#: AGGN's branch widths (multi-branch conv 1, 2 and the convolution-pooling stages).
PAPER_WIDTHS = (64, 128, 256)
#: Width of each branch's pooled feature and of each fused feature (the CMUS authors' 512).
PAPER_FEATURES = 512


# --------------------------------------------------------------------------- building blocks


def conv_block(c_in: int, c_out: int, kernel, stride=1, padding=0, *, dims: int = 2) -> nn.Module:
    """Convolution, batch norm, PReLU (AGGN's basic block), in 2D or 3D."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(
        conv(c_in, c_out, kernel, stride, padding), norm(c_out), nn.PReLU(init=0.25)
    )


def asymmetric(c_in: int, c_out: int, kernels: Sequence[int]) -> list[nn.Module]:
    """1xk then kx1 convolutions for each k (AGGN's asymmetric convolution blocks)."""
    layers, width = [], c_in
    for k in kernels:
        layers += [conv_block(width, c_out, (1, k), 1, (0, k // 2))]
        layers += [conv_block(c_out, c_out, (k, 1), 1, (k // 2, 0))]
        width = c_out
    return layers


def eighths(channels: int, *parts: int) -> list[int]:
    """Channel splits of AGGN's branches, in eighths of ``channels``."""
    if channels % 8:
        raise ValueError(f"AGGN's multi-branch widths must be multiples of 8, got {channels}")
    return [channels // 8 * part for part in parts]


class MultiBranchConv(nn.Module):
    """AGGN's multi-branch convolution (halves the size): a wide asymmetric branch, a 1x1
    convolution with 5x5 max pooling and a second asymmetric branch, concatenated.

    ``kind`` 1 (the first block): 7 and 11 asymmetric kernels; 2: a 3x3 convolution and a
    7-then-5 asymmetric branch.
    """

    def __init__(self, c_in: int, c_out: int, kind: int) -> None:
        super().__init__()
        a, b, c = eighths(c_out, 4, 1, 3)
        if kind == 1:
            first = [*asymmetric(c_in, a, [7]), conv_block(a, a, 3, 2, 1)]
            third = [*asymmetric(c_in, c, [11]), conv_block(c, c, 3, 2, 1)]
        else:
            first = [conv_block(c_in, a, 3, 2, 1)]
            third = [*asymmetric(c_in, c, [7, 5]), conv_block(c, c, 3, 2, 1)]
        pooled = [conv_block(c_in, b, 1), nn.MaxPool2d(5, stride=2, padding=2)]
        self.branches = nn.ModuleList(nn.Sequential(*layers) for layers in (first, pooled, third))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class MultiBranchPooling(nn.Module):
    """AGGN's multi-branch pooling: three branches of convolutions then global pooling (an
    asymmetric 5 + 3x3 branch, a 1x1 branch pooled over a 4x4 grid first, a 1x1 branch),
    concatenated into one ``c_out`` vector."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        a, b, c = eighths(c_out, 4, 3, 1)
        self.deep = nn.Sequential(*asymmetric(c_in, a, [5]), conv_block(a, a, 3, 1, 1))
        self.grid = nn.Sequential(conv_block(c_in, b, 1), nn.AdaptiveAvgPool2d(4))
        self.plain = conv_block(c_in, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.deep(x), self.grid(x), self.plain(x)]
        return torch.cat([p.mean(dim=(2, 3)) for p in parts], dim=1)


class AGGNBranch(nn.Module):
    """AGGN's multi-scale feature extraction for one modality: stem + multi-branch conv 1,
    conv + multi-branch conv 2, three convolution-pooling stages (each halving the size) and
    multi-branch pooling. Returns the pooled feature and the three stage maps."""

    def __init__(self, widths: Sequence[int] = PAPER_WIDTHS, features: int = PAPER_FEATURES):
        super().__init__()
        w1, w2, w3 = widths
        self.multi_branch = nn.Sequential(
            conv_block(3, w1, 3, 1, 1),
            MultiBranchConv(w1, w1, kind=1),
            conv_block(w1, w2, 3, 1, 1),
            MultiBranchConv(w2, w2, kind=2),
        )
        self.stages = nn.ModuleList(
            nn.Sequential(
                conv_block(w2 if i == 0 else w3, w3, 3, 1, 1),
                conv_block(w3, w3, 3, 1, 1),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
            for i in range(3)
        )
        self.pool = MultiBranchPooling(w3, features)
        self.stage_channels = (w3, w3, w3)
        self.num_features = features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, maps = self.multi_branch(images), []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return self.pool(x), maps


class TimmStagesBranch(nn.Module):
    """A timm convolutional encoder whose last three stages stand for AGGN's three
    convolution-pooling stages, then AGGN's multi-branch pooling."""

    def __init__(self, encoder: str, features: int, checkpoint: str | None) -> None:
        super().__init__()
        self.encoder = create_feature_encoder(encoder, checkpoint)
        channels = [c for _, c in feature_levels(self.encoder).values()]
        self.stage_channels = tuple(channels[-3:])
        self.pool = MultiBranchPooling(channels[-1], features)
        self.num_features = features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = self.encoder(images)[-3:]
        return self.pool(maps[-1]), maps


class DualDomainAttention(nn.Module):
    """AGGN's dual-domain attention on stacked modality maps ``(B, C, H, W)``: spatial
    attention (channel mean and max, a 7x7 convolution, a sigmoid) then channel attention
    (squeeze-and-excitation, reduction 4), each multiplying the maps."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        hidden = max(channels // 4, 1)
        self.excite = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.PReLU(init=0.25), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summary = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        x = x * torch.sigmoid(self.spatial(summary))  # where: key locations
        return x * torch.sigmoid(self.excite(x.mean(dim=(2, 3), keepdim=True)))  # which channels


class StageFusion(nn.Module):
    """AGGN's multi-modal information fusion of one stage: the modalities' maps ``(B, C, H, W)``
    each, weighed by :class:`DualDomainAttention`, stacked on a modality axis and merged by three
    branches of 3D convolutions whose last kernel spans every modality, a 3x3 convolution and
    the multi-branch pooling; returns a ``features`` vector."""

    def __init__(self, channels: int, n_modalities: int, features: int) -> None:
        super().__init__()
        m = n_modalities
        a, b, c = eighths(channels, 3, 2, 3)
        self.attention = DualDomainAttention(channels * m)
        self.branches = nn.ModuleList(
            [
                nn.Sequential(
                    conv_block(channels, a, (3, 3, 1), 1, (1, 1, 0), dims=3),
                    conv_block(a, a, (1, 1, m), dims=3),
                ),
                nn.Sequential(
                    conv_block(channels, b, (3, 1, 1), 1, (1, 0, 0), dims=3),
                    conv_block(b, b, (1, 3, 1), 1, (0, 1, 0), dims=3),
                    conv_block(b, b, (1, 1, m), dims=3),
                ),
                conv_block(channels, c, (3, 3, m), 1, (1, 1, 0), dims=3),
            ]
        )
        self.merge = conv_block(channels, channels, 3, 1, 1)
        self.pool = MultiBranchPooling(channels, features)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        batch, channels, height, width = maps[0].shape
        weighed = self.attention(torch.cat(list(maps), dim=1))
        stacked = weighed.view(batch, len(maps), channels, height, width).permute(0, 2, 3, 4, 1)
        merged = torch.cat([branch(stacked).squeeze(-1) for branch in self.branches], dim=1)
        return self.pool(self.merge(merged))


class ModalityVectorFusion(nn.Module):
    """AGGN's fusion of the modalities' pooled features: a depth-wise 1D convolution whose
    kernel spans the modalities, then PReLU (AGGN adds a batch norm over single values, left
    out so that a batch of one patient trains)."""

    def __init__(self, features: int, n_modalities: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(features, features, n_modalities, groups=features)
        self.act = nn.PReLU(init=0.25)

    def forward(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.act(self.conv(torch.stack(list(vectors), dim=-1))).squeeze(-1)


# --------------------------------------------------------------------------- model


class CMUSAGGN(nn.Module):
    """AGGN on OM, IM and the TEM bag; see the module docstring for the adaptation.

    Features (AGGN's classifier input): the fused modality vector, the fused features of the
    three stages (multi-stage fusion across modalities) and every modality's own vector,
    concatenated; dropout, then the classifier. Trained with the cross-entropy alone, as AGGN.
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        encoder: str = "aggn",
        modalities: Sequence[str] = MODALITIES,
        widths: Sequence[int] = PAPER_WIDTHS,
        features: int = PAPER_FEATURES,
        hidden_dim: int = 128,
        dropout: float = 0.4,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.modalities = checked_modalities(modalities)
        self.encoders = nn.ModuleDict(
            {m: self._branch(encoder, widths, features, checkpoint) for m in self.modalities}
        )
        n = len(self.modalities)
        stage_channels = self.encoders[self.modalities[0]].stage_channels
        self.stage_fusion = nn.ModuleList(StageFusion(c, n, features) for c in stage_channels)
        self.vector_fusion = ModalityVectorFusion(features, n)
        self.num_features = features * (1 + len(stage_channels) + n)
        self.head = Mlp(
            self.num_features, hidden_dim, num_classes, act_layer=nn.ReLU, drop=(0.0, 0.0)
        )
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _branch(encoder: str, widths, features: int, checkpoint: str | None) -> nn.Module:
        if encoder != "aggn":
            return TimmStagesBranch(encoder, features, checkpoint)
        branch = AGGNBranch(widths, features)
        if checkpoint is not None:  # a state dict of one AGGN branch
            load_encoder_checkpoint(branch, checkpoint, name="aggn")
        return branch

    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
        """Per modality: pooled feature ``(B, F)`` and the three stage maps; TEM averaged."""
        n_patients = batch["om"].shape[0]
        encoded = {}
        for modality in self.modalities:
            vector, maps = self.encoders[modality](batch[modality.lower()])
            if modality == "TEM":  # the bag: mean over each patient's images
                index = batch["tem_patient"]
                vector = bag_mean(vector, index, n_patients)
                maps = [bag_mean(x, index, n_patients) for x in maps]
            encoded[modality] = (vector, maps)
        return encoded

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fused vector, each stage's fused feature and each modality's vector."""
        encoded = self.encode(batch)
        vectors = [encoded[m][0] for m in self.modalities]
        out = {"fused": self.vector_fusion(vectors)}
        for stage, fusion in enumerate(self.stage_fusion):
            out[f"stage_{stage}"] = fusion([encoded[m][1][stage] for m in self.modalities])
        out |= {m: encoded[m][0] for m in self.modalities}
        return out

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stages = [features[f"stage_{s}"] for s in range(len(self.stage_fusion))]
        parts = [features["fused"], *stages, *(features[m] for m in self.modalities)]
        return self.head(self.dropout(torch.cat(parts, dim=1)))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))


def _tiny_aggn_example() -> tuple[dict, dict[str, torch.Tensor]]:
    arguments, batch = tiny_example()
    return arguments | {"encoder": "aggn", "widths": (8, 16, 16), "features": 16}, batch


@register_model(family="cmus", example=_tiny_aggn_example)
def cmus_aggn(num_classes: int = 3, **kwargs) -> CMUSAGGN:
    """AGGN with one branch per modality and multi-stage fusion (Tables 4 and 6)."""
    return CMUSAGGN(num_classes, **kwargs)
