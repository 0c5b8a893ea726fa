"""CMUS-Net and its baselines.

Paper: K. Long et al., "Cross-modal ultra-scale learning with tri-modalities of renal biopsy
images for glomerular multi-disease auxiliary diagnosis", Medical Image Analysis, 2025.
Authors' code: https://github.com/SMU-GL-Group/MultiModal_lkx (branch ``Classification``).

A batch holds, for B patients, one OM image and one IM image each and a variable-size bag of
TEM images: ``om`` (B, 3, H, W), ``im`` (B, 3, H, W), ``tem`` (N, 3, H, W) and
``tem_patient`` (N,), the index in 0..B-1 of the patient each TEM image belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Mlp
from torch import nn

from mmdiag.models.encoders import create_encoder
from mmdiag.models.registry import register_model

MODALITIES = ("OM", "IM", "TEM")


def bag_mean(features: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Mean of the instance features of each bag: (N, D) with bag ids (N,) -> (n_bags, D)."""
    sums = features.new_zeros(n_bags, features.shape[1]).index_add_(0, bag_index, features)
    counts = torch.bincount(bag_index, minlength=n_bags).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


class CMUSConcat(nn.Module):
    """Multi-modal concatenation baseline of CMUS-Net's Table 5 (and row 1 of Table 2).

    One unshared encoder per modality; the TEM bag is reduced to the mean of its instance
    features; the per-modality features are concatenated and classified by two fully connected
    layers (the classifier of eq. 12 without SMIL, CMSA or the weighted loss).
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
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(
                f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}"
            )
        self.num_classes = num_classes
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.encoders = nn.ModuleDict(
            {m: create_encoder(encoder, checkpoint=checkpoint) for m in self.modalities}
        )
        self.num_features = sum(e.num_features for e in self.encoders.values())
        # eq. 12: a classifier of two fully connected layers on the fused features
        self.head = Mlp(
            self.num_features,
            hidden_features=hidden_dim,
            out_features=num_classes,
            act_layer=nn.ReLU,
            drop=(dropout, 0.0),
        )

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encode each modality, average the TEM bag, concatenate: (B, num_features)."""
        n_patients = batch["om"].shape[0] if "om" in batch else int(batch["n_patients"])
        parts = []
        for modality in self.modalities:
            encoder = self.encoders[modality]
            if modality == "TEM":
                tem = encoder(batch["tem"])
                parts.append(bag_mean(tem, batch["tem_patient"], n_patients))
            else:
                parts.append(encoder(batch[modality.lower()]))
        return torch.cat(parts, dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from fused features."""
        return self.head(features)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))


@register_model
def cmus_concat(num_classes: int = 3, **kwargs) -> CMUSConcat:
    """CMUS-Net's concatenation baseline (Table 5, Table 3 modality combinations)."""
    return CMUSConcat(num_classes, **kwargs)
