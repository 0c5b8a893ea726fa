"""HAG-MIL: hierarchical attention-guided MIL, a baseline of CS-MIL's Tables 1 and 5.

Paper: C. Xiong, H. Chen, J. J. Y. Sung and I. King, "Diagnose Like a Pathologist:
Transformer-Enabled Hierarchical Attention-Guided Multiple Instance Learning for Whole Slide
Image Classification", IJCAI 2023. Authors' code: https://github.com/BearCleverProud/HAG-MIL
(``main.py``, ``models/model.py``, ``models/model_utils.py``, ``configs/camelyon.yaml`` at
9fec1ca).

The method: like a pathologist zooming in, a slide is read from the lowest magnification up.
At every level an Integrated Attention Transformer (IAT) classifies the level's patches and
its attention picks the most important ones; only those are read at the next, higher
magnification. The IAT stacks integrated attention modules (IAM: linear + LayerNorm + GELU, a
transformer layer, gated attention pooling to a slide representation); the slide
representations of all modules are combined by learned weights and classified. Each level has
its own IAT and its own loss: 0.5 x bag loss (cross-entropy, label smoothing 0.1 at the two
lower levels) + 0.5 x CLAM's instance loss (the k most and least attended instances of the
last module, labelled in-class positive and negative for the classifier of the bag's class).
The prediction is the highest level's.

Adapted to CS-MIL's bags (each location has one concentric patch per scale, 20x/10x/5x):

- Hierarchy. The code's quad-tree (each patch expands to its 4 children at twice the
  magnification) becomes one child per location: the 10x level reads the kept locations' 10x
  features, the 20x level their 20x features. The code keeps a fixed number of patches
  (``t_patch`` 7000 / ``v_patch`` 10000), which would keep every instance of CS-MIL's bags of
  8 or 32; here each level keeps ``keep_fraction`` (default 0.5) of the bag's real locations.
- Instance loss. ``k_sample`` (the code's 8) is capped at half of the fewest kept instances of
  the batch, at least 1; cross-entropy (the code's ``ce`` option; its default smooth top-1 SVM
  needs the ``topk`` package).
- Transformer layer. Exact multi-head self-attention with a pre-norm residual: the code's
  Nystrom attention (``nystrom_attention``) approximates exactly this, and its Admin residual
  (``admin_torch``) only rescales the residual branch; bags of 8-96 instances need neither.
  One dropout rate (0.25) throughout; the code uses 0.3 inside its Nystrom attention.
- One logit and binary cross-entropy as every CS-MIL model; label smoothing 0.1 on two classes
  is the target y (1 - 0.1) + 0.05. The levels share no parameters and the selections are not
  differentiable, so the sum of the three levels' losses with one optimiser gives each level the
  update of the code's three sequential steps. Optimiser settings are CS-MIL's (Sec. 5.1).
- Evaluation reads no label and has no randomness (dropout off).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mmdiag.models.csmil import AttentionPooling, checked_batch, masked_softmax, tiny_example
from mmdiag.models.registry import register_model

LEVEL_SCALES = (2, 1, 0)  # 5x, 10x, 20x: indices of the batch's scale axis, read in this order
LABEL_SMOOTHING = (0.1, 0.1, 0.0)  # the code's criteria of levels 2, 1 and 0


# --------------------------------------------------------------------------- building blocks


class IAMBlock(nn.Module):
    """Integrated attention module: embed, a transformer layer, gated attention pooling."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        final_dim: int,
        *,
        pool_dim: int,
        attention_dim: int,
        heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU())
        self.attention_norm = nn.LayerNorm(out_dim)
        self.self_attention = nn.MultiheadAttention(
            out_dim, heads, dropout=dropout, batch_first=True
        )
        self.norm = nn.LayerNorm(out_dim)
        self.pool_embed = nn.Sequential(
            nn.Linear(out_dim, pool_dim), nn.GELU(), nn.Dropout(dropout)
        )
        self.pooling = AttentionPooling(pool_dim, attention_dim, gated=True)
        self.to_final = nn.Sequential(
            nn.Linear(out_dim, final_dim), nn.LayerNorm(final_dim), nn.GELU()
        )

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Instances h (B, N, in) -> ``h`` (B, N, out), ``scores`` and ``attention`` (B, N),
        ``pooled`` (B, N, pool_dim: the instance-loss features) and ``slide`` (B, final)."""
        h = self.embed(h)
        query = self.attention_norm(h)
        update, _ = self.self_attention(
            query, query, query, key_padding_mask=~mask, need_weights=False
        )
        h = h + update
        pooled = self.pool_embed(self.norm(h))
        scores = self.pooling.scores(pooled)
        attention = masked_softmax(scores, mask)
        slide = self.norm(torch.einsum("bn,bnl->bl", attention, h))
        return {
            "h": h,
            "scores": scores,
            "attention": attention,
            "pooled": pooled,
            "slide": self.to_final(slide),
        }


class IATModel(nn.Module):
    """Integrated Attention Transformer: IAM blocks, learned block weights, a linear head."""

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        *,
        pool_dim: int,
        attention_dim: int,
        heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = [in_dim, *hidden_dims]
        self.blocks = nn.ModuleList(
            IAMBlock(
                widths[i],
                widths[i + 1],
                hidden_dims[-1],
                pool_dim=pool_dim,
                attention_dim=attention_dim,
                heads=heads,
                dropout=dropout,
            )
            for i in range(len(hidden_dims))
        )
        self.block_weights = nn.Linear(len(hidden_dims), 1)
        self.head = nn.Linear(hidden_dims[-1], 1)
        self.instance_classifiers = nn.ModuleList(nn.Linear(pool_dim, 2) for _ in range(2))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logit`` (B,), and the last block's ``scores``, ``attention`` and ``pooled``."""
        slides = []
        for block in self.blocks:
            out = block(h, mask)
            h = out["h"]
            slides.append(out["slide"])
        slide = self.block_weights(torch.stack(slides, dim=-1)).squeeze(-1)
        return out | {"logit": self.head(slide).squeeze(-1)}

    def instance_loss(self, level: Mapping[str, torch.Tensor], mask, label, k_sample: int):
        """CLAM's in-class instance loss: the k most attended instances are positive, the k
        least attended negative, for the instance classifier of the bag's class."""
        k = max(1, min(k_sample, int(mask.sum(dim=1).min()) // 2))
        scores = level["scores"]
        top = scores.masked_fill(~mask, float("-inf")).topk(k, dim=1).indices
        bottom = scores.masked_fill(~mask, float("inf")).topk(k, dim=1, largest=False).indices
        index = torch.cat([top, bottom], dim=1)
        picked = level["pooled"].gather(
            1, index[..., None].expand(-1, -1, level["pooled"].shape[-1])
        )
        logits = torch.stack([c(picked) for c in self.instance_classifiers], dim=1)
        logits = logits[torch.arange(len(label)), label.long()]  # (B, 2k, 2)
        targets = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)], dim=1)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --------------------------------------------------------------------------- model


def keep_most_attended(scores: torch.Tensor, mask: torch.Tensor, keep_fraction: float):
    """The mask of each bag's ceil(keep_fraction * n_real) highest-scoring real instances."""
    n_keep = torch.ceil(mask.sum(dim=1, keepdim=True) * keep_fraction).clamp(min=1)
    rank = scores.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True).argsort(1)
    return mask & (rank < n_keep)


class HAGMIL(nn.Module):
    """HAG-MIL (Xiong et al., IJCAI 2023) on CS-MIL's concentric 5x -> 10x -> 20x bags.

    Sizes are the authors' code defaults: IAM widths ``hidden_dims`` (1024, 1536, 512, 1024),
    attention network 512 -> 256 (``pool_dim``, ``attention_dim``), 8 heads, dropout 0.25,
    ``k_sample`` 8, bag and instance weights 0.5 each.
    """

    num_classes = 1

    def __init__(
        self,
        in_dim: int = 2048,
        *,
        hidden_dims: Sequence[int] = (1024, 1536, 512, 1024),
        pool_dim: int = 512,
        attention_dim: int = 256,
        heads: int = 8,
        dropout: float = 0.25,
        keep_fraction: float = 0.5,
        k_sample: int = 8,
        bag_weight: float = 0.5,
        instance_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        if any(width % heads for width in hidden_dims):
            raise ValueError(f"every hidden_dims width must divide by heads={heads}")
        self.keep_fraction, self.k_sample = keep_fraction, k_sample
        self.bag_weight, self.instance_weight = bag_weight, instance_weight
        options = dict(pool_dim=pool_dim, attention_dim=attention_dim, heads=heads)
        self.levels = nn.ModuleList(
            IATModel(in_dim, hidden_dims, dropout=dropout, **options) for _ in LEVEL_SCALES
        )

    def forward_levels(self, batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each level's outputs and the ``mask`` of the locations it read, lowest level first."""
        features, mask = checked_batch(batch)
        if features.shape[2] != len(LEVEL_SCALES):
            raise ValueError(f"HAG-MIL reads 3 scales, got {features.shape[2]}")
        outputs = []
        for model, scale in zip(self.levels, LEVEL_SCALES, strict=True):
            level = model(features[:, :, scale], mask) | {"mask": mask}
            outputs.append(level)
            # zoom in: only the most attended locations are read at the next magnification
            mask = keep_most_attended(level["scores"].detach(), mask, self.keep_fraction)
        return outputs

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_levels(batch)[-1]["logit"]  # the 20x level's prediction

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over levels of 0.5 bag loss (label-smoothed BCE) + 0.5 instance loss."""
        levels = self.forward_levels(batch)
        label = batch["label"]
        total = levels[0]["logit"].new_zeros(())
        for model, level, smoothing in zip(self.levels, levels, LABEL_SMOOTHING, strict=True):
            target = label.to(level["logit"].dtype) * (1 - smoothing) + smoothing / 2
            bag = F.binary_cross_entropy_with_logits(level["logit"], target)
            instance = model.instance_loss(level, level["mask"], label, self.k_sample)
            total = total + self.bag_weight * bag + self.instance_weight * instance
        return total, levels[-1]["logit"]

    @torch.no_grad()
    def attention(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The 20x level's attention per location (B, N; zero where not read) and every
        level's attention by scale index, ``level_attention`` (B, N, 3)."""
        levels = self.forward_levels(batch)
        by_scale = [None] * len(LEVEL_SCALES)
        for level, scale in zip(levels, LEVEL_SCALES, strict=True):
            by_scale[scale] = level["attention"]
        return {"instance": levels[-1]["attention"], "level_attention": torch.stack(by_scale, -1)}


# --------------------------------------------------------------------------- constructors


def tiny_hag_example():
    """A small HAG-MIL's arguments and a padded batch (for the registry test)."""
    kwargs, batch = tiny_example()
    return kwargs | {"hidden_dims": (16, 8), "pool_dim": 8, "attention_dim": 4, "heads": 2}, batch


@register_model(family="csmil", example=tiny_hag_example)
def hag_mil(in_dim: int = 2048, **kwargs) -> HAGMIL:
    """HAG-MIL; options ``keep_fraction``, ``k_sample``, ``hidden_dims``, ``pool_dim``,
    ``attention_dim``, ``heads``, ``dropout``, ``bag_weight``, ``instance_weight``."""
    return HAGMIL(in_dim, **kwargs)
