"""MHD-Net: the multi-modal teacher, its training with the CTMM, the memory-aware student and the
distillation (eqs. 4, 10-14).

Paper: H. Zhang et al., "MHD-Net: Memory-Aware Hetero-Modal Distillation Network for Thymic
Epithelial Tumor Typing With Missing Pathology Modality", IEEE Journal of Biomedical and Health
Informatics, 2024 (Section III-A, eq. 4, Fig. 2). Authors' code:
https://github.com/wangpengyu0829/MHD-Net (commit dd00296; the teacher's model file is not
published, its backbone is ``resnet_ori.py``).

The teacher reads a CT volume ``ct`` ``(B, 1, T, H, W)`` and ``T`` WSI patches stacked as frames
``wsi`` ``(B, 3, T, H, W)``. The radiology branch ``B_R`` and the pathology branch ``B_P`` are
3D ResNet-34s; at stages 1-3 an SHFM (:mod:`mmdiag.models.shfm`) fuses their outputs into
``f_F^s = SHFM^s(f_R^s, f_P^s)``, which feeds the fusion branch ``B_F``; each branch has its own
classifier (``z_R``, ``z_P``, ``z_F``) and the teacher minimises the sum of their cross-entropies
(eq. 4).

Backbone: the ResNets keep the frame axis in the stem (7³ convolution with stride (1, 2, 2),
then 3³ max pooling with stride 2), as in the authors' ``resnet_ori.py``, so a 24 × 224² input
gives the paper's stage outputs (t × c × h × w) 12 × 64 × 56², 6 × 128 × 28², 3 × 256 × 14² and
2 × 512 × 7². :func:`mmdiag.models.backbones3d.create_backbone3d` halves every axis in the stem
(6 frames at stage 1) and has fixed widths, so :func:`create_frame_resnet` builds the same MONAI
ResNet with the stem's frame stride 1 and configurable widths, wrapped in the same
:class:`~mmdiag.models.backbones3d.Backbone3d`.

Fusion branch, a choice: the paper says ``f_F^s`` "is the input of ``B_F^s``" and that every
branch is a ResNet-34. Here ``B_F`` has stages 2-4 only (its stem and stage 1 would see no
input); ``f_F^1`` is the input of its stage 2, and the fused feature of stages 2 and 3 is added
to the output of its stage at that scale: ``x_F^s = B_F^s(x_F^{s-1}) + f_F^s``, ``x_F^1 = f_F^1``.
Replacing ``B_F^s``'s output by ``f_F^s`` instead would leave ``B_F``'s stages 2 and 3 without
any effect on the output.

Teacher training with the memory (:class:`MHDTeacherWithMemory`, eq. 10): eq. 4 plus 0.3 times
ConMB; the memory (:mod:`mmdiag.models.type_memory`) is updated from the pathology features of
the batch's tumour sequences, then ConMB reads the updated banks.

Student (Section III-C): :class:`MHDStudent` is a 3D ResNet-18 on CT whose stage 1-3 features
are fused by SHFMs with the memory maps of eq. 11, read with the type probabilities of the
frozen teacher's radiology branch. :class:`MHDDeployed` is the test-time model (teacher ``B_R``
and memory frozen, student trained) and takes CT alone; :class:`MHDDistiller` trains the student
with eq. 14 (CE + 0.1 MSE of eq. 12 + 0.5 KL of eq. 13) against the frozen teacher, which alone
sees the WSI. Choices where the paper is silent: ``f_R'^s + f_F'^s`` enters stage ``s + 1`` (the
authors' code); eq. 12 is a mean of squares per stage on ``f_F'^s`` (the SHFM output, as the
teacher's ``f_F^s``); the teacher logits of eq. 13 are its fusion logits; eq. 13 has T = 1 and
the authors' T = 20 is an option, scaled by T².
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mmdiag.models.backbones3d import Backbone3d
from mmdiag.models.registry import register_model
from mmdiag.models.shfm import SHFM, ConcatFusion
from mmdiag.models.type_memory import (
    PAPER_ALPHA_CONMB,
    PAPER_CAPACITIES,
    PAPER_DECAY,
    TypeMemory,
)
from mmdiag.training.stages import freeze

#: Stage widths of the paper's ResNets.
PAPER_WIDTHS = (64, 128, 256, 512)
#: Frames T of the paper's inputs.
PAPER_FRAMES = 24
#: ResBlocks per stage.
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
#: Fusion modules between B_R/B_P and B_F: SHFM or the "w/o SHFM" concatenation (Fig. 5).
FUSIONS = {"shfm": SHFM, "concat": ConcatFusion}
#: SHFM keyword options a teacher passes to every SHFM (and a student's SHFMs share).
SHFM_OPTIONS = ("gate_kernel", "reduction", "reduce_kernel", "norm_layer", "backend")
#: Stages (1-based, as in the paper) whose features are fused.
FUSED_STAGES = (1, 2, 3)
#: Names of the three branches, in the order of eq. 4.
BRANCHES = ("radiology", "pathology", "fusion")
#: Weights of the MSE (eq. 12) and KL (eq. 13) terms in eq. 14 (Fig. 7).
PAPER_ALPHA_MSE = 0.1
PAPER_ALPHA_KL = 0.5

_RESNET_NAMES = ("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4")
_STAGE_LAYOUT = (("conv1", "bn1", "act"), ("maxpool", "layer1"), ("layer2",), ("layer3",))
_STAGE_LAYOUT += (("layer4",),)


# --------------------------------------------------------------------------- building blocks


def create_frame_resnet(
    name: str = "resnet34",
    *,
    in_channels: int,
    widths: Sequence[int] = PAPER_WIDTHS,
    shortcut_type: str = "B",
    first_stage: int = 0,
) -> Backbone3d:
    """A MONAI ResNet whose stem keeps the frame axis, as a :class:`Backbone3d`.

    Parameters
    ----------
    name
        ``"resnet18"`` or ``"resnet34"``.
    in_channels
        Channels of the input (1 for CT, 3 for WSI).
    widths
        Channels of stages 1-4 (the stem has ``widths[0]``).
    shortcut_type
        ``"B"`` (1³ convolution, without bias as in MedicalNet) or ``"A"`` (zero padding).
    first_stage
        Stages before this one (0 is the stem) are dropped, for a branch that starts from
        features: its stage ``i`` is then the ResNet's stage ``first_stage + i``.
    """
    from monai.networks.nets import ResNet  # heavy import, deferred to model construction

    if name not in RESNET_BLOCKS:
        raise ValueError(f"name must be one of {sorted(RESNET_BLOCKS)}, got {name!r}")
    if len(widths) != 4:
        raise ValueError(f"widths must give 4 stage widths, got {tuple(widths)}")
    net = ResNet(
        "basic",
        list(RESNET_BLOCKS[name]),
        [int(w) for w in widths],
        spatial_dims=3,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=(1, 2, 2),
        shortcut_type=shortcut_type,
        bias_downsample=False,
        feed_forward=False,
    )
    layout = _STAGE_LAYOUT[first_stage:]
    used = {path for stage in layout for path in stage}
    body = {n: getattr(net, n) for n in _RESNET_NAMES if n in used}
    channels = (widths[0], *widths)[first_stage:]
    pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
    return Backbone3d(name, body, layout, pool, channels)


def stage_frames(frames: int) -> tuple[int, int, int, int]:
    """Frames ``t_s`` of stages 1-4 for ``frames`` input frames: each stage halves, rounding up
    (3³ pooling or convolution with stride 2 and padding 1)."""
    sizes, t = [], frames
    for _ in range(4):
        t = math.ceil(t / 2)
        sizes.append(t)
    return tuple(sizes)


# --------------------------------------------------------------------------------- model


class MHDTeacher(nn.Module):
    """MHD-Net's multi-modal teacher (Section III-A): B_R, B_P, B_F, SHFMs at stages 1-3.

    Parameters
    ----------
    n_classes
        Tumour types (8 in the RPTET dataset).
    frames
        Frames ``T`` of the CT and WSI inputs (paper 24); fixes every SHFM's frame count.
    widths
        Channels of stages 1-4 (paper 64, 128, 256, 512).
    backbone
        ``"resnet34"`` (paper) or ``"resnet18"``.
    kernel_sizes
        Involution size κ of the SHFMs at stages 1-3 (paper 7 each; authors' code 7, 5, 3).
    fusion
        ``"shfm"`` or ``"concat"`` (the "w/o SHFM" ablation).
    ct_channels, wsi_channels
        Input channels of the CT and WSI volumes.
    shortcut_type
        ResNet shortcut, ``"B"`` or ``"A"``.
    **fusion_kwargs
        Passed to every SHFM (``gate_kernel``, ``reduction``, ``reduce_kernel``,
        ``norm_layer``, ``backend``).
    """

    def __init__(
        self,
        n_classes: int = 8,
        *,
        frames: int = PAPER_FRAMES,
        widths: Sequence[int] = PAPER_WIDTHS,
        backbone: str = "resnet34",
        kernel_sizes: Sequence[int] = (7, 7, 7),
        fusion: str = "shfm",
        ct_channels: int = 1,
        wsi_channels: int = 3,
        shortcut_type: str = "B",
        **fusion_kwargs: object,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
        if len(kernel_sizes) != len(FUSED_STAGES):
            raise ValueError(f"kernel_sizes must give one κ per stage 1-3, got {kernel_sizes}")
        self.num_classes = n_classes
        self.frames = frames
        resnet = {"name": backbone, "widths": widths, "shortcut_type": shortcut_type}
        self.radiology = create_frame_resnet(in_channels=ct_channels, **resnet)  # B_R
        self.pathology = create_frame_resnet(in_channels=wsi_channels, **resnet)  # B_P
        self.fusion = create_frame_resnet(in_channels=widths[0], first_stage=2, **resnet)  # B_F
        t = stage_frames(frames)
        self.fuse = nn.ModuleList(
            FUSIONS[fusion](widths[s - 1], t[s - 1], kernel_size=k, **fusion_kwargs)
            for s, k in zip(FUSED_STAGES, kernel_sizes, strict=True)
        )
        self.heads = nn.ModuleDict({b: nn.Linear(widths[-1], n_classes) for b in BRANCHES})

    def forward(self, ct: torch.Tensor, wsi: torch.Tensor) -> dict[str, object]:
        """Logits of the three branches and the stage 1-3 features the memory and the student use.

        Returns
        -------
        dict
            ``logits_radiology``, ``logits_pathology``, ``logits_fusion`` (``z_R``, ``z_P``,
            ``z_F``, each ``(B, n_classes)``); ``features_radiology``, ``features_pathology``
            and ``features_fusion``: tuples of the stage 1-3 maps ``f_R^s``, ``f_P^s`` and
            ``f_F^s = SHFM^s(f_R^s, f_P^s)``, each ``(B, c_s, t_s, h_s, w_s)``.
        """
        f_r, f_p = self.radiology.stem(ct), self.pathology.stem(wsi)
        features = {branch: [] for branch in BRANCHES}
        x_f = None
        for stage in range(1, 5):
            f_r, f_p = self.radiology.stage(stage, f_r), self.pathology.stage(stage, f_p)
            if x_f is not None:
                x_f = self.fusion.stage(stage - 2, x_f)  # B_F^s on x_F^{s-1}
            if stage in FUSED_STAGES:
                f_f = self.fuse[stage - 1](f_r, f_p)  # f_F^s = SHFM^s(f_R^s, f_P^s)
                x_f = f_f if x_f is None else x_f + f_f
                for branch, value in zip(BRANCHES, (f_r, f_p, f_f), strict=True):
                    features[branch].append(value)
        pooled = {
            "radiology": self.radiology.pool(f_r),
            "pathology": self.pathology.pool(f_p),
            "fusion": self.fusion.pool(x_f),
        }
        out: dict[str, object] = {f"logits_{b}": self.heads[b](pooled[b]) for b in BRANCHES}
        out.update({f"features_{b}": tuple(features[b]) for b in BRANCHES})
        return out

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 4: ``CE(z_R, y) + CE(z_P, y) + CE(z_F, y)`` on ``batch["ct"]``, ``batch["wsi"]``
        and ``batch["label"]``; returns the loss, the fusion logits ``z_F`` (the teacher's
        prediction) and the three terms ``ce_radiology``, ``ce_pathology``, ``ce_fusion``."""
        out = self(batch["ct"], batch["wsi"])
        label = batch["label"]
        terms = {
            f"ce_{b}": F.cross_entropy(out[f"logits_{b}"], label, weight=class_weight)
            for b in BRANCHES
        }
        return sum(terms.values()), out["logits_fusion"], terms  # eq. 4


# --------------------------------------------------------------------------- teacher with CTMM


def memory_item_dim(frames: int, widths: Sequence[int]) -> int:
    """Item dimension ``D = c_s * t_s`` of the CTMM for a teacher's ``frames`` and ``widths``.

    One dimension serves every stage (ConMB reconstructs each stage's features from every
    stage's bank), so ``c_s * t_s`` must be equal at stages 1-3 (768 at paper scale).
    """
    t = stage_frames(frames)
    dims = {int(widths[s - 1]) * t[s - 1] for s in FUSED_STAGES}
    if len(dims) != 1:
        raise ValueError(
            f"c_s * t_s must be equal at stages 1-3 for one memory, got {sorted(dims)} "
            f"for frames={frames}, widths={tuple(widths)}"
        )
    return dims.pop()


def _ct_of(inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The CT volume of a batch (only its ``"ct"`` entry is read) or the tensor itself."""
    return inputs["ct"] if isinstance(inputs, Mapping) else inputs


class MHDTeacherWithMemory(nn.Module):
    """The teacher trained with its CTMM (eq. 10): eq. 4 + ``alpha_conmb`` * L_ConMB.

    The memory stores the pathology branch's stage 1-3 features ``f_P^s`` (Section III-B: "CTMM
    stores each stage pathology feature f_P"), not the fusion features. In training mode each
    :meth:`loss` first updates the banks of the ground-truth types with the tumour sequences of
    the batch (eqs. 5-6, no gradient), then computes ConMB (eqs. 7-9) on the updated banks, the
    order :class:`~mmdiag.models.type_memory.TypeMemory` expects; the ConMB gradient reaches
    ``B_P``. In evaluation mode the banks are not touched (labels are never used to update
    outside training) and ConMB is read from them as they are.

    Parameters
    ----------
    teacher
        The multi-modal teacher.
    memory
        Its CTMM; item dimension :func:`memory_item_dim` of the teacher.
    alpha_conmb
        Weight of ConMB in eq. 10 (paper 0.3, Fig. 7).
    """

    def __init__(
        self, teacher: MHDTeacher, memory: TypeMemory, *, alpha_conmb: float = PAPER_ALPHA_CONMB
    ) -> None:
        super().__init__()
        if alpha_conmb < 0:
            raise ValueError(f"alpha_conmb must be non-negative, got {alpha_conmb}")
        self.teacher, self.memory, self.alpha_conmb = teacher, memory, alpha_conmb
        self.num_classes = teacher.num_classes

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's prediction ``z_F`` from ``batch["ct"]`` and ``batch["wsi"]``."""
        return self.teacher(batch["ct"], batch["wsi"])["logits_fusion"]

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 10 on a batch with ``ct``, ``wsi``, ``label`` and ``tumour`` (B,) bool.

        Returns the loss, the fusion logits and the terms ``ce_radiology``, ``ce_pathology``,
        ``ce_fusion`` and ``conmb``.
        """
        if "tumour" not in batch:
            raise ValueError("batch must hold 'tumour': only tumour sequences update the memory")
        out = self.teacher(batch["ct"], batch["wsi"])
        label = batch["label"]
        terms = {
            f"ce_{b}": F.cross_entropy(out[f"logits_{b}"], label, weight=class_weight)
            for b in BRANCHES
        }
        pathology = out["features_pathology"]
        if self.training:
            self.memory.update(pathology, label, batch["tumour"])  # eqs. 5-6 before ConMB
        terms["conmb"] = self.memory.conmb_loss(pathology)  # eq. 9 on the updated banks
        ce = terms["ce_radiology"] + terms["ce_pathology"] + terms["ce_fusion"]  # eq. 4
        return ce + self.alpha_conmb * terms["conmb"], out["logits_fusion"], terms  # eq. 10


# --------------------------------------------------------------------------- student


def read_memory(
    radiology: Backbone3d,
    radiology_head: nn.Module,
    memory: TypeMemory,
    ct: torch.Tensor,
    channels: Sequence[int],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prediction-aware memory reading (eq. 11) from CT alone, without gradients.

    The frozen teacher radiology branch ``B_R`` gives ``z_R' = softmax(l_R')``; each stage's
    banks are summed with these type weights and laid out as ``(B, c_s, t_s, h_s, w_s)`` maps,
    with the ``(t_s, h_s, w_s)`` of ``B_R``'s own stage outputs (the student's stages have the
    same strides) and the student's ``channels``. Returns ``z_R'`` and the maps ``f_mem^s``.

    A head trained with the extra "other" class (tumour-free sequences, class ``K``) has
    ``K + 1`` outputs; ``z_R'`` is the softmax over the ``K`` type logits, since "other" has no
    bank to weight.
    """
    with torch.no_grad():
        x, shapes = radiology.stem(ct), []
        for stage in range(1, radiology.num_stages):
            x = radiology.stage(stage, x)
            if stage in FUSED_STAGES:
                shapes.append((channels[stage - 1], *x.shape[2:]))
        logits = radiology_head(radiology.pool(x))[:, : memory.num_types]
        type_weights = torch.softmax(logits, dim=1)  # z_R' over the K types (no "other" bank)
        return type_weights, memory.read_maps(type_weights, shapes)  # eq. 11


class MHDStudent(nn.Module):
    """MHD-Net's memory-aware student (Section III-C): a 3D ResNet-18 on CT with SHFMs.

    At stages 1-3 an SHFM fuses the student's CT feature ``f_R'^s`` with the memory map
    ``f_mem^s`` into ``f_F'^s = SHFM^s(f_R'^s, f_mem^s)``. How ``f_F'^s`` continues is not in
    the paper; as in the authors' ``resnet_kd.py`` it is added to the CT feature, so stage
    ``s + 1`` reads ``f_R'^s + f_F'^s`` (a residual that leaves the plain ResNet when the
    fusion is zero). ``compress`` holds ``con_s``, the 1³ convolutions of eq. 12 that map
    ``f_F'^s`` to the teacher's width; they serve only the distillation loss.

    Parameters
    ----------
    n_classes
        Tumour types.
    frames
        Frames ``T`` of the CT input.
    widths
        Channels of stages 1-4 (paper 64, 128, 256, 512); ``c_s * t_s`` must equal the
        memory's item dimension.
    teacher_widths
        Channels of the teacher's fusion features (default ``widths``), the outputs of ``con_s``.
    kernel_sizes
        Involution size κ of the SHFMs at stages 1-3.
    ct_channels, shortcut_type
        As for :class:`MHDTeacher`.
    memory
        Fuse the memory maps (the paper). ``False`` is Fig. 6's "w/o CTMM" student: a plain
        ResNet-18 whose stage 1-3 outputs ``f_R'^s`` are the features of eq. 12.
    **fusion_kwargs
        Passed to every SHFM.
    """

    def __init__(
        self,
        n_classes: int = 8,
        *,
        frames: int = PAPER_FRAMES,
        widths: Sequence[int] = PAPER_WIDTHS,
        teacher_widths: Sequence[int] | None = None,
        kernel_sizes: Sequence[int] = (7, 7, 7),
        ct_channels: int = 1,
        shortcut_type: str = "B",
        memory: bool = True,
        **fusion_kwargs: object,
    ) -> None:
        super().__init__()
        if len(kernel_sizes) != len(FUSED_STAGES):
            raise ValueError(f"kernel_sizes must give one κ per stage 1-3, got {kernel_sizes}")
        teacher_widths = widths if teacher_widths is None else teacher_widths
        self.num_classes, self.frames = n_classes, frames
        self.widths = tuple(int(w) for w in widths)
        self.backbone = create_frame_resnet(
            "resnet18", in_channels=ct_channels, widths=widths, shortcut_type=shortcut_type
        )
        t = stage_frames(frames)
        self.uses_memory = bool(memory)
        self.fuse = nn.ModuleList(
            SHFM(widths[s - 1], t[s - 1], kernel_size=k, **fusion_kwargs)
            for s, k in zip(FUSED_STAGES, kernel_sizes, strict=True)
            if self.uses_memory
        )
        self.compress = nn.ModuleList(  # con_s of eq. 12
            nn.Conv3d(widths[s - 1], teacher_widths[s - 1], 1) for s in FUSED_STAGES
        )
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(
        self, ct: torch.Tensor, memory_maps: Sequence[torch.Tensor] | None
    ) -> dict[str, object]:
        """Logits and the fused features of a CT volume given the memory maps of eq. 11.

        Returns ``logits`` ``(B, n_classes)`` and ``features_fusion``, the stage 1-3 maps
        ``f_F'^s`` (before ``con_s``); without memory (``memory=False``, ``memory_maps`` None)
        the stage outputs ``f_R'^s``.
        """
        if self.uses_memory and (memory_maps is None or len(memory_maps) != len(FUSED_STAGES)):
            raise ValueError("memory_maps must hold the maps of stages 1-3")
        x, fused = self.backbone.stem(ct), []
        for stage in range(1, self.backbone.num_stages):
            x = self.backbone.stage(stage, x)
            if stage in FUSED_STAGES and not self.uses_memory:
                fused.append(x)
            elif stage in FUSED_STAGES:
                f_f = self.fuse[stage - 1](x, memory_maps[stage - 1])  # f_F'^s = SHFM(f_R', f_mem)
                fused.append(f_f)
                x = x + f_f  # residual into stage s + 1 (authors' code)
        return {"logits": self.head(self.backbone.pool(x)), "features_fusion": tuple(fused)}


class MHDDeployed(nn.Module):
    """The model used at test time: teacher ``B_R`` + CTMM + student, on CT alone.

    Frozen (no gradients, evaluation mode whatever :meth:`train` asks, so neither the batch
    normalisation statistics nor the banks move): the teacher radiology branch and its head,
    which give the type weights of eq. 11, and the memory. The student is the only trained part.
    :meth:`forward` takes the CT volume and nothing else: no WSI, no label.

    Parameters
    ----------
    radiology, radiology_head
        The trained teacher's ``B_R`` and its classifier (``teacher.radiology``,
        ``teacher.heads["radiology"]``); frozen in place.
    memory
        The trained CTMM; frozen in place.
    student
        The memory-aware student.
    """

    def __init__(
        self,
        radiology: Backbone3d,
        radiology_head: nn.Module,
        memory: TypeMemory,
        student: MHDStudent,
    ) -> None:
        super().__init__()
        self.radiology, self.radiology_head = freeze(radiology), freeze(radiology_head)
        self.memory, self.student = freeze(memory), student
        self.num_classes = student.num_classes

    @classmethod
    def from_teacher(
        cls, teacher: MHDTeacher, memory: TypeMemory, student: MHDStudent
    ) -> MHDDeployed:
        """Deployed model sharing (and freezing) ``teacher``'s radiology branch and head."""
        return cls(teacher.radiology, teacher.heads["radiology"], memory, student)

    def forward_features(self, ct: torch.Tensor) -> dict[str, object]:
        """Student logits and fused features, and the teacher's type weights ``z_R'``."""
        type_weights, maps = read_memory(
            self.radiology, self.radiology_head, self.memory, ct, self.student.widths
        )
        out = self.student(ct, maps if self.student.uses_memory else None)
        out["type_weights"] = type_weights
        return out

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Student logits ``(B, n_classes)`` from a CT volume ``(B, 1, T, H, W)`` alone, or from
        a batch of which only ``"ct"`` is read."""
        return self.forward_features(_ct_of(inputs))["logits"]


# --------------------------------------------------------------------------- distillation


def feature_distillation_loss(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    compress: Sequence[nn.Module],
) -> torch.Tensor:
    """Eq. 12: ``sum_s MSE(f_F^s, con_s(f_F'^s))`` over stages 1-3, teacher side detached.

    Eq. 12 writes an L2 norm and names it an MSE loss; the mean of squares per stage is used,
    so the term does not grow with the feature size (the authors' code takes an L1 mean).
    """
    return sum(
        F.mse_loss(con(f_s), f_t.detach())
        for f_t, f_s, con in zip(teacher_features, student_features, compress, strict=True)
    )


def logit_distillation_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """Eq. 13: ``KL(softmax(l_Tea / T) || softmax(l_Stu / T))``, the mean over the batch.

    Eq. 13 has no temperature (T = 1, the default); the authors' code uses T = 20. With
    ``scale_by_t2`` the term is multiplied by T² (Hinton et al.), which keeps its gradient on
    the student's logits of the same order for any T, so ``alpha_kl`` keeps its meaning; at
    T = 1 it changes nothing.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher_p = torch.softmax(teacher_logits.detach() / temperature, dim=1)
    student_log_p = torch.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_p, reduction="batchmean")  # eq. 13
    return kl * temperature**2 if scale_by_t2 else kl


class MHDDistiller(nn.Module):
    """Student training (Section III-C, eq. 14) with the frozen teacher and CTMM.

    Holds the trained teacher (all three branches, frozen: its fusion features and logits are
    the distillation targets and need the WSI), the trained memory (frozen) and the student
    (trained). :meth:`forward` is the deployed path on CT alone (a batch's ``"ct"`` only) and
    :meth:`deploy` returns the :class:`MHDDeployed` model sharing these modules. The teacher's
    logits of eq. 13 are its fusion logits ``z_F``, its prediction.

    Parameters
    ----------
    teacher, memory
        Trained teacher and CTMM; frozen in place.
    student
        The student to train.
    alpha_mse, alpha_kl
        Weights of eqs. 12 and 13 in eq. 14 (paper 0.1 and 0.5, Fig. 7).
    temperature, scale_kl_by_t2
        See :func:`logit_distillation_loss` (paper T = 1; authors' code T = 20).
    """

    def __init__(
        self,
        teacher: MHDTeacher,
        memory: TypeMemory,
        student: MHDStudent,
        *,
        alpha_mse: float = PAPER_ALPHA_MSE,
        alpha_kl: float = PAPER_ALPHA_KL,
        temperature: float = 1.0,
        scale_kl_by_t2: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("alpha_mse", alpha_mse), ("alpha_kl", alpha_kl)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.teacher, self.memory, self.student = freeze(teacher), freeze(memory), student
        self.alpha_mse, self.alpha_kl = alpha_mse, alpha_kl
        self.temperature, self.scale_kl_by_t2 = temperature, scale_kl_by_t2
        self.num_classes = student.num_classes

    def deploy(self) -> MHDDeployed:
        """The CT-only model: teacher ``B_R`` + memory + student (modules shared, not copied)."""
        return MHDDeployed.from_teacher(self.teacher, self.memory, self.student)

    def forward_student(self, ct: torch.Tensor) -> dict[str, object]:
        """The student's outputs on CT alone (memory read through the frozen ``B_R``)."""
        if not self.student.uses_memory:
            return self.student(ct, None)
        _, maps = read_memory(
            self.teacher.radiology,
            self.teacher.heads["radiology"],
            self.memory,
            ct,
            self.student.widths,
        )
        return self.student(ct, maps)

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Student logits from a CT volume, or from a batch of which only ``"ct"`` is read."""
        return self.forward_student(_ct_of(inputs))["logits"]

    def student_loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 14 on a batch with ``ct``, ``wsi`` (teacher side only) and ``label``.

        Returns ``CE + alpha_mse * L_MSE + alpha_kl * L_KL``, the student logits and the terms
        ``ce``, ``mse`` and ``kl``. A ``tumour`` entry is accepted and unused: the memory is
        only read here.
        """
        with torch.no_grad():
            teacher = self.teacher(batch["ct"], batch["wsi"])
        student = self.forward_student(batch["ct"])
        logits = student["logits"]
        terms = {
            "ce": F.cross_entropy(logits, batch["label"], weight=class_weight),
            "mse": feature_distillation_loss(  # eq. 12
                teacher["features_fusion"], student["features_fusion"], self.student.compress
            ),
            "kl": logit_distillation_loss(  # eq. 13
                teacher["logits_fusion"],
                logits,
                temperature=self.temperature,
                scale_by_t2=self.scale_kl_by_t2,
            ),
        }
        loss = terms["ce"] + self.alpha_mse * terms["mse"] + self.alpha_kl * terms["kl"]  # eq. 14
        return loss, logits, terms

    loss = student_loss  # the training loop's hook


# --------------------------------------------------------------------------- CT-only baseline


class CTResNet(nn.Module):
    """A plain 3D ResNet on CT alone (the same frame-keeping backbone as the student).

    The baseline the paper's claim is measured against: a CT ResNet-18 trained with
    cross-entropy, without teacher, memory or distillation.
    """

    def __init__(
        self,
        n_classes: int = 8,
        *,
        widths: Sequence[int] = PAPER_WIDTHS,
        backbone: str = "resnet18",
        ct_channels: int = 1,
        shortcut_type: str = "B",
    ) -> None:
        super().__init__()
        self.num_classes = n_classes
        self.backbone = create_frame_resnet(
            backbone, in_channels=ct_channels, widths=widths, shortcut_type=shortcut_type
        )
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits from a CT volume, or from a batch of which only ``"ct"`` is read."""
        return self.head(self.backbone(_ct_of(inputs)))


# --------------------------------------------------------------------------- registry


def teacher_memory(
    frames: int, widths: Sequence[int], capacities: Sequence[int], **memory_options
) -> TypeMemory:
    """The CTMM of a teacher with ``frames`` and ``widths`` (item dimension c_s * t_s)."""
    return TypeMemory(memory_item_dim(frames, widths), capacities, **memory_options)


def tiny_example(frames: int = 8, size: int = 32, batch: int = 2):
    """A small MHD-Net's arguments and a paired CT + WSI batch (for the registry test)."""
    generator = torch.Generator().manual_seed(0)
    widths = (8, 16, 32, 64)
    arguments = {
        "n_classes": 3,
        "frames": frames,
        "widths": widths,
        "kernel_sizes": (3, 3, 3),
        "capacities": (16, 16, 4),
        "num_types": 2,
    }
    data = {
        "ct": torch.randn(batch, 1, frames, size, size, generator=generator),
        "wsi": torch.rand(batch, 3, frames, size, size, generator=generator),
        "label": torch.tensor([0, 2]),  # class 2 is "other" (not a type)
        "tumour": torch.tensor([True, False]),
    }
    return arguments, data


def _ct_example():
    arguments, data = tiny_example()
    return {"n_classes": 3, "widths": arguments["widths"]}, data


@register_model(family="mhd", example=tiny_example)
def mhd_teacher(
    n_classes: int = 9,
    *,
    frames: int = PAPER_FRAMES,
    widths: Sequence[int] = PAPER_WIDTHS,
    capacities: Sequence[int] = PAPER_CAPACITIES,
    num_types: int = 8,
    decay: float = PAPER_DECAY,
    memory_temperature: float = 1.0,
    alpha_conmb: float = PAPER_ALPHA_CONMB,
    seed: int = 0,
    **teacher_options,
) -> MHDTeacherWithMemory:
    """The teacher with its CTMM (eq. 10); ``teacher_options`` go to :class:`MHDTeacher`
    (``backbone``, ``kernel_sizes``, ``fusion``, SHFM options)."""
    teacher = MHDTeacher(n_classes, frames=frames, widths=widths, **teacher_options)
    memory = teacher_memory(
        frames,
        widths,
        capacities,
        num_types=num_types,
        decay=decay,
        temperature=memory_temperature,
        seed=seed,
    )
    return MHDTeacherWithMemory(teacher, memory, alpha_conmb=alpha_conmb)


@register_model(family="mhd", example=tiny_example)
def mhd_student(
    n_classes: int = 9,
    *,
    frames: int = PAPER_FRAMES,
    widths: Sequence[int] = PAPER_WIDTHS,
    student_widths: Sequence[int] | None = None,
    kernel_sizes: Sequence[int] = (7, 7, 7),
    student_kernel_sizes: Sequence[int] | None = None,
    memory: bool = True,
    alpha_mse: float = PAPER_ALPHA_MSE,
    alpha_kl: float = PAPER_ALPHA_KL,
    temperature: float = 1.0,
    scale_kl_by_t2: bool = True,
    **teacher_arguments,
) -> MHDDistiller:
    """Student training (eq. 14) around a teacher built by :func:`mhd_teacher` from
    ``teacher_arguments`` (the trained teacher's weights and banks are loaded into it). The
    student's SHFMs take the teacher's SHFM options (``gate_kernel``, ``reduction``, ...)."""
    trained = mhd_teacher(
        n_classes, frames=frames, widths=widths, kernel_sizes=kernel_sizes, **teacher_arguments
    )
    shfm_options = {k: v for k, v in teacher_arguments.items() if k in SHFM_OPTIONS}
    student = MHDStudent(
        n_classes,
        frames=frames,
        widths=student_widths or widths,
        teacher_widths=widths,
        kernel_sizes=student_kernel_sizes or kernel_sizes,
        memory=memory,
        **shfm_options,
    )
    return MHDDistiller(
        trained.teacher,
        trained.memory,
        student,
        alpha_mse=alpha_mse,
        alpha_kl=alpha_kl,
        temperature=temperature,
        scale_kl_by_t2=scale_kl_by_t2,
    )


@register_model(family="mhd", example=_ct_example)
def ct_resnet(n_classes: int = 9, **options) -> CTResNet:
    """A plain CT 3D ResNet-18 (``backbone="resnet34"`` for the teacher's depth)."""
    return CTResNet(n_classes, **options)
