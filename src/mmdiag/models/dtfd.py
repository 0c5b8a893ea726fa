"""DTFD-MIL: double-tier feature distillation MIL, a baseline of CS-MIL's Tables 1 and 5.

Paper: H. Zhang, Y. Meng, Y. Zhao, Y. Qiao, X. Yang, S. E. Coupland and Y. Zheng, "DTFD-MIL:
Double-Tier Feature Distillation Multiple Instance Learning for Histopathology Whole Slide
Image Classification", CVPR 2022. Authors' code: https://github.com/hrzhang1123/DTFD-MIL
(``Main_DTFD_MIL.py`` at 8db7761, ``Model/Attention.py``, ``Model/network.py``, ``utils.py``).

The method (paper Sec. 3):

1. Pseudo-bags. A bag's instances are split at random into M pseudo-bags of (almost) equal
   size; each pseudo-bag inherits the bag's label.
2. Tier 1. Instances are reduced (a linear layer without bias and ReLU, 2048 -> 512); a gated
   attention MIL (Ilse et al. 2018) pools each pseudo-bag, F_m = sum_k a_k h_k, and a linear
   classifier scores F_m against the bag's label.
3. Instance probability (the paper's derivation through Grad-CAM). The tier-1 logit is linear
   in the weighted instances a_k h_k, so the gradient of the logit with respect to them is the
   classifier's weight w and the instance's signal is w^T (a_k h_k); its sigmoid is the
   instance's positive probability p_k (the code's ``get_cam_1d``, bias left out).
4. Feature distillation, one of the paper's four strategies: ``MaxS`` (the feature of the
   instance with the highest p_k), ``MaxMinS`` (the highest and the lowest p_k), ``MAS`` (the
   highest tier-1 attention a_k) and ``AFS`` (the pseudo-bag's aggregated feature F_m). AFS is
   the default: the authors' code defaults to it (``distill_type='AFS'``), and AFS and MaxMinS
   are the paper's two strongest. MaxS/MaxMinS/MAS take ``instances_per_pseudo_bag`` instances
   from each end (the code's ``total_instance // numGroup`` = 4 // 4 = 1); the code has no MAS.
   MaxS/MaxMinS/MAS distil the reduced instance features h_k, AFS the weighted sum, as the code.
5. Tier 2. A second gated attention MIL over the M distilled features gives the slide's logit,
   which is the model's prediction (the authors score their test slides with tier 2 only).

Choices here, where the paper or the code leaves a choice or does not fit CS-MIL's pipeline:

- Inputs. CS-MIL's Table 1 runs DTFD-MIL on multi-scale patches with 20x phenotype clusters,
  "aggregating features from multiple scales and multiple locations" (Sec. 5.1): by default
  every (location, scale) pair is an instance (``scale_input="instances"``, as the multi-scale
  gated attention and DeepAttnMISL rows), so pseudo-bags mix locations and scales.
- Binary output. One logit and binary cross-entropy, as every CS-MIL model; the code's two-class
  softmax is the same model with w = w_1 - w_0, so p_k and the selections are unchanged.
- Two optimisers as one. The code steps tier 1 with the tier-1 loss alone and tier 2 with the
  tier-2 loss alone (two Adam optimisers, same lr and weight decay; the tier-2 gradient that
  reaches tier 1 is zeroed before it is used). Here the distilled features are detached before
  tier 2 and the loss is L1 + L2: one Adam over all parameters then gives each parameter exactly
  its own tier's update. The learning rate, weight decay and epochs are CS-MIL's, as for every
  baseline of its Table 1 ("the same hyper-parameter setting"); the code's step decay is not
  used. Its gradient clipping (norm 5, per module) is kept: :meth:`DTFDMIL.clip_gradients`,
  which the CS-MIL trainer calls between backward and the step.
- Evaluation. In training the split is drawn from torch's global generator (seeded, and saved
  on resume, by the trainer). In eval mode the split is a fixed function of the bag: a private
  generator seeded with ``eval_split_seed`` ranks the slots of every bag the same way, so the
  same bag always gives the same prediction, whatever else is in the batch, and no generator
  state changes. The prediction depends on the order of a bag's slots, as any split does; the
  CS-MIL sampler draws each bag's patches in random order (and a test slide's score is the mean
  over ``test_bags`` bags), so this fixed deal still splits each bag at random. The code
  reshuffles with Python's unseeded ``random`` at every evaluation.
- Validation loss. The trainer keeps the epoch with the lowest L1 + L2 on validation bags (the
  code keeps the best validation AUC of tier 2 in its last 20% of epochs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from mmdiag.models.csmil import (
    SCALE_INPUTS,
    AttentionPooling,
    checked_batch,
    scale_instances,
    tiny_example,
)
from mmdiag.models.registry import register_model

DISTILLATIONS = ("AFS", "MaxMinS", "MaxS", "MAS")


# --------------------------------------------------------------------------- pseudo-bags


def pseudo_bag_membership(
    mask: torch.Tensor, n_pseudo_bags: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Split every bag's real instances at random into ``n_pseudo_bags`` pseudo-bags.

    ``mask`` (B, N) marks the real instances. Returns bool (B, M, N): entry (b, m, k) is True
    when instance k of bag b is in pseudo-bag m. Each real instance is in exactly one pseudo-bag,
    padding in none, and pseudo-bag sizes differ by at most one (a random order of the real
    instances dealt round-robin: the code's ``np.array_split`` of a shuffled index gives the
    same distribution of splits). A bag with fewer real instances than M leaves some pseudo-bags
    empty.

    With ``generator`` one random key per slot is drawn from it and shared by every bag (the
    eval-mode rule: a bag's split does not depend on the batch); without, every bag draws its
    own keys from torch's global generator.
    """
    if n_pseudo_bags < 1:
        raise ValueError(f"n_pseudo_bags must be >= 1, got {n_pseudo_bags}")
    if generator is None:
        keys = torch.rand(mask.shape, device=mask.device)
    else:
        keys = torch.rand(mask.shape[1], generator=generator).to(mask.device).expand(mask.shape)
    keys = keys.masked_fill(~mask, 2.0)  # padding ranks after every real instance
    rank = keys.argsort(dim=1).argsort(dim=1)
    pseudo_bag = torch.where(mask, rank % n_pseudo_bags, -1)
    return pseudo_bag[:, None, :] == torch.arange(n_pseudo_bags, device=mask.device)[:, None]


def pseudo_bag_softmax(scores: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Attention (B, M, N): softmax of ``scores`` (B, N) within each pseudo-bag; an empty
    pseudo-bag gets all zeros (and no NaN in the forward or backward pass)."""
    occupied = membership.any(dim=-1, keepdim=True)
    allowed = membership | ~occupied
    weights = torch.softmax(scores[:, None, :].masked_fill(~allowed, float("-inf")), dim=-1)
    return weights * occupied


# --------------------------------------------------------------------------- distillation


def _gather(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, M, K) of ``features`` (B, N, L) -> (B, M, K, L)."""
    batch, m, k = index.shape
    rows = index.reshape(batch, m * k, 1).expand(-1, -1, features.shape[-1])
    return features.gather(1, rows).reshape(batch, m, k, -1)


def _ranked(
    values: torch.Tensor, membership: torch.Tensor, k: int, *, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, M, k) of each pseudo-bag's k largest (or smallest) ``values`` (B, N), and
    whether each pick is a member (a pseudo-bag with fewer than k members has invalid picks)."""
    fill = float("-inf") if largest else float("inf")
    masked = values[:, None, :].masked_fill(~membership, fill)
    k = min(k, values.shape[-1])
    index = masked.topk(k, dim=-1, largest=largest).indices
    return index, membership.gather(-1, index)


def distil(
    strategy: str,
    instances: torch.Tensor,
    attention: torch.Tensor,
    instance_logit: torch.Tensor,
    membership: torch.Tensor,
    *,
    per_pseudo_bag: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled features of every pseudo-bag (paper Sec. 3, feature distillation).

    Parameters
    ----------
    strategy : {"AFS", "MaxMinS", "MaxS", "MAS"}
        AFS: the aggregated feature F_m = sum_k a_k h_k; MaxS: the instance(s) of highest
        probability p_k; MaxMinS: highest and lowest p_k; MAS: highest attention a_k.
    instances : (B, N, L)
        The reduced instance features h_k.
    attention : (B, M, N)
        Tier-1 attention within each pseudo-bag (zero outside it).
    instance_logit : (B, N)
        w^T (a_k h_k), whose sigmoid is p_k (ranking by the logit ranks by p_k).
    membership : bool (B, M, N)
        Pseudo-bag membership.
    per_pseudo_bag : int, keyword-only
        Instances taken from each end by MaxS, MaxMinS and MAS.

    Returns
    -------
    features : (B, M * K, L)
        K distilled features per pseudo-bag (K = 1 for AFS, k for MaxS/MAS, 2k for MaxMinS).
    mask : bool (B, M * K)
        False for the slots of empty pseudo-bags (and for picks beyond a small pseudo-bag).
    """
    if strategy == "AFS":
        features = torch.einsum("bmn,bnl->bml", attention, instances)
        return features, membership.any(dim=-1)
    if strategy == "MaxS":
        index, valid = _ranked(instance_logit, membership, per_pseudo_bag, largest=True)
    elif strategy == "MAS":
        index, valid = _ranked(attention.sum(dim=1), membership, per_pseudo_bag, largest=True)
    elif strategy == "MaxMinS":
        top, top_valid = _ranked(instance_logit, membership, per_pseudo_bag, largest=True)
        bottom, bottom_valid = _ranked(instance_logit, membership, per_pseudo_bag, largest=False)
        index, valid = torch.cat([top, bottom], dim=-1), torch.cat([top_valid, bottom_valid], -1)
    else:
        raise ValueError(f"distillation must be one of {DISTILLATIONS}, got {strategy!r}")
    return _gather(instances, index).flatten(1, 2), valid.flatten(1)


# --------------------------------------------------------------------------- model


class DTFDMIL(nn.Module):
    """DTFD-MIL (Zhang et al., CVPR 2022) on CS-MIL's multi-scale bags.

    Sizes are the authors' code defaults: reduction to 512 (``reduce_dim``), gated attention
    width 128 (``attention_dim``) in both tiers, M = 4 pseudo-bags (``n_pseudo_bags``, the
    code's ``numGroup``), no dropout. ``scale_input`` says how the S scales become instances
    (:func:`mmdiag.models.csmil.scale_instances`).
    """

    num_classes = 1

    def __init__(
        self,
        in_dim: int = 2048,
        *,
        scale_input: str = "instances",
        scale_index: int = 0,
        num_scales: int = 3,
        reduce_dim: int = 512,
        attention_dim: int = 128,
        n_pseudo_bags: int = 4,
        distillation: str = "AFS",
        instances_per_pseudo_bag: int = 1,
        dropout: float = 0.0,
        grad_clip: float | None = 5.0,
        eval_split_seed: int = 0,
    ) -> None:
        super().__init__()
        if scale_input not in SCALE_INPUTS:
            raise ValueError(f"scale_input must be one of {SCALE_INPUTS}, got {scale_input!r}")
        if distillation not in DISTILLATIONS:
            raise ValueError(f"distillation must be one of {DISTILLATIONS}, got {distillation!r}")
        if n_pseudo_bags < 1 or instances_per_pseudo_bag < 1:
            raise ValueError(
                "n_pseudo_bags and instances_per_pseudo_bag must be >= 1, got "
                f"{n_pseudo_bags} and {instances_per_pseudo_bag}"
            )
        self.scale_input, self.scale_index = scale_input, scale_index
        self.n_pseudo_bags, self.distillation = n_pseudo_bags, distillation
        self.instances_per_pseudo_bag = instances_per_pseudo_bag
        self.grad_clip, self.eval_split_seed = grad_clip, eval_split_seed
        instance_dim = in_dim * num_scales if scale_input == "concat" else in_dim
        self.reduce = nn.Sequential(nn.Linear(instance_dim, reduce_dim, bias=False), nn.ReLU())
        self.tier1_attention = AttentionPooling(reduce_dim, attention_dim, gated=True)
        self.tier1_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(reduce_dim, 1))
        self.tier2_attention = AttentionPooling(reduce_dim, attention_dim, gated=True)
        self.tier2_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(reduce_dim, 1))
        self.num_features = reduce_dim

    def split(self, mask: torch.Tensor) -> torch.Tensor:
        """Pseudo-bag membership (B, M, N): random in training, a fixed deal in eval mode."""
        generator = None
        if not self.training:
            generator = torch.Generator().manual_seed(self.eval_split_seed)
        return pseudo_bag_membership(mask, self.n_pseudo_bags, generator=generator)

    def tier1(self, instances: torch.Tensor, membership: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tier-1 attention (B, M, N), pseudo-bag logits (B, M) and instance logits (B, N)."""
        attention = pseudo_bag_softmax(self.tier1_attention.scores(instances), membership)
        pseudo_bag_features = torch.einsum("bmn,bnl->bml", attention, instances)  # F_m
        classifier = self.tier1_classifier[-1]
        # Grad-CAM derivation: d logit / d(a_k h_k) = w, so the instance signal is
        # w^T (a_k h_k); each instance has its attention in its own pseudo-bag only
        instance_logit = attention.sum(dim=1) * (instances @ classifier.weight[0])
        return {
            "attention": attention,
            "pseudo_bag_logit": self.tier1_classifier(pseudo_bag_features).squeeze(-1),
            "instance_logit": instance_logit,
        }

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tier 1 and the distilled features; ``bag`` (B, L) is tier 2's embedding.

        Also ``pseudo_bag_logit`` and ``pseudo_bag_mask`` (B, M), ``instance`` attention per
        location (B, N; tier-1 attention divided by the number of occupied pseudo-bags, so it
        sums to 1 over the bag) and ``instance_probability`` p_k; with
        ``scale_input="instances"`` also per (location, scale), ``instance_scale`` (B, N, S).
        """
        features, mask = checked_batch(batch)
        instances, instance_mask = scale_instances(
            features, mask, self.scale_input, self.scale_index
        )
        reduced = self.reduce(instances)
        membership = self.split(instance_mask)
        tier1 = self.tier1(reduced, membership)
        distilled, distilled_mask = distil(
            self.distillation,
            reduced,
            tier1["attention"],
            tier1["instance_logit"],
            membership,
            per_pseudo_bag=self.instances_per_pseudo_bag,
        )
        # the code's tier-2 loss never updates tier 1: its gradient there is discarded
        bag, _ = self.tier2_attention(distilled.detach(), distilled_mask)
        occupied = membership.any(dim=-1)
        attention = tier1["attention"].sum(dim=1) / occupied.sum(dim=1, keepdim=True)
        probability = torch.sigmoid(tier1["instance_logit"]) * instance_mask
        out = {
            "bag": bag,
            "pseudo_bag_logit": tier1["pseudo_bag_logit"],
            "pseudo_bag_mask": occupied,
        }
        return out | self._per_location(attention, probability, features.shape[:3])

    def _per_location(self, attention, probability, shape) -> dict[str, torch.Tensor]:
        """Instance attention and probability per location; per scale when pooled as
        instances (attention summed over scales, probability averaged)."""
        if self.scale_input != "instances":
            return {"instance": attention, "instance_probability": probability}
        per_scale = attention.reshape(shape)
        return {
            "instance": per_scale.sum(dim=2),
            "instance_scale": per_scale,
            "instance_probability": probability.reshape(shape).mean(dim=2),
        }

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.tier2_classifier(features["bag"]).squeeze(-1)  # tier 2: the slide logit

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 + L2 and the tier-2 logits (B,): L1 is the mean binary cross-entropy of the
        occupied pseudo-bags against their bag's label, L2 that of the tier-2 logits."""
        features = self.forward_features(batch)
        logits = self.forward_head(features)
        label = batch["label"].to(logits.dtype)
        occupied = features["pseudo_bag_mask"]
        pseudo_labels = label[:, None].expand_as(occupied)
        tier1_loss = F.binary_cross_entropy_with_logits(
            features["pseudo_bag_logit"][occupied], pseudo_labels[occupied]
        )
        return tier1_loss + F.binary_cross_entropy_with_logits(logits, label), logits

    def clip_gradients(self) -> None:
        """The code's clipping: each module's gradient norm to ``grad_clip`` (none if None)."""
        if self.grad_clip is None:
            return
        tier1 = (self.reduce, self.tier1_attention, self.tier1_classifier)
        for module in (*tier1, nn.ModuleList([self.tier2_attention, self.tier2_classifier])):
            nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip)

    @torch.no_grad()
    def attention(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Instance attention (B, N) and probability p_k (B, N); per scale as well for
        instances pooled across scales."""
        features = self.forward_features(batch)
        keys = ("instance", "instance_scale", "instance_probability")
        return {k: features[k] for k in keys if k in features}


# --------------------------------------------------------------------------- constructors


@register_model(family="csmil", example=tiny_example)
def dtfd_mil(in_dim: int = 2048, **kwargs) -> DTFDMIL:
    """DTFD-MIL; options ``distillation`` (AFS|MaxMinS|MaxS|MAS), ``n_pseudo_bags``,
    ``instances_per_pseudo_bag``, ``scale_input`` (default instances), ``scale_index``,
    ``reduce_dim``, ``attention_dim``, ``dropout``, ``grad_clip``, ``eval_split_seed``."""
    return DTFDMIL(in_dim, **kwargs)
