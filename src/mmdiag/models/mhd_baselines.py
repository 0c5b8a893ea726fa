"""The comparison methods of MHD-Net's Tables III and IV, adapted to CT-sequence typing.

MHD-Net (Zhang et al., IEEE JBHI 2024, Sections IV-C and IV-D) compares its CT-only student
with missing-modality methods that learn from CT + WSI in training and predict from CT alone
(Table III) and with CT-only methods (Table IV). Four of them are built here, each on the
frame-keeping 3D ResNet of :func:`mmdiag.models.mhd.create_frame_resnet` (the student's
ResNet-18 unless a ``backbone`` option says otherwise), each trained on the batches of
:func:`mmdiag.methods.mhd.data.collate_tensors` (``ct`` ``(B, 1, T, H, W)``, ``wsi``
``(B, 3, T, H, W)`` in training, ``label`` ``(B,)``) and each predicting from the CT volume
alone: ``forward`` takes a CT tensor or a batch of which only ``"ct"`` is read, never a slide
or a label, and changes no state.

- :class:`MMFormer`: Y. Zhang et al., "mmFormer: Multimodal Medical Transformer for Incomplete
  Multimodal Learning of Brain Tumor Segmentation", MICCAI 2022 (MHD-Net ref. [27]); code
  https://github.com/YaoZhang93/mmFormer.
- :class:`ModDropPlusPlus`: H. Liu et al., "ModDrop++: A Dynamic Filter Network with
  Intra-subject Co-training for Multiple Sclerosis Lesion Segmentation with Missing
  Modalities", MICCAI 2022 (ref. [29]); code https://github.com/han-liu/ModDropPlusPlus.
- :class:`SCKDDistiller`: Y. Zhu and Y. Wang, "Student Customized Knowledge Distillation:
  Bridging the Gap Between Student and Teacher", ICCV 2021 (ref. [47]); no public code.
- :class:`PCCTNet`: K. Chen et al., "PCCT: Progressive Class-Center Triplet Loss for
  Imbalanced Medical Image Classification", IEEE JBHI 2023 (ref. [52]).

mmFormer and ModDrop++ segment brain MRI; here their encoders end in a pooled classifier and
their segmentation losses (Dice + cross-entropy, focal) become cross-entropy. Each class
docstring states its adaptation; modality ``0`` is CT and ``1`` is WSI in every availability
code ``(B, 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mmdiag.models.mhd import (
    PAPER_WIDTHS,
    CTResNet,
    MHDTeacher,
    create_frame_resnet,
    logit_distillation_loss,
    mhd_teacher,
    stage_frames,
    tiny_example,
)
from mmdiag.models.mmformer import (
    PAPER_MLP_RATIO,
    InterModalTransformer,
    IntraModalTransformer,
    draw_availability,
)
from mmdiag.models.registry import register_model
from mmdiag.training.stages import freeze

#: Modalities in the order of every availability code.
MODALITIES = ("ct", "wsi")
#: Every non-empty subset of {CT, WSI}: mmFormer's training masks (all 15 subsets of four MRI
#: sequences in the authors' code, drawn uniformly).
NON_EMPTY_SUBSETS = ((True, False), (False, True), (True, True))
#: The subsets that lack a modality: the missing path of ModDrop++'s co-training.
MISSING_SUBSETS = ((True, False), (False, True))
#: The test-time code: CT present, WSI missing.
CT_ONLY = (True, False)
#: ModDrop++: weight of the feature-similarity term (the authors' code weighs its L2 term
#: 2000 against the focal loss's 10000; the paper gives no value).
MODDROP_ALPHA_SIM = 0.2
#: SCKD's distillation temperature (Hinton's KD, which SCKD weights; an option).
SCKD_TEMPERATURE = 4.0


def _ct_of(inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The CT volume of a batch (only its ``"ct"`` entry is read) or the tensor itself."""
    return inputs["ct"] if isinstance(inputs, Mapping) else inputs


def ct_only_code(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The availability code of a CT-only batch ``(n, 2)``: CT present, WSI missing."""
    return torch.tensor([CT_ONLY] * n, dtype=torch.bool, device=device)


def stage4_size(frames: int, size: int) -> tuple[int, int]:
    """Frames and in-plane size of a frame ResNet's stage-4 map for a ``frames x size²`` input.

    The stem (stride 1, 2, 2) then max pooling and stages 2-4 (stride 2) round each halving up.
    """
    side = size
    for _ in range(5):
        side = math.ceil(side / 2)
    return stage_frames(frames)[3], side


# --------------------------------------------------------------------------- mmFormer


class HybridEncoder(IntraModalTransformer):
    """mmFormer's hybrid modality-specific encoder (Sec. 2.1): a convolutional encoder for local
    features, then an intra-modal transformer over its last map's tokens for global context.

    The convolutional encoder is a frame ResNet; its stage-4 map is tokenised by a 1³
    convolution and the shared :class:`~mmdiag.models.mmformer.IntraModalTransformer` adds the
    learnable positional embedding before each layer's attention, as in the authors'
    ``Transformer``.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        tokens: int,
        widths: Sequence[int],
        backbone: str,
        shortcut_type: str,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        drop: float,
    ) -> None:
        dim = widths[-1]
        # the convolution first: a seed draws its weights before the transformer's
        conv = create_frame_resnet(
            backbone, in_channels=in_channels, widths=widths, shortcut_type=shortcut_type
        )
        tokenize = nn.Conv3d(dim, dim, 1)
        super().__init__(
            dim, tokens, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop=drop
        )
        self.conv, self.tokenize = conv, tokenize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The local map ``F_local`` (stage 4) and the global tokens ``F_global`` ``(B, N, D)``."""
        local = self.conv.forward_stages(x)[-1]  # F_local = E_conv(x)
        tokens = self.tokenize(local).flatten(2).transpose(1, 2)  # linear projection to tokens
        return local, self.contextualise(tokens)  # intra-modal transformer, position added


class MMFormer(nn.Module):
    """mmFormer adapted to classification from CT + WSI, tested on CT alone.

    Sec. 2.1: one hybrid encoder per modality (CT: a frame ResNet on the CT volume; WSI: the
    same ResNet on the WSI frames), each a convolutional encoder plus an intra-modal
    transformer. Sec. 2.2: the global tokens of a missing modality are set to zero (the
    Bernoulli indicator δ_m multiplies them, the authors' ``MaskModal``), and an inter-modal
    transformer runs over the concatenated tokens of both modalities, each with its learnable
    positional (modality) embedding added at every layer. Sec. 2.4: auxiliary regularisers.
    The transformers and the masking are :mod:`mmdiag.models.mmformer`'s, shared with the
    mmFormer row of CMUS-Net's Table 4.

    Adaptations and reductions:

    - The U-Net decoder becomes a classifier: the inter-modal tokens of both modalities are
      layer-normalised and averaged, then a linear layer gives the logits (the authors' fused
      decoder also reads every modality's bottleneck).
    - Encoder-side regulariser: one auxiliary classifier shared by both modalities (the
      authors' ``Decoder_sep`` is one module for all modalities) on each modality's pooled
      local features, trained on every modality whatever the mask (as in the authors' code).
      The decoder-side deep supervision has no counterpart (a classifier has no decoder
      scales) and is left out.
    - Training masks: each sample's code is drawn uniformly from the non-empty subsets of
      {CT, WSI} (the authors' 15 subsets of four sequences); the test code is (CT, no WSI),
      and then the WSI encoder never runs.
    - Transformer: ``depth`` blocks of width ``widths[-1]`` (paper 512, depth 1, 8 heads,
      MLP 4096: ratio 8), timm's pre-norm ``Block``; dropout ``drop`` (the authors' code 0.1,
      here 0 by default).

    Parameters
    ----------
    n_classes
        Logits (the types, plus "other" when trained).
    frames, size
        Frames and in-plane size of the input sequences (fix the token count).
    widths, backbone, shortcut_type
        The frame ResNets of both encoders.
    ct_channels, wsi_channels
        Input channels.
    depth, num_heads, mlp_ratio, drop
        The intra- and inter-modal transformers.
    alpha_aux
        Weight of the auxiliary losses (1 in the authors' code).
    """

    def __init__(
        self,
        n_classes: int = 8,
        *,
        frames: int = 24,
        size: int = 224,
        widths: Sequence[int] = PAPER_WIDTHS,
        backbone: str = "resnet18",
        ct_channels: int = 1,
        wsi_channels: int = 3,
        shortcut_type: str = "B",
        depth: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = PAPER_MLP_RATIO,
        drop: float = 0.0,
        alpha_aux: float = 1.0,
    ) -> None:
        super().__init__()
        if widths[-1] % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the token width {widths[-1]}")
        if alpha_aux < 0:
            raise ValueError(f"alpha_aux must be non-negative, got {alpha_aux}")
        self.num_classes = n_classes
        self.wsi_channels = wsi_channels
        self.alpha_aux = alpha_aux
        t, side = stage4_size(frames, size)
        options = {
            "tokens": t * side * side,
            "widths": widths,
            "backbone": backbone,
            "shortcut_type": shortcut_type,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "drop": drop,
        }
        self.encoders = nn.ModuleDict(
            {
                "ct": HybridEncoder(ct_channels, **options),
                "wsi": HybridEncoder(wsi_channels, **options),
            }
        )
        dim = widths[-1]
        self.inter = InterModalTransformer(
            dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop=drop
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        self.aux_head = nn.Linear(dim, n_classes)  # shared by the modalities (Sec. 2.4)

    def forward_features(
        self, ct: torch.Tensor, wsi: torch.Tensor | None, available: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Fused features and logits under the availability code ``available`` ``(B, 2)``.

        ``wsi`` may be ``None`` only where no sample has WSI; the WSI encoder then does not
        run and its tokens are zeros, as a masked modality's. Returns ``logits``, ``fused``
        ``(B, D)`` and the pooled local features ``local_ct`` (and ``local_wsi``).
        """
        available = available.to(ct.device)
        local_ct, tokens_ct = self.encoders["ct"](ct)
        out = {"local_ct": self.encoders["ct"].conv.pool(local_ct)}
        if wsi is None:
            if available[:, 1].any():
                raise ValueError("a sample is marked as having WSI but no wsi was given")
            tokens_wsi = torch.zeros_like(tokens_ct)
        else:
            local_wsi, tokens_wsi = self.encoders["wsi"](wsi)
            out["local_wsi"] = self.encoders["wsi"].conv.pool(local_wsi)
        positions = [self.encoders[m].position for m in MODALITIES]
        # Sec. 2.2: tokens times δ_m, then the inter-modal transformer over both modalities
        tokens = self.inter([tokens_ct, tokens_wsi], positions, available)
        out["fused"] = self.norm(tokens).mean(dim=1)
        out["logits"] = self.head(out["fused"])
        return out

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits from a CT volume alone (WSI missing), or from a batch's ``"ct"`` only."""
        ct = _ct_of(inputs)
        return self.forward_features(ct, None, ct_only_code(len(ct), ct.device))["logits"]

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of the fused prediction under a random mask per sample plus
        ``alpha_aux`` times the auxiliary cross-entropies of both modalities (Sec. 2.4).

        Returns the loss, the fused logits and the terms ``ce_fusion``, ``aux_ct``, ``aux_wsi``.
        """
        ct, label = batch["ct"], batch["label"]
        available = draw_availability(len(ct), NON_EMPTY_SUBSETS, ct.device)
        out = self.forward_features(ct, batch["wsi"], available)
        terms = {"ce_fusion": F.cross_entropy(out["logits"], label, weight=class_weight)}
        for modality in MODALITIES:
            aux_logits = self.aux_head(out[f"local_{modality}"])
            terms[f"aux_{modality}"] = F.cross_entropy(aux_logits, label, weight=class_weight)
        loss = terms["ce_fusion"] + self.alpha_aux * (terms["aux_ct"] + terms["aux_wsi"])
        return loss, out["logits"], terms


# --------------------------------------------------------------------------- ModDrop++


class FilterScaling(nn.Module):
    """ModDrop++'s dynamic head (Sec. 2.2): a controller maps the modality code to a filter
    scaling matrix ``S`` (one scale per output and input channel), and the first convolution
    runs with the weights ``W ⊙ S`` of each sample's code.

    The controller is a linear layer (a 1×1 convolution on the code in the authors' code). The
    ResNet stem has no bias, so only the weights are scaled (the authors also scale a bias).
    """

    def __init__(self, conv: nn.Conv3d, n_modalities: int = len(MODALITIES)) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("filter scaling needs an ungrouped convolution")
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.stride, self.padding = conv.stride, conv.padding
        self.controller = nn.Linear(n_modalities, self.out_channels * self.in_channels)

    def scales(self, available: torch.Tensor) -> torch.Tensor:
        """The scaling matrices ``(B, C_out, C_in)`` of the codes ``available`` ``(B, M)``."""
        s = self.controller(available.float())
        return s.view(len(available), self.out_channels, self.in_channels)

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, available: torch.Tensor
    ) -> torch.Tensor:
        """The convolution of each sample of ``x`` with ``weight ⊙ S(code)``."""
        n = len(x)
        scaled = weight.unsqueeze(0) * self.scales(available)[..., None, None, None]  # W ⊙ S
        y = F.conv3d(
            x.reshape(1, n * self.in_channels, *x.shape[2:]),
            scaled.reshape(n * self.out_channels, self.in_channels, *weight.shape[2:]),
            stride=self.stride,
            padding=self.padding,
            groups=n,  # one sample per group: its own filters
        )
        return y.view(n, self.out_channels, *y.shape[2:])


class ModDropPlusPlus(nn.Module):
    """ModDrop++ adapted to classification from CT + WSI, tested with the code (CT=1, WSI=0).

    ModDrop: one network takes the modalities stacked as input channels (CT's 1 and the WSI
    frames' 3), a missing modality's channels set to zero. Sec. 2.2: the first convolution is
    a dynamic head whose filters are scaled by a controller of the binary availability code
    (:class:`FilterScaling`). Sec. 2.3, intra-subject co-training: each training sample passes
    twice, with both modalities and with a missing pattern, both predictions are trained with
    cross-entropy, and a similarity loss pulls the dynamic head's features of the missing pass
    towards those of the full pass.

    Adaptations and choices:

    - Network: a frame ResNet whose stem convolution is the dynamic head (the authors': the
      first convolution of a 2.5D Tiramisu); the co-trained features are the stem's output
      (convolution, batch norm, ReLU), the dynamic head's output as in the authors' code.
    - Losses: cross-entropy for their focal + Dice segmentation losses; the similarity loss is
      the mean squared error (the authors' code offers L2, SSIM or KL) with weight
      ``alpha_sim`` (paper: none given; 0.2 is the authors' code's L2 weight over its focal
      weight).
    - The missing pattern is drawn uniformly from the subsets that lack a modality ({CT},
      {WSI}); the full pass has both.

    Parameters
    ----------
    n_classes
        Logits.
    widths, backbone, shortcut_type
        The frame ResNet.
    ct_channels, wsi_channels
        Input channels of each modality.
    alpha_sim
        Weight of the feature-similarity term.
    """

    def __init__(
        self,
        n_classes: int = 8,
        *,
        widths: Sequence[int] = PAPER_WIDTHS,
        backbone: str = "resnet18",
        ct_channels: int = 1,
        wsi_channels: int = 3,
        shortcut_type: str = "B",
        alpha_sim: float = MODDROP_ALPHA_SIM,
    ) -> None:
        super().__init__()
        if alpha_sim < 0:
            raise ValueError(f"alpha_sim must be non-negative, got {alpha_sim}")
        self.num_classes = n_classes
        self.ct_channels, self.wsi_channels = ct_channels, wsi_channels
        self.alpha_sim = alpha_sim
        self.backbone = create_frame_resnet(
            backbone,
            in_channels=ct_channels + wsi_channels,
            widths=widths,
            shortcut_type=shortcut_type,
        )
        self.dynamic_head = FilterScaling(self.backbone.conv1)
        self.head = nn.Linear(widths[-1], n_classes)

    def forward_features(
        self, ct: torch.Tensor, wsi: torch.Tensor | None, available: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Logits and the dynamic head's features under the codes ``available`` ``(B, 2)``.

        A missing modality's channels are zeros (``wsi`` ``None``: zeros for every sample, and
        no sample may be marked as having WSI).
        """
        available = available.to(ct.device)
        if wsi is None:
            if available[:, 1].any():
                raise ValueError("a sample is marked as having WSI but no wsi was given")
            wsi = ct.new_zeros((len(ct), self.wsi_channels, *ct.shape[2:]))
        keep = available.to(ct.dtype)[:, :, None, None, None, None]
        x = torch.cat([ct * keep[:, 0], wsi * keep[:, 1]], dim=1)  # ModDrop: zeroed channels
        features = self.dynamic_head(x, self.backbone.conv1.weight, available)  # W ⊙ S(code)
        features = self.backbone.act(self.backbone.bn1(features))
        x = features
        for stage in range(1, self.backbone.num_stages):
            x = self.backbone.stage(stage, x)
        return {"logits": self.head(self.backbone.pool(x)), "features": features}

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits from a CT volume with the code (CT=1, WSI=0), or from a batch's ``"ct"``."""
        ct = _ct_of(inputs)
        return self.forward_features(ct, None, ct_only_code(len(ct), ct.device))["logits"]

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Co-training (Sec. 2.3): ``CE(full) + CE(missing) + alpha_sim * MSE(f_full, f_miss)``.

        Returns the loss, the missing pass's logits (the test condition's) and the terms
        ``ce_full``, ``ce_missing`` and ``similarity``.
        """
        ct, wsi, label = batch["ct"], batch["wsi"], batch["label"]
        full = self.forward_features(ct, wsi, torch.ones(len(ct), 2, dtype=torch.bool))
        missing_code = draw_availability(len(ct), MISSING_SUBSETS, ct.device)
        missing = self.forward_features(ct, wsi, missing_code)
        terms = {
            "ce_full": F.cross_entropy(full["logits"], label, weight=class_weight),
            "ce_missing": F.cross_entropy(missing["logits"], label, weight=class_weight),
            "similarity": F.mse_loss(missing["features"], full["features"]),
        }
        loss = terms["ce_full"] + terms["ce_missing"] + self.alpha_sim * terms["similarity"]
        return loss, missing["logits"], terms


# --------------------------------------------------------------------------- SCKD


def gradient_cosine(
    first: torch.Tensor, second: torch.Tensor, parameters: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Cosine similarity of the gradients of two losses over ``parameters`` (a 0-d tensor,
    no gradient); 0 when either gradient vanishes. The graph is kept for the caller."""
    grads = []
    for loss in (first, second):
        parts = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        flat = [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(parts, parameters, strict=True)
        ]
        grads.append(torch.cat(flat))
    return F.cosine_similarity(grads[0], grads[1], dim=0, eps=1e-12).detach()


class SCKDDistiller(nn.Module):
    """SCKD: logit distillation from the frozen MHD-Net teacher into a CT-only ResNet student,
    the distillation term weighted by the student's gradient similarity.

    SCKD treats distillation as multi-task learning: the teacher transfers knowledge only when
    the student can benefit from it, judged by the similarity of the gradients of the task loss
    and the distillation loss on the student's parameters. Each step computes
    ``w = cos(∇_θ L_CE, ∇_θ L_KD)`` over every trainable student parameter and minimises
    ``L_CE + alpha_kd * max(w, 0) * L_KD`` (``w`` a constant of the step); a conflicting
    distillation gradient (``w < 0``) is dropped for that step (``clip_negative=False`` keeps
    the signed weight).

    Adaptations: the teacher is MHD-Net's teacher (the trained checkpoint of the ``teacher``
    variant, frozen), its logits the fusion logits ``z_F`` from CT + WSI; the student is the CT
    ResNet-18 of :class:`~mmdiag.models.mhd.CTResNet` and is the deployed model; ``L_KD`` is
    Hinton's temperature-scaled KL (:func:`~mmdiag.models.mhd.logit_distillation_loss`, scaled
    by T², T = 4 by default). Under data parallelism ``w`` is each process's own.

    Parameters
    ----------
    teacher
        The trained multi-modal teacher; frozen in place.
    student
        The CT network to train.
    alpha_kd, temperature
        Weight and temperature of the distillation term.
    clip_negative
        Drop the distillation term when the gradients conflict (``max(w, 0)``).
    """

    def __init__(
        self,
        teacher: MHDTeacher,
        student: CTResNet,
        *,
        alpha_kd: float = 1.0,
        temperature: float = SCKD_TEMPERATURE,
        clip_negative: bool = True,
    ) -> None:
        super().__init__()
        if alpha_kd < 0:
            raise ValueError(f"alpha_kd must be non-negative, got {alpha_kd}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.teacher, self.student = freeze(teacher), student
        self.alpha_kd, self.temperature, self.clip_negative = alpha_kd, temperature, clip_negative
        self.num_classes = student.num_classes

    def deploy(self) -> CTResNet:
        """The CT-only model: the student (shared, not copied)."""
        return self.student

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Student logits from a CT volume, or from a batch of which only ``"ct"`` is read."""
        return self.student(_ct_of(inputs))

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``CE + alpha_kd * w * KL`` on a batch with ``ct``, ``wsi`` (teacher only), ``label``.

        Returns the loss, the student logits and the terms ``ce``, ``kd`` and
        ``gradient_cosine`` (the unclipped ``w``; NaN, and the weight 1, under ``no_grad``).
        """
        with torch.no_grad():
            teacher_logits = self.teacher(batch["ct"], batch["wsi"])["logits_fusion"]
        logits = self.student(batch["ct"])
        ce = F.cross_entropy(logits, batch["label"], weight=class_weight)
        kd = logit_distillation_loss(teacher_logits, logits, temperature=self.temperature)
        if torch.is_grad_enabled():
            parameters = [p for p in self.student.parameters() if p.requires_grad]
            cosine = gradient_cosine(ce, kd, parameters)
            weight = cosine.clamp_min(0.0) if self.clip_negative else cosine
        else:  # no graph to measure the gradients on (a loss evaluated under no_grad)
            cosine, weight = ce.new_tensor(float("nan")), 1.0
        loss = ce + self.alpha_kd * weight * kd
        return loss, logits, {"ce": ce, "kd": kd, "gradient_cosine": cosine}


# --------------------------------------------------------------------------- PCCT


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(n, m)`` with a finite gradient at zero distance."""
    squared = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return squared.clamp_min(1e-12).sqrt()


def _class_balanced_mean(per_anchor: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor):
    """Mean over anchors of each class, then over classes with a valid triplet (0 if none)."""
    means = []
    for c in labels.unique():
        rows = (labels == c) & valid
        if rows.any():
            means.append(per_anchor[rows].mean())
    return torch.stack(means).mean() if means else per_anchor.sum() * 0.0


def class_balanced_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """PCCT's first stage: the triplet loss ``max(0, d(a, p) - d(a, n) + m)`` over every
    in-batch triplet, averaged per anchor, then per class, then over the classes, so each class
    weighs the same whatever its frequency."""
    d = _distances(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    valid = positive[:, :, None] & negative[:, None, :]  # (anchor, positive, negative)
    hinge = F.relu(d[:, :, None] - d[:, None, :] + margin) * valid
    counts = valid.sum((1, 2))
    per_anchor = hinge.sum((1, 2)) / counts.clamp_min(1)
    return _class_balanced_mean(per_anchor, counts > 0, labels)


def class_centre_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    centres: torch.Tensor,
    seen: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """PCCT's second stage: the triplet loss with the positive and the negative replaced by
    their class centres, ``max(0, d(a, c_y) - d(a, c_k) + m)`` for every other class ``k``
    with a centre, averaged per anchor, per class, then over the classes."""
    d = _distances(embeddings, centres)  # (anchor, class)
    positive = d.gather(1, labels[:, None])
    negative = seen[None, :] & (torch.arange(len(centres), device=labels.device) != labels[:, None])
    valid_anchor = seen[labels] & negative.any(1)
    hinge = F.relu(positive - d + margin) * negative
    per_anchor = hinge.sum(1) / negative.sum(1).clamp_min(1)
    return _class_balanced_mean(per_anchor, valid_anchor, labels)


class PCCTNet(nn.Module):
    """PCCT: a CT ResNet trained with cross-entropy plus the progressive class-centre triplet
    loss, in two successive stages.

    Stage 1 (the first ``stage_one_fraction`` of the training steps): the class-balanced
    triplet loss separates the classes coarsely (:func:`class_balanced_triplet_loss`). Stage 2:
    the class-centre triplet loss replaces the positive and the negative of each triplet by
    their class centres, compacting each class (:func:`class_centre_triplet_loss`). The loss is
    ``CE + alpha_triplet * L_triplet`` on L2-normalised pooled features.

    Adaptations and choices: the paper's 2D ResNet-50 becomes the frame 3D ResNet-18 (or
    ``resnet34``); triplets are every in-batch triplet, balanced by averaging per class (the
    paper samples triplets equally per class); the class centres are exponential moving
    averages (``centre_momentum``) of each class's mean normalised embedding in the training
    batches, updated before the stage-2 loss reads them and never in evaluation mode;
    the margin and the stage split are choices (the paper's values are not used here).
    The trainer sets the number of steps with :meth:`set_total_steps`; until then every step
    is a stage-1 step.

    Parameters
    ----------
    n_classes
        Logits.
    widths, backbone, ct_channels, shortcut_type
        The frame ResNet.
    alpha_triplet, margin
        Weight and margin of the triplet losses.
    stage_one_fraction
        Fraction of the training steps in stage 1.
    centre_momentum
        Weight of a centre's previous value in its moving average.
    """

    def __init__(
        self,
        n_classes: int = 8,
        *,
        widths: Sequence[int] = PAPER_WIDTHS,
        backbone: str = "resnet18",
        ct_channels: int = 1,
        shortcut_type: str = "B",
        alpha_triplet: float = 1.0,
        margin: float = 0.3,
        stage_one_fraction: float = 0.5,
        centre_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if not 0 <= stage_one_fraction <= 1:
            raise ValueError(f"stage_one_fraction must be in [0, 1], got {stage_one_fraction}")
        if not 0 <= centre_momentum < 1:
            raise ValueError(f"centre_momentum must be in [0, 1), got {centre_momentum}")
        if alpha_triplet < 0 or margin < 0:
            raise ValueError("alpha_triplet and margin must be non-negative")
        self.num_classes = n_classes
        self.alpha_triplet, self.margin = alpha_triplet, margin
        self.stage_one_fraction, self.centre_momentum = stage_one_fraction, centre_momentum
        self.backbone = create_frame_resnet(
            backbone, in_channels=ct_channels, widths=widths, shortcut_type=shortcut_type
        )
        self.head = nn.Linear(widths[-1], n_classes)
        self.register_buffer("centres", torch.zeros(n_classes, widths[-1]))
        self.register_buffer("centre_seen", torch.zeros(n_classes, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("stage_one_steps", torch.tensor(-1, dtype=torch.long))

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule: stage 1 for the first ``stage_one_fraction`` of ``total_steps``."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.stage_one_steps.fill_(round(self.stage_one_fraction * total_steps))

    @property
    def stage(self) -> int:
        """The stage (1 or 2) of the next training step."""
        stage_one = int(self.stage_one_steps)
        return 1 if stage_one < 0 or int(self.step) < stage_one else 2

    def forward_features(self, ct: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits and the L2-normalised embedding of a CT volume."""
        pooled = self.backbone(ct)
        return {"logits": self.head(pooled), "embedding": F.normalize(pooled, dim=1)}

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits from a CT volume, or from a batch of which only ``"ct"`` is read."""
        return self.forward_features(_ct_of(inputs))["logits"]

    @torch.no_grad()
    def update_centres(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Move each batch class's centre towards its mean embedding (a first visit sets it)."""
        for c in labels.unique():
            mean = embeddings[labels == c].mean(0)
            m = self.centre_momentum if bool(self.centre_seen[c]) else 0.0
            self.centres[c] = m * self.centres[c] + (1 - m) * mean
            self.centre_seen[c] = True

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``CE + alpha_triplet * L_triplet`` of the current stage; returns the loss, the
        logits and the terms ``ce`` and ``triplet``. In training mode it advances the step
        and updates the centres; in evaluation mode it reads them only."""
        out = self.forward_features(batch["ct"])
        label, embedding = batch["label"], out["embedding"]
        stage = self.stage
        if self.training:
            self.update_centres(embedding.detach(), label)
            self.step += 1
        if stage == 1:
            triplet = class_balanced_triplet_loss(embedding, label, self.margin)
        else:
            triplet = class_centre_triplet_loss(
                embedding, label, self.centres, self.centre_seen, self.margin
            )
        ce = F.cross_entropy(out["logits"], label, weight=class_weight)
        return ce + self.alpha_triplet * triplet, out["logits"], {"ce": ce, "triplet": triplet}


# --------------------------------------------------------------------------- registry


def _baseline_example():
    """A tiny network's arguments and a paired CT + WSI batch."""
    arguments, data = tiny_example()
    return {"n_classes": 3, "widths": arguments["widths"]}, data


def _mmformer_example():
    arguments, data = _baseline_example()
    return arguments | {"frames": 8, "size": 32, "num_heads": 2}, data


@register_model(family="mhd", example=_mmformer_example)
def mmformer(n_classes: int = 9, **options) -> MMFormer:
    """mmFormer on CT + WSI frame ResNets, tested on CT alone (Table III)."""
    return MMFormer(n_classes, **options)


@register_model(family="mhd", example=_baseline_example)
def moddrop(n_classes: int = 9, **options) -> ModDropPlusPlus:
    """ModDrop++ on the stacked CT + WSI channels, tested with the code (CT=1, WSI=0)."""
    return ModDropPlusPlus(n_classes, **options)


@register_model(family="mhd", example=tiny_example)
def sckd(
    n_classes: int = 9,
    *,
    frames: int = 24,
    widths: Sequence[int] = PAPER_WIDTHS,
    student_widths: Sequence[int] | None = None,
    student_backbone: str = "resnet18",
    alpha_kd: float = 1.0,
    temperature: float = SCKD_TEMPERATURE,
    clip_negative: bool = True,
    **teacher_arguments,
) -> SCKDDistiller:
    """SCKD around a teacher built by :func:`~mmdiag.models.mhd.mhd_teacher` from
    ``teacher_arguments`` (its trained weights are loaded into it; the memory is unused)."""
    teacher = mhd_teacher(n_classes, frames=frames, widths=widths, **teacher_arguments).teacher
    student = CTResNet(n_classes, widths=student_widths or widths, backbone=student_backbone)
    return SCKDDistiller(
        teacher,
        student,
        alpha_kd=alpha_kd,
        temperature=temperature,
        clip_negative=clip_negative,
    )


@register_model(family="mhd", example=_baseline_example)
def pcct(n_classes: int = 9, **options) -> PCCTNet:
    """PCCT on a CT frame ResNet-18 (Table IV)."""
    return PCCTNet(n_classes, **options)
