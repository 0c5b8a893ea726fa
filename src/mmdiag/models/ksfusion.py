"""KS-Fusion: knowledge-driven subspace fusion of histology and genomics, with CG-Coord.

Paper: Y. Zhang, X. Wang, F. Meng, J. Tang and C. Li, "Knowledge-driven Subspace Fusion and
Gradient Coordination for Multi-modal Learning", MICCAI 2024 (Sections 2.2-2.4, eqs. 1-8).
Authors' code: https://github.com/helenypzhang/Subspace-Multimodal-Learning (c73821f).

The genes are split into two subspaces, tumour-related (``tumour``, u = t) and
tumour-microenvironment-related (``microenvironment``, u = e). Each subspace has its own
stream (separate weights):

1. Gene encoder G^u: the shared :class:`~mmdiag.models.genomic.SNNEncoder` on the subspace's
   genes (``[64, 48, 32] -> 128``).
2. Multi-modal teacher x_pg^u: a linear layer over [patch feature ; gene embedding] at every
   cell of the slide's feature grid (``grid``, B x D x H x W).
3. CM-Deform (eqs. 1-3, :class:`DeformableCrossAttention`): queries from the teacher at every
   grid cell; keys and values from the WSI feature grid x_p sampled bilinearly at deformed
   reference points p^u + Δp^u, with offsets Δp^u = ψ(x_pg^u) (:class:`OffsetNetwork`), one
   set of offsets per channel group as in deformable attention (DAT, Xia et al., CVPR 2022);
   multi-head attention, then W_o and a masked mean over the slide's cells give z^u.
4. Ge-Con (eq. 4, :func:`gecon_loss`): the Frobenius distance between the batch Gram matrices
   of the gene embeddings and of the deformed points, divided by B.
5. A linear classifier D over [z^t ; z^e] (``classifier``), trained by eqs. 6-8
   (:meth:`KSFusion.loss`).
6. CG-Coord (eq. 5, :class:`GradientCoordination`): after the backward pass, per row of the
   classifier's weight, a branch gradient that conflicts with the other (negative cosine) is
   projected onto the normal plane of the other when its branch is the less confident one.

Choices made where the paper leaves them open, and departures from the authors' code:

- Coordinates are torch's normalised ``[-1, 1]`` with ``align_corners=False``: the reference
  points are the centres of an H_G x W_G grid laid over the slide grid, so with H_G x W_G =
  H x W they fall on the patch positions exactly. Points outside the slide read zeros
  (``padding_mode="zeros"``), the value of an empty cell.
- ψ is DAT's offset network on the whole teacher: a depthwise k x k convolution (k =
  ``offset_kernel``, 5), GELU, and a 1 x 1 convolution to 2 channels per offset group; its
  output is ``s * tanh(.)`` in units of the reference grid's cell spacing, s =
  ``offset_scale`` = 2 cells by default. ψ runs on the teacher resized (bilinear) to H_G x W_G
  when the slide grid has another size.
- Keys and values are not masked: a deformed point in an empty region samples zeros, and ψ can
  learn to move away from it. Queries of empty cells (``grid_mask`` 0) are computed but left
  out of the pooled z^u (masked mean; a slide without patches gets z^u = 0).
- No relative position bias (DAT has one; the paper does not mention it).
- The stream is the authors' code's pre-norm transformer layer, which eq. 3 leaves out: the
  teacher (width ``embed_dim``) is layer-normalised before W_q and the sampled features before
  W_k, W_v; the attention output W_o z is added to the teacher (``residual=True``), so the
  gene embedding reaches z^u directly and not only through where the queries look; the sum is
  layer-normalised before the masked mean. ``residual=False`` is eq. 3 alone.
- Ge-Con: each sample's deformed-point vector is its own p + Δp over all offset groups and
  points; the authors' code reshapes the offsets so that batch and group rows mix, which is
  not reproduced. Vectors are cosine-normalised, so the Gram matrices hold cosine
  similarities; ||.||_2 of eq. 4 is the Frobenius norm. Under data parallelism the rows of
  the global batch are gathered (with gradient) first.
- CG-Coord projects once, g <- g - (g.h / ||h||^2) h, where the authors' code subtracts the
  projection twice and then rescales the gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from mmdiag.models.genomic import SNNEncoder, check_task, task_loss
from mmdiag.models.registry import register_model
from mmdiag.stats import concordance_index
from mmdiag.training.distributed import (
    all_gather_with_grad,
    current_context,
    gather_rows,
    unwrap,
)
from mmdiag.training.survival import risk_from_hazards

__all__ = [
    "SUBSPACES",
    "DeformableCrossAttention",
    "GradientCoordination",
    "KSFusion",
    "OffsetNetwork",
    "batch_gram",
    "coordinate_gradient",
    "deformable_sample",
    "explicit_attention",
    "fused_attention",
    "gecon_loss",
    "reference_points",
]

#: The two gene subspaces, in the order of the classifier's column blocks: t, then e.
SUBSPACES = ("tumour", "microenvironment")

# (B, M, L, d) queries, (B, M, P, d) keys and values -> (B, M, L, d)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- deformable sampling


def reference_points(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The uniform reference grid p, (height * width, 2) as (x, y) in ``[-1, 1]``, row-major.

    Cell centres for ``align_corners=False``: x_j = -1 + (2 j + 1) / width.
    """
    ys = (torch.arange(height, device=device, dtype=dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=dtype) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def deformable_sample(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """F(x_p; p + Δp): bilinear samples of a feature map, each channel group at its own points.

    Parameters
    ----------
    features : torch.Tensor, shape (B, D, H, W)
        The WSI feature grid x_p.
    points : torch.Tensor, shape (B, groups, P, 2)
        Normalised (x, y) sampling points per offset group; ``D`` is split into ``groups``
        consecutive channel blocks, block j read at ``points[:, j]``.

    Returns
    -------
    torch.Tensor, shape (B, P, D)
        Sampled features (``align_corners=False``; outside the map reads 0).
    """
    batch, channels, height, width = features.shape
    groups, n_points = points.shape[1], points.shape[2]
    if channels % groups:
        raise ValueError(f"{channels} feature channels do not split into {groups} groups")
    grouped = features.reshape(batch * groups, channels // groups, height, width)
    sampled = F.grid_sample(
        grouped,
        points.reshape(batch * groups, 1, n_points, 2).to(features.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B * groups, D / groups, 1, P)
    return sampled.reshape(batch, channels, n_points).transpose(1, 2)


class OffsetNetwork(nn.Module):
    """ψ: offsets Δp (B, groups, H_G W_G, 2) from the teacher at the reference points.

    Depthwise ``kernel_size`` convolution, GELU, 1 x 1 convolution to (x, y) per group, then
    ``scale * tanh`` in reference-grid cells (a cell is 2 / W_G wide in x, 2 / H_G in y).
    """

    def __init__(
        self, channels: int, groups: int, *, kernel_size: int = 5, scale: float = 2.0
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"offset kernel_size must be odd and >= 1, got {kernel_size}")
        if not scale > 0:
            raise ValueError(f"offset scale must be > 0, got {scale}")
        self.groups, self.scale = int(groups), float(scale)
        self.depthwise = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels
        )
        self.act = nn.GELU()
        self.pointwise = nn.Conv2d(channels, 2 * self.groups, 1)

    def forward(self, teacher: torch.Tensor) -> torch.Tensor:
        """Offsets of the teacher (B, C, H_G, W_G) at its H_G x W_G reference points."""
        batch, _, height, width = teacher.shape
        raw = self.pointwise(self.act(self.depthwise(teacher)))  # (B, 2 groups, H_G, W_G)
        raw = raw.reshape(batch, self.groups, 2, height * width).transpose(2, 3)
        cell = raw.new_tensor([2.0 / width, 2.0 / height])  # (x, y) spacing of the grid
        return self.scale * torch.tanh(raw) * cell


# --------------------------------------------------------------------------- attention


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """eq. 2, softmax(q k^T / sqrt(d)) v per head, by torch's fused kernel (scores not stored)."""
    return F.scaled_dot_product_attention(query, key, value)


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The same as :func:`fused_attention` with the (L x P) score matrix materialised.

    A reference for tests and benchmarks; the model uses :func:`fused_attention`.
    """
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    return torch.softmax(scores, dim=-1) @ value


class DeformableCrossAttention(nn.Module):
    """One subspace's stream: G^u, the teacher x_pg^u, ψ, and CM-Deform (eqs. 1-3).

    ``forward(grid, grid_mask, genes)`` returns ``z`` (B, embed_dim), the gene embedding
    G(x_g^u) (B, gene_dim) and the deformed points p^u + Δp^u (B, groups, H_G W_G, 2).
    """

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        *,
        grid_size: tuple[int, int] = (50, 50),
        heads: int = 8,
        head_dim: int = 64,
        offset_groups: int = 8,
        offset_scale: float = 2.0,
        offset_kernel: int = 5,
        gene_hidden: Sequence[int] = (64, 48, 32),
        gene_dim: int = 128,
        embed_dim: int = 128,
        dropout: float = 0.25,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if in_dim % offset_groups:
            raise ValueError(f"in_dim {in_dim} must be divisible by offset_groups {offset_groups}")
        self.heads, self.head_dim = int(heads), int(head_dim)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.residual = bool(residual)
        width = self.heads * self.head_dim
        self.gene_encoder = SNNEncoder(n_genes, gene_hidden, gene_dim, dropout)  # G^u
        self.teacher = nn.Linear(in_dim + gene_dim, embed_dim)  # x_pg^u
        self.offsets = OffsetNetwork(
            embed_dim, offset_groups, kernel_size=offset_kernel, scale=offset_scale
        )  # ψ
        self.query_norm, self.key_norm = nn.LayerNorm(embed_dim), nn.LayerNorm(in_dim)
        self.to_q = nn.Linear(embed_dim, width)  # W_q^u
        self.to_k = nn.Linear(in_dim, width)  # W_k^u
        self.to_v = nn.Linear(in_dim, width)  # W_v^u
        self.to_out = nn.Linear(width, embed_dim)  # W_o^u
        self.out_norm = nn.LayerNorm(embed_dim)
        self.register_buffer(
            "reference", reference_points(*self.grid_size), persistent=False
        )  # p^u
        self.attend: Attention = fused_attention

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        return tokens.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, grid: torch.Tensor, grid_mask: torch.Tensor, genes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, _, height, width = grid.shape
        gene_embedding = self.gene_encoder(genes)
        cells = grid.flatten(2).transpose(1, 2)  # (B, H W, D)
        broadcast = gene_embedding.unsqueeze(1).expand(-1, cells.shape[1], -1)
        teacher = self.teacher(torch.cat([cells, broadcast], dim=-1))  # (B, H W, C)
        teacher_map = teacher.transpose(1, 2).reshape(batch, -1, height, width)
        if (height, width) != self.grid_size:
            teacher_map = F.interpolate(
                teacher_map, size=self.grid_size, mode="bilinear", align_corners=False
            )
        points = self.reference.to(grid.dtype) + self.offsets(teacher_map)  # p + Δp
        sampled = deformable_sample(grid, points)  # x̂_p, (B, H_G W_G, D)
        query = self._heads(self.to_q(self.query_norm(teacher)))  # eq. 1
        sampled = self.key_norm(sampled)
        key, value = self._heads(self.to_k(sampled)), self._heads(self.to_v(sampled))
        attended = self.attend(query, key, value)  # eq. 2, (B, M, H W, d)
        attended = attended.transpose(1, 2).reshape(batch, height * width, -1)
        tokens = self.to_out(attended)  # eq. 3
        if self.residual:  # the authors' pre-norm transformer layer: x_pg + CM-Deform(x_pg)
            tokens = teacher + tokens
        tokens = self.out_norm(tokens)
        # only cells holding a patch are pooled into z^u
        mask = grid_mask.reshape(batch, height * width, 1).to(tokens.dtype)
        z = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-6)
        return {"z": z, "gene_embedding": gene_embedding, "points": points}


# --------------------------------------------------------------------------- Ge-Con


def batch_gram(vectors: torch.Tensor) -> torch.Tensor:
    """S_b: the (B, B) Gram matrix of the cosine-normalised per-sample rows of ``vectors``.

    Every dimension after the first is flattened into the sample's vector.
    """
    rows = F.normalize(vectors.flatten(1), dim=1)
    return rows @ rows.T


def gecon_loss(gene_embedding: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """eq. 4: ||S_b(G(x_g)) - S_b(p + Δp)||_F / B over the batch's rows.

    ``gene_embedding`` is (B, gene_dim) and ``points`` (B, groups, P, 2): sample b's vector is
    ``points[b]`` flattened across its own groups and points.
    """
    difference = batch_gram(gene_embedding) - batch_gram(points)
    return torch.linalg.matrix_norm(difference) / len(gene_embedding)


# --------------------------------------------------------------------------- the model


class KSFusion(nn.Module):
    """Two CM-Deform streams (tumour, microenvironment), Ge-Con and the classifier D.

    Batches are those of :mod:`mmdiag.models.genomic`: ``grid`` (B, in_dim, H, W),
    ``grid_mask`` (B, 1, H, W), ``genes`` (B, n_genes), ``label`` and, for survival,
    ``event`` and ``time`` (``patches`` is not read: ``grid`` holds the same features laid out
    by position). ``gene_groups`` maps ``tumour`` and ``microenvironment`` to the
    indices of their genes in ``genes``. ``n_outputs`` is the number of classes, or of time
    bins (one hazard logit each) for ``task="survival"``. ``alpha`` weights L^t against L^e
    (eqs. 6-8); ``use_gecon=False`` is the ablation "w/o Ge-Con"; ``residual`` keeps the
    authors' residual around CM-Deform (see the module notes).
    """

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        gene_groups: Mapping[str, Sequence[int]],
        n_outputs: int,
        *,
        task: str = "classification",
        grid_size: Sequence[int] = (50, 50),
        heads: int = 8,
        head_dim: int = 64,
        offset_groups: int = 8,
        offset_scale: float = 2.0,
        offset_kernel: int = 5,
        gene_hidden: Sequence[int] = (64, 48, 32),
        gene_dim: int = 128,
        embed_dim: int = 128,
        dropout: float = 0.25,
        alpha: float = 0.5,
        use_gecon: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        if set(gene_groups) != set(SUBSPACES):
            raise ValueError(
                f"gene_groups must name exactly {SUBSPACES}, got {sorted(gene_groups)}"
            )
        if n_outputs < 1 or (task == "classification" and n_outputs < 2):
            raise ValueError(f"n_outputs {n_outputs} is too few for {task}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"grid_size must be two positive sizes, got {grid_size}")
        self.num_classes, self.embed_dim = int(n_outputs), int(embed_dim)
        self.alpha, self.use_gecon = float(alpha), bool(use_gecon)
        self.streams = nn.ModuleDict()
        for subspace in SUBSPACES:
            indices = torch.as_tensor(list(gene_groups[subspace]), dtype=torch.long)
            if indices.numel() == 0 or indices.min() < 0 or indices.max() >= n_genes:
                raise ValueError(f"gene_groups[{subspace!r}] must be indices in [0, {n_genes})")
            self.register_buffer(f"genes_{subspace}", indices, persistent=False)
            self.streams[subspace] = DeformableCrossAttention(
                in_dim,
                len(indices),
                grid_size=(int(grid_size[0]), int(grid_size[1])),
                heads=heads,
                head_dim=head_dim,
                offset_groups=offset_groups,
                offset_scale=offset_scale,
                offset_kernel=offset_kernel,
                gene_hidden=gene_hidden,
                gene_dim=gene_dim,
                embed_dim=embed_dim,
                dropout=dropout,
                residual=residual,
            )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * embed_dim, n_outputs)  # D over [z^t ; z^e]

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, dict]:
        """Each subspace's stream outputs (``z``, ``gene_embedding``, ``points``)."""
        return {
            subspace: self.streams[subspace](
                batch["grid"],
                batch["grid_mask"],
                batch["genes"][:, getattr(self, f"genes_{subspace}")],
            )
            for subspace in SUBSPACES
        }

    def forward_head(self, fused: torch.Tensor) -> torch.Tensor:
        """D([z^t ; z^e]) (after dropout)."""
        return self.classifier(fused)

    def branch_logits(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each branch's share of the logits: W_u z^u + b / 2 (they sum to the logits)."""
        blocks = torch.split(self.classifier.weight, self.embed_dim, dim=1)
        halves = torch.split(fused, self.embed_dim, dim=1)
        return {
            subspace: half @ block.T + self.classifier.bias / 2
            for subspace, block, half in zip(SUBSPACES, blocks, halves, strict=True)
        }

    def forward_outputs(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """``logits``, ``branch_logits``, ``gecon`` (L^t, L^e), ``z``, ``gene_embedding`` and
        ``points`` (the last three per subspace)."""
        streams = self.forward_features(batch)
        fused = self.dropout(torch.cat([streams[u]["z"] for u in SUBSPACES], dim=1))
        gecon = {}
        context = current_context(fused.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.use_gecon):
            for subspace in SUBSPACES:
                genes, points = streams[subspace]["gene_embedding"], streams[subspace]["points"]
                if context is not None:  # Ge-Con couples samples: the global batch's rows
                    genes = all_gather_with_grad(genes, context)
                    points = all_gather_with_grad(points, context)
                gecon[subspace] = gecon_loss(genes, points)  # eq. 4
        return {
            "logits": self.forward_head(fused),
            "branch_logits": self.branch_logits(fused),
            "gecon": gecon,
            **{key: {u: streams[u][key] for u in SUBSPACES} for key in streams[SUBSPACES[0]]},
        }

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_outputs(batch)["logits"]

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """eqs. 6-8: the task loss + α L^t + (1 - α) L^e (the task loss alone without Ge-Con).

        ``terms``: ``task``, ``gecon_tumour``, ``gecon_microenvironment`` and the detached
        ``branch_logits_tumour`` / ``branch_logits_microenvironment`` that
        :class:`GradientCoordination` reads.
        """
        out = self.forward_outputs(batch)
        task = task_loss(out["logits"], batch, self.task, class_weight)
        gecon_t, gecon_e = out["gecon"]["tumour"], out["gecon"]["microenvironment"]
        loss = task
        if self.use_gecon:
            loss = task + self.alpha * gecon_t + (1.0 - self.alpha) * gecon_e  # eqs. 6-8
        terms = {"task": task, "gecon_tumour": gecon_t, "gecon_microenvironment": gecon_e}
        for subspace in SUBSPACES:
            terms[f"branch_logits_{subspace}"] = out["branch_logits"][subspace].detach()
        return loss, out["logits"], terms


# --------------------------------------------------------------------------- CG-Coord


def coordinate_gradient(
    grad: torch.Tensor,
    embed_dim: int,
    confidence_tumour: float,
    confidence_microenvironment: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """eq. 5 on the classifier's weight gradient (n_outputs, 2 embed_dim).

    For each row k, g^t_k = ``grad[k, :E]`` and g^e_k = ``grad[k, E:]``. Where they conflict
    (g^t_k . g^e_k < 0, both non-zero), the row of the branch with the lower confidence g is
    replaced by its projection on the plane normal to the other's row h,
    Γ(g, h) = g - (g . h / ||h||^2) h. Equal confidences change nothing.

    Returns the coordinated gradient (a new tensor) and a bool mask (n_outputs,) of the rows
    that were projected.
    """
    tumour, micro = grad[:, :embed_dim], grad[:, embed_dim:]
    if tumour.shape != micro.shape:
        raise ValueError(f"grad {tuple(grad.shape)} is not two blocks of {embed_dim} columns")
    unchanged = torch.zeros(len(grad), dtype=torch.bool, device=grad.device)
    if confidence_tumour == confidence_microenvironment:
        return grad.clone(), unchanged
    lower_is_tumour = confidence_tumour < confidence_microenvironment
    moved, other = (tumour, micro) if lower_is_tumour else (micro, tumour)
    dot = (moved * other).sum(1)
    other_sq = (other * other).sum(1)
    conflict = (dot < 0) & (other_sq > 0) & ((moved * moved).sum(1) > 0)
    if not bool(conflict.any()):
        return grad.clone(), unchanged
    scale = torch.where(conflict, dot / other_sq.clamp_min(torch.finfo(grad.dtype).tiny), 0.0)
    projected = moved - scale.unsqueeze(1) * other  # Γ(g, h), once
    blocks = (projected, micro) if lower_is_tumour else (tumour, projected)
    return torch.cat(blocks, dim=1), conflict


def branch_confidences(
    branch_logits: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], task: str
) -> tuple[float, float] | None:
    """Σ s^t and Σ s^e of eq. 5 over the (global) batch; ``None`` when undefined.

    Classification: the sum over the batch of each branch's softmax probability of the true
    class. Survival: each branch's C-index on the batch (risk from its hazard logits); a batch
    without an event, or without a comparable pair, gives ``None``. Under torch.distributed
    the values are those of the global batch on every process.
    """
    tumour, micro = branch_logits["tumour"].detach(), branch_logits["microenvironment"].detach()
    context = current_context(tumour.device)
    if check_task(task) == "classification":
        label = batch["label"].unsqueeze(1)
        sums = torch.stack(
            [torch.softmax(x.float(), dim=1).gather(1, label).sum() for x in (tumour, micro)]
        )
        if context is not None:
            dist.all_reduce(sums)
        return float(sums[0]), float(sums[1])
    columns = [tumour, micro, batch["time"][:, None], batch["event"][:, None]]
    rows = torch.cat([column.double() for column in columns], dim=1)
    if context is not None:
        rows = gather_rows(rows, context)
    rows = rows.cpu()
    n_bins = tumour.shape[1]
    time, event = rows[:, -2].numpy(), rows[:, -1].numpy()
    if not np.any(event > 0):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = [
            concordance_index(time, event, risk_from_hazards(rows[:, part]).numpy()).c_index
            for part in (slice(0, n_bins), slice(n_bins, 2 * n_bins))
        ]
    if not all(math.isfinite(v) for v in values):
        return None
    return values[0], values[1]


class GradientCoordination:
    """CG-Coord (eq. 5) as the training loop's ``before_step(model, batch, terms)`` hook.

    Reads the detached branch logits from ``terms``, computes the branches' confidences
    (:func:`branch_confidences`) and replaces ``model.classifier.weight.grad`` by
    :func:`coordinate_gradient`. Counts, for logging: ``steps`` (calls), ``skipped`` (calls
    without a defined confidence), ``projected_steps`` (calls that projected a row) and
    ``projected_rows`` (rows projected in all).

    Use: ``train_model(model, ..., before_step=GradientCoordination(model.task))``; the
    ablation "w/o CG-Coord" trains without the hook. Under DDP every process holds the same
    averaged gradient and computes the same global-batch confidences, so all make the same
    projection.
    """

    def __init__(self, task: str = "classification") -> None:
        self.task = check_task(task)
        self.steps = self.skipped = self.projected_steps = self.projected_rows = 0

    def counts(self) -> dict[str, int]:
        """The counters, for the fold's log and config (of this process's run: a resumed run
        counts from the epoch it resumed at)."""
        return {
            "steps": self.steps,
            "skipped": self.skipped,
            "projected_steps": self.projected_steps,
            "projected_rows": self.projected_rows,
        }

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], terms: Mapping[str, torch.Tensor]
    ) -> None:
        self.steps += 1
        model = unwrap(model)
        weight = model.classifier.weight
        branch_logits = {u: terms[f"branch_logits_{u}"] for u in SUBSPACES}
        confidences = branch_confidences(branch_logits, batch, self.task)
        if confidences is None or weight.grad is None:
            self.skipped += 1
            return
        coordinated, projected = coordinate_gradient(weight.grad, model.embed_dim, *confidences)
        n_projected = int(projected.sum())
        if n_projected:
            weight.grad.copy_(coordinated)
            self.projected_steps += 1
            self.projected_rows += n_projected


# --------------------------------------------------------------------------- constructors


def _ksfusion_example() -> tuple[dict, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batch_size, dim, height, width, n_genes = 4, 8, 4, 4, 12
    grid = torch.randn(batch_size, dim, height, width, generator=generator)
    grid_mask = (torch.rand(batch_size, 1, height, width, generator=generator) > 0.3).float()
    grid_mask[:, :, 0, 0] = 1.0  # every slide holds a patch
    grid = grid * grid_mask
    patches = grid.flatten(2).transpose(1, 2)
    kwargs = {
        "in_dim": dim,
        "n_genes": n_genes,
        "gene_groups": {"tumour": range(0, 5), "microenvironment": range(5, 12)},
        "n_outputs": 3,
        "grid_size": (3, 3),
        "heads": 2,
        "head_dim": 4,
        "offset_groups": 2,
        "offset_kernel": 3,
        "gene_hidden": (8,),
        "gene_dim": 8,
        "embed_dim": 8,
    }
    return kwargs, {
        "patches": patches,
        "grid": grid,
        "grid_mask": grid_mask,
        "genes": torch.randn(batch_size, n_genes, generator=generator),
        "label": torch.tensor([0, 1, 2, 1]),
        "event": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "time": torch.tensor([3.0, 5.0, 1.0, 2.0]),
    }


@register_model(family="ksfusion", example=_ksfusion_example)
def ksfusion(
    in_dim: int = 1024,
    n_genes: int = 420,
    gene_groups: Mapping[str, Sequence[int]] | None = None,
    n_outputs: int = 3,
    **kwargs,
) -> KSFusion:
    """KS-Fusion at paper sizes (50 x 50 grid, 8 heads x 64, 8 offset groups, SNN
    ``[64, 48, 32] -> 128``, α 0.5); ``gene_groups`` defaults to the paper's split of 420
    genes, the first 59 tumour-related and the other 361 microenvironment-related. Options:
    those of :class:`KSFusion` (``task``, ``grid_size``, ``use_gecon``, ...)."""
    if gene_groups is None:
        gene_groups = {"tumour": range(59), "microenvironment": range(59, n_genes)}
    return KSFusion(in_dim, n_genes, gene_groups, n_outputs, **kwargs)
