"""mmFormer's shared parts, and mmFormer on OM + IM + a TEM bag (CMUS-Net Table 4).

Paper: Y. Zhang et al., "mmFormer: Multimodal Medical Transformer for Incomplete Multimodal
Learning of Brain Tumor Segmentation", MICCAI 2022. Authors' code:
https://github.com/YaoZhang93/mmFormer (``mmformer/mmformer.py``).

mmFormer is a comparison row of two methods here, built from the same parts:

- :class:`IntraModalTransformer`: the transformer half of the hybrid modality-specific encoder
  (Sec. 2.1): a learnable positional embedding added before every layer of a small transformer
  over one modality's bottleneck tokens (the authors' ``Transformer(x, pos)``).
- :class:`InterModalTransformer`: the modality-correlated encoder (Sec. 2.2): the tokens of a
  missing modality are zeroed (the Bernoulli indicator δ_m, the authors' ``MaskModal``) and one
  transformer runs over the concatenated tokens of all modalities, the modalities' positional
  embeddings concatenated likewise, so each token also carries which modality it came from.
- :func:`draw_availability`, :func:`non_empty_subsets`: the training masks, drawn uniformly
  from the non-empty subsets of the modalities (all 15 of four MRI sequences in the authors'
  code).

MHD-Net's 3D CT + WSI version is :class:`mmdiag.models.mhd_baselines.MMFormer`; the 2D version
for CMUS-Net's three modalities is :class:`CMUSMMFormer` below.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from timm.layers import Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from mmdiag.models.cmus import (
    MODALITIES,
    bag_mean,
    checked_modalities,
    gives_pooled_features_only,
    modality_encoders,
    tiny_example,
    token_map,
)
from mmdiag.models.registry import register_model

#: mmFormer's transformer width, heads and MLP width (the authors' 512, 8 and 4096).
PAPER_TOKEN_DIM, PAPER_HEADS, PAPER_MLP_RATIO = 512, 8, 8.0


# --------------------------------------------------------------------------- shared parts


def transformer_blocks(
    dim: int, *, depth: int, num_heads: int, mlp_ratio: float, drop: float
) -> list[Block]:
    """``depth`` pre-norm transformer layers (timm's ``Block``; the authors' depth is 1)."""
    return [
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=drop, attn_drop=drop)
        for _ in range(depth)
    ]


def non_empty_subsets(n_modalities: int) -> tuple[tuple[bool, ...], ...]:
    """Every non-empty subset of ``n_modalities`` modalities as availability codes."""
    codes = itertools.product((False, True), repeat=n_modalities)
    return tuple(code for code in codes if any(code))


def draw_availability(
    n: int, subsets: Sequence[Sequence[bool]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``n`` availability codes ``(n, M)`` bool, each drawn uniformly from ``subsets``.

    Drawn from torch's global generator, which the training loop's resume state restores.
    """
    table = torch.tensor(subsets, dtype=torch.bool)
    return table[torch.randint(len(table), (n,))].to(device)


def mask_modalities(tokens: Sequence[torch.Tensor], available: torch.Tensor) -> list[torch.Tensor]:
    """Tokens ``(B, N_m, D)`` of modality m times δ_m (Sec. 2.2): a missing one becomes zeros."""
    delta = available.to(tokens[0].dtype)[:, :, None, None]  # Bernoulli indicators δ_m
    return [t * delta[:, m] for m, t in enumerate(tokens)]


class IntraModalTransformer(nn.Module):
    """The intra-modal transformer of mmFormer's hybrid encoder (Sec. 2.1): global context
    over one modality's ``tokens`` tokens of width ``dim``.

    Each layer adds the learnable positional embedding ``position`` before its attention, as
    the authors' ``Transformer``; the same embedding marks the modality's tokens in the
    inter-modal transformer. A hybrid encoder subclasses this and adds its convolutional part.
    """

    def __init__(
        self,
        dim: int,
        tokens: int,
        *,
        depth: int = 1,
        num_heads: int = PAPER_HEADS,
        mlp_ratio: float = PAPER_MLP_RATIO,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the token width {dim}")
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        options = {"depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio, "drop": drop}
        self.blocks = nn.ModuleList(transformer_blocks(dim, **options))

    def contextualise(
        self, tokens: torch.Tensor, position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F_global`` ``(B, N, D)`` from the local tokens: the positional embedding
        (``self.position`` unless another is given) added at every layer."""
        position = self.position if position is None else position
        for block in self.blocks:
            tokens = block(tokens + position)
        return tokens


class InterModalTransformer(nn.ModuleList):
    """mmFormer's modality-correlated encoder (Sec. 2.2) over every modality's tokens.

    A list of transformer layers (so a state dict names them ``<name>.0``, ``<name>.1`` ...).
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 1,
        num_heads: int = PAPER_HEADS,
        mlp_ratio: float = PAPER_MLP_RATIO,
        drop: float = 0.0,
    ) -> None:
        options = {"depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio, "drop": drop}
        super().__init__(transformer_blocks(dim, **options))

    def forward(
        self,
        tokens: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        available: torch.Tensor,
    ) -> torch.Tensor:
        """Masked, concatenated tokens ``(B, sum N_m, D)`` after the inter-modal layers.

        ``tokens[m]`` ``(B, N_m, D)`` and ``positions[m]`` ``(1, N_m, D)`` of modality m;
        ``available`` ``(B, M)`` bool. A masked modality contributes its positional embedding
        only, so its images cannot reach the output.
        """
        fused = torch.cat(mask_modalities(tokens, available), dim=1)
        position = torch.cat(list(positions), dim=1)
        for block in self:
            fused = block(fused + position)  # inter-modal transformer, position at each layer
        return fused


# --------------------------------------------------------------------------- CMUS 2D version


class HybridEncoder2D(IntraModalTransformer):
    """A 2D hybrid modality-specific encoder (Sec. 2.1): a timm convolutional encoder for local
    features, a 1x1 projection of its last map to ``dim``-wide tokens, the intra-modal
    transformer. ``conv`` is the timm encoder (it may load an ImageNet checkpoint).

    The positional embedding is learnt for a square grid of ``tokens`` tokens; another input
    size resamples it (bicubic) to the grid it gets, as timm's ViTs do.
    """

    def __init__(self, conv: nn.Module, tokens: int, dim: int, **transformer) -> None:
        super().__init__(dim, tokens, **transformer)
        self.conv = conv
        self.tokenize = nn.Linear(conv.num_features, dim)  # the authors' 1x1 encode_conv

    def position_for(self, n_tokens: int) -> torch.Tensor:
        """The positional embedding ``(1, n_tokens, D)`` of a square grid of ``n_tokens``."""
        if n_tokens == self.position.shape[1]:
            return self.position
        old, new = math.isqrt(self.position.shape[1]), math.isqrt(n_tokens)
        if old * old != self.position.shape[1] or new * new != n_tokens:
            raise ValueError(f"cannot resample {self.position.shape[1]} tokens to {n_tokens}")
        return resample_abs_pos_embed(self.position, (new, new), (old, old), num_prefix_tokens=0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled local features ``(n, C)`` and global tokens ``(n, N, dim)`` of ``images``."""
        local = token_map(self.conv, images)  # F_local, the last map as (n, N, C)
        position = self.position_for(local.shape[1])
        return local.mean(dim=1), self.contextualise(self.tokenize(local), position)


def token_count(encoder: nn.Module, size_px: int) -> int:
    """Tokens of ``encoder``'s last map for a ``size_px`` square input (fixes the embedding)."""
    was_training = encoder.training
    with torch.no_grad():
        count = token_map(encoder.eval(), torch.zeros(1, 3, size_px, size_px)).shape[1]
    encoder.train(was_training)
    return count


class CMUSMMFormer(nn.Module):
    """mmFormer for glomerular disease classification from OM, IM and a bag of TEM images.

    CMUS-Net Sec. 4.3: the inputs become OM, IM and TEM and the segmentation head becomes "two
    fully connected layers for classification". Each modality has its hybrid encoder (a timm
    convolutional encoder, a 1x1 token projection to width ``token_dim`` and the intra-modal
    transformer, Sec. 2.1); the inter-modal transformer runs over the concatenated tokens of
    the three modalities, each modality's tokens masked by its δ_m (Sec. 2.2); the fused tokens
    are layer-normalised and averaged and the two fully connected layers give the logits.

    Choices (the CMUS paper gives none of these):

    - TEM bag: every TEM image runs through the TEM hybrid encoder, and the patient's global
      tokens are the token-wise mean over its images (its pooled local features likewise),
      the bag reduction of the concatenation baselines (Tables 5-6); the token grid is the
      same for every image, so the mean keeps the positions.
    - Masks (Sec. 2.2): in training, :meth:`loss` draws each patient's code uniformly from the
      7 non-empty subsets of {OM, IM, TEM}; at test time every modality is present.
    - Regulariser (Sec. 2.4): an auxiliary classifier shared by the modalities (the authors'
      ``Decoder_sep`` is one module for all modalities) on each modality's pooled local
      features, trained on every modality whatever the mask, as in the authors' code; its
      cross-entropies are added with weight ``alpha_aux`` (1 in the authors' code). The
      decoder's deep supervision has no counterpart in a classifier.
    - Encoder: the CMUS paper names none; mmFormer's own is a small CNN trained from scratch,
      here a timm 2D encoder (paper config: ResNet-18). Transformer: the authors' width 512,
      depth 1, 8 heads, MLP 4096. Its dropout is 0 (the authors' 0.1 is an option): the
      training loop draws dropout masks per sample, so that data-parallel training equals one
      process, and the TEM encoder's rows are images, not patients.
    - The CMUS authors' public adaptation (MultiModal_lkx, ``MyModel/mmFormer/mmFormer_cat.py``)
      uses mmFormer's 2D CNN, no masks, and concatenation in place of the inter-modal
      transformer; this class keeps mmFormer's inter-modal transformer and masks, as its paper
      and CMUS-Net Sec. 4.3 ("we replace its segmentation head") describe.
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        encoder: str = "resnet18",
        modalities: Sequence[str] = MODALITIES,
        image_size_px: int = 224,
        token_dim: int = PAPER_TOKEN_DIM,
        depth: int = 1,
        num_heads: int = PAPER_HEADS,
        mlp_ratio: float = PAPER_MLP_RATIO,
        drop: float = 0.0,
        alpha_aux: float = 1.0,
        hidden_dim: int = 128,
        dropout: float = 0.5,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if gives_pooled_features_only(encoder):
            raise ValueError(f"mmFormer needs an encoder with a token map, got {encoder!r}")
        if alpha_aux < 0:
            raise ValueError(f"alpha_aux must be non-negative, got {alpha_aux}")
        self.num_classes = num_classes
        self.modalities = checked_modalities(modalities)
        self.alpha_aux = alpha_aux
        transformer = {"depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio, "drop": drop}
        convs = modality_encoders(encoder, self.modalities, checkpoint)
        tokens = token_count(convs[self.modalities[0]], image_size_px)
        self.encoders = nn.ModuleDict(
            {m: HybridEncoder2D(convs[m], tokens, token_dim, **transformer) for m in convs}
        )
        self.inter = InterModalTransformer(token_dim, **transformer)
        self.norm = nn.LayerNorm(token_dim)
        # CMUS-Net Sec. 4.3: the segmentation head replaced by two fully connected layers
        self.head = Mlp(token_dim, hidden_dim, num_classes, act_layer=nn.ReLU, drop=(dropout, 0.0))
        local_dim = convs[self.modalities[0]].num_features
        self.aux_head = nn.Linear(local_dim, num_classes)  # shared by the modalities (Sec. 2.4)
        self.num_features = token_dim

    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per modality: pooled local features ``(B, C)`` and global tokens ``(B, N, D)``."""
        n_patients = batch["om"].shape[0]
        encoded = {}
        for modality in self.modalities:
            local, tokens = self.encoders[modality](batch[modality.lower()])
            if modality == "TEM":  # the bag: mean over each patient's images
                local = bag_mean(local, batch["tem_patient"], n_patients)
                tokens = bag_mean(tokens, batch["tem_patient"], n_patients)
            encoded[modality] = (local, tokens)
        return encoded

    def all_present(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The test-time code ``(B, M)``: every modality present."""
        n_patients = batch["om"].shape[0]
        return torch.ones(n_patients, len(self.modalities), dtype=torch.bool)

    def forward_features(
        self, batch: Mapping[str, torch.Tensor], available: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``fused`` ``(B, D)`` under the code ``available`` ``(B, M)`` (all present if None)
        and each modality's pooled local features ``local_<modality>``."""
        available = self.all_present(batch) if available is None else available
        encoded = self.encode(batch)
        tokens = [encoded[m][1] for m in self.modalities]
        positions = [
            self.encoders[m].position_for(t.shape[1])
            for m, t in zip(self.modalities, tokens, strict=True)
        ]
        fused = self.inter(tokens, positions, available.to(tokens[0].device))
        out = {"fused": self.norm(fused).mean(dim=1)}
        out |= {f"local_{m}": encoded[m][0] for m in self.modalities}
        return out

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features["fused"])

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits with every modality present."""
        return self.forward_head(self.forward_features(batch))

    def loss(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of the fused prediction under a random mask per patient (in training
        mode; all present in evaluation) plus ``alpha_aux`` times the auxiliary cross-entropies
        of every modality (Sec. 2.4). Returns the loss, the logits and the named terms."""
        label = batch["label"]
        available = None
        if self.training:
            codes = non_empty_subsets(len(self.modalities))
            available = draw_availability(len(label), codes, label.device)
        features = self.forward_features(batch, available)
        logits = self.forward_head(features)
        terms = {"ce_fusion": F.cross_entropy(logits, label)}
        for modality in self.modalities:
            aux_logits = self.aux_head(features[f"local_{modality}"])
            terms[f"aux_{modality}"] = F.cross_entropy(aux_logits, label)
        aux = sum(terms[f"aux_{m}"] for m in self.modalities)
        return terms["ce_fusion"] + self.alpha_aux * aux, logits, terms


def _tiny_mmformer_example() -> tuple[dict, dict[str, torch.Tensor]]:
    arguments, batch = tiny_example()
    return arguments | {"image_size_px": 32, "token_dim": 16, "num_heads": 2}, batch


@register_model(family="cmus", example=_tiny_mmformer_example)
def cmus_mmformer(num_classes: int = 3, **kwargs) -> CMUSMMFormer:
    """mmFormer on OM, IM and the TEM bag (CMUS-Net Tables 4 and 6)."""
    return CMUSMMFormer(num_classes, **kwargs)
