"""The comparison methods of the subspace-fusion paper's Table 1, each from its own paper.

The subspace-fusion paper (Knowledge-driven Subspace Fusion and Gradient Coordination for
Multi-modal Learning, MICCAI 2024) compares against three uni-modal and five multi-modal
methods; this file holds all of them:

- :class:`AttMIL`: M. Ilse, J. M. Tomczak and M. Welling, "Attention-based deep multiple
  instance learning", ICML 2018 (https://github.com/AMLab-Amsterdam/AttentionDeepMIL), gated
  attention pooling over a bag of patch features, sized as CLAM and MCAT's ``AMIL`` baseline.
- :class:`TransMIL`: Z. Shao et al., "TransMIL: Transformer based correlated multiple instance
  learning for whole slide image classification", NeurIPS 2021
  (https://github.com/szc19990412/TransMIL), with :class:`NystromAttention` (Y. Xiong et al.,
  "Nyströmformer: a Nyström-based algorithm for approximating self-attention", AAAI 2021) and
  the pyramid position encoding :class:`PPEG`.
- :class:`SNNClassifier`: G. Klambauer et al., "Self-normalizing neural networks", NeurIPS
  2017, on the gene vector alone (:class:`mmdiag.models.genomic.SNNEncoder`).
- :class:`LateFusion`: the AttMIL patch vector and the SNN gene vector, fused by
  concatenation, addition or :class:`BilinearFusion` (R. J. Chen et al., "Pathomic Fusion: an
  integrated framework for fusing histopathology and genomic features for cancer diagnosis and
  prognosis", IEEE TMI 2020, https://github.com/mahmoodlab/PathomicFusion), laid out as
  MCAT's ``MIL_Attention_FC_surv`` (https://github.com/mahmoodlab/MCAT).
- :class:`MCAT`: R. J. Chen et al., "Multimodal co-attention transformer for survival
  prediction in gigapixel whole slide images", ICCV 2021 (https://github.com/mahmoodlab/MCAT).
- :class:`CMTA`: F. Zhou and H. Chen, "Cross-modal translation and alignment for survival
  analysis", ICCV 2023 (https://github.com/FT-ZHOU-ZZZ/CMTA).

Every model takes the batches of :mod:`mmdiag.models.genomic` (``patches`` (B, N, D),
``genes`` (B, G), ``label`` and, for survival, ``event``), returns its logits from ``forward``
and a dict of named outputs from ``forward_outputs``, and has ``loss(batch, class_weight)``
returning ``(loss, logits, terms)``: :func:`mmdiag.models.genomic.task_loss` plus the paper's
own auxiliary terms (only CMTA has one). For survival the logits are one hazard logit per time
bin, as in MCAT and CMTA.

Departures shared by all models: the batch is padded to the same N patches (the authors train
one bag per step), and the SNN blocks are the shared SELU :class:`SNNEncoder` (MCAT's and
CMTA's ``SNN_Block`` use ELU before alpha dropout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mmdiag.models.genomic import SNNEncoder, check_task, task_loss
from mmdiag.models.registry import register_model

__all__ = [
    "CMTA",
    "MCAT",
    "PPEG",
    "AttMIL",
    "BilinearFusion",
    "GatedAttentionPool",
    "LateFusion",
    "NystromAttention",
    "SNNClassifier",
    "TransLayer",
    "TransMIL",
    "TransMILEncoder",
    "iterative_pinv",
    "kronecker_fusion",
    "nystrom_attention",
    "square_pad",
]

FUSIONS = ("concat", "add", "bilinear")

Batch = Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------- shared blocks


def _snn(in_dim: int, widths: Sequence[int], dropout: float) -> SNNEncoder:
    """An SNN whose layer widths are ``widths`` (the last one is the embedding width)."""
    widths = tuple(int(w) for w in widths)
    if not widths:
        raise ValueError("an SNN needs at least one layer width, got none")
    return SNNEncoder(in_dim, widths[:-1], widths[-1], dropout)


def _fc(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout, the patch-feature embedding of CLAM, MCAT and CMTA."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


def _check_fusion(fusion: str, allowed: Sequence[str]) -> str:
    if fusion not in allowed:
        raise ValueError(f"fusion must be one of {tuple(allowed)}, got {fusion!r}")
    return fusion


class _TaskModel(nn.Module):
    """``forward`` (logits) and ``loss`` over ``forward_outputs``; subclasses add aux terms."""

    task: str

    def forward_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B, n_outputs)."""
        return self.forward_outputs(batch)["logits"]

    def auxiliary_terms(
        self, outputs: Mapping[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """Named auxiliary loss terms, already weighted (none by default)."""
        return {}

    def loss(
        self, batch: Batch, class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Task loss plus the paper's auxiliary terms; ``(loss, logits, terms)``."""
        outputs = self.forward_outputs(batch)
        logits = outputs["logits"]
        task = task_loss(logits, batch, self.task, class_weight)
        extra = self.auxiliary_terms(outputs, batch)
        total = task + sum(extra.values()) if extra else task
        return total, logits, {"task": task.detach(), **{k: v.detach() for k, v in extra.items()}}


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, eq. 9), with dropout on both branches as CLAM.

    a_k = softmax_k(w^T (tanh(V h_k) ⊙ sigmoid(U h_k))) and z = sum_k a_k h_k (eq. 7).
    """

    def __init__(self, dim: int, attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_v = nn.Sequential(
            nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.attention_u = nn.Sequential(
            nn.Linear(dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.attention_w = nn.Linear(attention_dim, 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vector (B, dim) and attention weights (B, N) of tokens (B, N, dim)."""
        scores = self.attention_w(self.attention_v(tokens) * self.attention_u(tokens))  # eq. 9
        weights = torch.softmax(scores.squeeze(-1), dim=-1)
        return torch.einsum("bn,bnd->bd", weights, tokens), weights  # eq. 7


# ------------------------------------------------------------------ Nyström attention


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of square matrices (..., m, m) by the iteration of
    Razavi et al. used in Nyströmformer (Sec. 3): Z <- Z (13I - XZ (15I - XZ (7I - XZ))) / 4,
    from Z_0 = X^T / (max row sum * max column sum of |X|). The scale is taken per matrix;
    the ``nystrom-attention`` package takes one maximum over the whole batch.
    """
    absolute = matrix.abs()
    scale = absolute.sum(-1).amax(-1) * absolute.sum(-2).amax(-1)
    z = matrix.transpose(-1, -2) / scale[..., None, None]
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        xz = matrix @ z
        z = 0.25 * z @ (13 * identity - xz @ (15 * identity - xz @ (7 * identity - xz)))
    return z


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_landmarks: int,
    pinv_iterations: int = 6,
) -> torch.Tensor:
    """Nyström approximation of softmax(q k^T / sqrt(d)) v, q, k, v (..., n, d).

    Landmarks are the means of consecutive segments of queries and keys; the attention is
    softmax(Q K~^T) (softmax(Q~ K~^T))^+ softmax(Q~ K^T) V (Nyströmformer, Sec. 3), with the
    pseudo-inverse from :func:`iterative_pinv`. As the ``nystrom-attention`` package that
    TransMIL uses, a sequence whose length is not a multiple of the segment length gets zero
    tokens in front; here they are masked out of the landmark means and of the keys, and the
    number of landmarks is ``ceil(n / ceil(n / n_landmarks))`` (at most ``n_landmarks``), so
    every landmark has a real token. The package instead pads to ``n_landmarks`` segments,
    which for a sequence shorter than ``n_landmarks`` lets zero tokens into the softmax; here
    such a sequence has one landmark per token and the attention is exact.
    """
    n, dim = q.shape[-2], q.shape[-1]
    segment = math.ceil(n / n_landmarks)
    landmarks = math.ceil(n / segment)
    pad = landmarks * segment - n
    q = q * dim**-0.5
    real = torch.ones(n + pad, dtype=torch.bool, device=q.device)
    if pad:
        q, k, v = (F.pad(t, (0, 0, pad, 0)) for t in (q, k, v))
        real[:pad] = False
    counts = real.reshape(landmarks, segment).sum(-1).to(q.dtype)[:, None]
    q_landmarks = q.reshape(*q.shape[:-2], landmarks, segment, dim).sum(-2) / counts
    k_landmarks = k.reshape(*k.shape[:-2], landmarks, segment, dim).sum(-2) / counts
    kernel_1 = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)
    kernel_2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1)
    scores_3 = (q_landmarks @ k.transpose(-1, -2)).masked_fill(~real, float("-inf"))
    kernel_3 = torch.softmax(scores_3, dim=-1)
    out = (kernel_1 @ iterative_pinv(kernel_2, pinv_iterations)) @ (kernel_3 @ v)
    return out[..., pad:, :]


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention, as ``nystrom_attention.NystromAttention`` (the
    package TransMIL and CMTA use): bias-free q/k/v projection, :func:`nystrom_attention` per
    head, an optional depthwise convolution of the values along the sequence added to the
    output (``residual``, kernel 33), output projection and dropout.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual: bool = True,
        residual_kernel: int = 33,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head or dim // heads
        self.n_landmarks, self.pinv_iterations = n_landmarks, pinv_iterations
        inner = heads * self.dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual = (
            nn.Conv2d(
                heads,
                heads,
                (residual_kernel, 1),
                padding=(residual_kernel // 2, 0),
                groups=heads,
                bias=False,
            )
            if residual
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, n, dim) -> (B, n, dim)."""
        batch, n, _ = x.shape
        qkv = self.qkv(x).reshape(batch, n, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, n, dim_head)
        out = nystrom_attention(q, k, v, self.n_landmarks, self.pinv_iterations)
        if self.residual is not None:
            out = out + self.residual(v)
        return self.proj(out.transpose(1, 2).reshape(batch, n, -1))


# ------------------------------------------------------------------------------ TransMIL


class TransLayer(nn.Module):
    """TransMIL's layer: x + NystromAttention(LayerNorm(x)) (no feed-forward block).

    Sizes as TransMIL: 8 heads of ``dim // 8``, ``dim // 2`` landmarks, 6 pseudo-inverse
    iterations, value residual on, dropout 0.1.
    """

    def __init__(
        self,
        dim: int = 512,
        heads: int = 8,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(
            dim,
            heads=heads,
            dim_head=dim // heads,
            n_landmarks=n_landmarks or dim // 2,
            pinv_iterations=pinv_iterations,
            residual=True,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator (TransMIL's PPEG, Algorithm 1): the tokens laid out on
    their H x W grid (row-major) plus depthwise 7x7, 5x5 and 3x3 convolutions of it; the class
    token (first) passes unchanged.
    """

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens (B, 1 + height * width, dim), class token first, -> the same shape."""
        batch, n, dim = x.shape
        if n != 1 + height * width:
            raise ValueError(f"PPEG needs 1 + {height} x {width} tokens, got {n}")
        class_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(batch, dim, height, width)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([class_token, grid.flatten(2).transpose(1, 2)], dim=1)


def square_pad(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """TransMIL's squaring (Algorithm 1): tokens (B, N, C) followed by copies of the first
    ``side^2 - N`` tokens, ``side = ceil(sqrt(N))``; returns the tokens and ``side``.
    """
    n = tokens.shape[1]
    side = math.ceil(math.sqrt(n))
    extra = side * side - n
    while extra > 0:  # a bag of fewer than half the square repeats itself more than once
        take = min(extra, tokens.shape[1])
        tokens = torch.cat([tokens, tokens[:, :take]], dim=1)
        extra -= take
    return tokens, side


class TransMILEncoder(nn.Module):
    """TransMIL's TPT body over embedded tokens: squaring, class token, TransLayer, PPEG (when
    ``positional``), TransLayer, LayerNorm (Algorithm 1). Returns the class token (B, dim) and
    the N real tokens (B, N, dim), without the squaring copies.

    CMTA uses this body twice: ``Transformer_P`` (with PPEG) for pathology and
    ``Transformer_G`` (no squaring, no PPEG) for gene tokens.
    """

    def __init__(
        self,
        dim: int = 512,
        heads: int = 8,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        positional: bool = True,
        class_token_std: float = 1.0,
    ) -> None:
        super().__init__()
        # TransMIL draws the class token from N(0, 1); CMTA from N(0, 1e-6^2)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * class_token_std)
        self.layer1 = TransLayer(dim, heads, n_landmarks, pinv_iterations, dropout)
        self.position = PPEG(dim) if positional else None
        self.layer2 = TransLayer(dim, heads, n_landmarks, pinv_iterations, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.shape[1]
        side = 0
        if self.position is not None:
            tokens, side = square_pad(tokens)
        h = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        h = self.layer1(h)
        if self.position is not None:
            h = self.position(h, side, side)
        h = self.norm(self.layer2(h))
        return h[:, 0], h[:, 1 : 1 + n]


class TransMIL(_TaskModel):
    """TransMIL (Shao et al., "TransMIL: Transformer based correlated multiple instance
    learning for whole slide image classification", NeurIPS 2021;
    https://github.com/szc19990412/TransMIL).

    fc (in_dim -> 512, ReLU), then :class:`TransMILEncoder` and a linear head on the class
    token. Sizes as the authors' code.
    """

    def __init__(
        self,
        in_dim: int = 1024,
        n_outputs: int = 2,
        task: str = "classification",
        *,
        dim: int = 512,
        heads: int = 8,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.task, self.num_classes = check_task(task), n_outputs
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.encoder = TransMILEncoder(dim, heads, n_landmarks, pinv_iterations, dropout)
        self.head = nn.Linear(dim, n_outputs)

    def forward_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        class_token, _ = self.encoder(self.fc(batch["patches"]))
        return {"logits": self.head(class_token), "features": class_token}


# ------------------------------------------------------------------------ AttMIL and SNN


class AttentionMILEncoder(nn.Module):
    """Patch features (B, N, in_dim) -> fc -> gated attention pooling -> rho (B, out_dim).

    Sizes of CLAM ("small": 1024 -> 512, attention 256) and of MCAT's AMIL baseline, whose
    ``rho`` (512 -> 256, ReLU, dropout) follows the pooling; ``rho_dim=None`` drops it.
    """

    def __init__(
        self,
        in_dim: int = 1024,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        rho_dim: int | None = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.fc = _fc(in_dim, hidden_dim, dropout)
        self.pool = GatedAttentionPool(hidden_dim, attention_dim, dropout)
        self.rho = _fc(hidden_dim, rho_dim, dropout) if rho_dim else nn.Identity()
        self.out_dim = rho_dim or hidden_dim

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bag vector (B, out_dim) and attention weights (B, N)."""
        pooled, weights = self.pool(self.fc(patches))
        return self.rho(pooled), weights


class AttMIL(_TaskModel):
    """Gated attention MIL (Ilse, Tomczak and Welling, "Attention-based deep multiple instance
    learning", ICML 2018; https://github.com/AMLab-Amsterdam/AttentionDeepMIL), sized as
    MCAT's ``MIL_Attention_FC_surv`` (https://github.com/mahmoodlab/MCAT).

    :class:`AttentionMILEncoder` then a linear head. Outputs: ``logits``, ``attention`` (B, N)
    and ``features``.
    """

    def __init__(
        self,
        in_dim: int = 1024,
        n_outputs: int = 2,
        task: str = "classification",
        *,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        rho_dim: int | None = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.task, self.num_classes = check_task(task), n_outputs
        self.encoder = AttentionMILEncoder(in_dim, hidden_dim, attention_dim, rho_dim, dropout)
        self.head = nn.Linear(self.encoder.out_dim, n_outputs)

    def forward_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        features, attention = self.encoder(batch["patches"])
        return {"logits": self.head(features), "attention": attention, "features": features}


class SNNClassifier(_TaskModel):
    """Genes-only SNN (Klambauer et al., "Self-normalizing neural networks", NeurIPS 2017;
    https://github.com/bioinf-jku/SNNs), as MCAT's ``SNN`` baseline: SNN layers of widths
    ``hidden_dims`` (MCAT and Pathomic Fusion: 256, 256) and a linear head.
    """

    def __init__(
        self,
        n_genes: int,
        n_outputs: int = 2,
        task: str = "classification",
        *,
        hidden_dims: Sequence[int] = (256, 256),
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.task, self.num_classes = check_task(task), n_outputs
        self.encoder = _snn(n_genes, hidden_dims, dropout)
        self.head = nn.Linear(self.encoder.out_dim, n_outputs)

    def forward_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        features = self.encoder(batch["genes"])
        return {"logits": self.head(features), "features": features}


# ------------------------------------------------------------------------ late fusion


def kronecker_fusion(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flattened outer product of [first; 1] and [second; 1], (B, (d1 + 1) (d2 + 1)).

    Appending 1 keeps the unimodal features (last row and column) beside their products
    (Pathomic Fusion's tensor fusion).
    """
    ones = first.new_ones(first.shape[0], 1)
    first, second = torch.cat([first, ones], 1), torch.cat([second, ones], 1)
    return torch.einsum("bi,bj->bij", first, second).flatten(1)


class BilinearFusion(nn.Module):
    """Pathomic Fusion's gated Kronecker fusion (Chen et al., "Pathomic Fusion: an integrated
    framework for fusing histopathology and genomic features for cancer diagnosis and
    prognosis", IEEE TMI 2020; https://github.com/mahmoodlab/PathomicFusion, ``BilinearFusion``).

    Per modality m (the paper's gating-based attention): h_m = ReLU(W_h x_m), gate
    z_m = sigmoid(bilinear(x_1, x_2)), o_m = Dropout(ReLU(W_o (z_m ⊙ h_m))), width
    dim_m / scale_m; then the Kronecker product of [o_1; 1] and [o_2; 1]
    (:func:`kronecker_fusion`), dropout, fc -> ``mmhid``, and a skip connection: fc over
    [fused; x_1; x_2] -> ``mmhid``. MCAT uses scale 8 and ``mmhid`` 256.
    """

    def __init__(
        self,
        dim1: int = 256,
        dim2: int = 256,
        scale_dim1: int = 8,
        scale_dim2: int = 8,
        mmhid: int = 256,
        dropout: float = 0.25,
        gate1: bool = True,
        gate2: bool = True,
        skip: bool = True,
    ) -> None:
        super().__init__()
        small1, small2 = dim1 // scale_dim1, dim2 // scale_dim2
        self.gate1, self.gate2, self.skip = gate1, gate2, skip
        self.linear_h1 = nn.Sequential(nn.Linear(dim1, small1), nn.ReLU())
        self.linear_z1 = nn.Bilinear(dim1, dim2, small1)
        self.linear_o1 = nn.Sequential(nn.Linear(small1, small1), nn.ReLU(), nn.Dropout(dropout))
        self.linear_h2 = nn.Sequential(nn.Linear(dim2, small2), nn.ReLU())
        self.linear_z2 = nn.Bilinear(dim1, dim2, small2)
        self.linear_o2 = nn.Sequential(nn.Linear(small2, small2), nn.ReLU(), nn.Dropout(dropout))
        self.post_fusion_dropout = nn.Dropout(dropout)
        self.encoder1 = _fc((small1 + 1) * (small2 + 1), mmhid, dropout)
        self.encoder2 = _fc(mmhid + (dim1 + dim2 if skip else 0), mmhid, dropout)
        self.out_dim = mmhid

    def gated(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated unimodal vectors o_1, o_2 before the Kronecker product."""
        h1, h2 = self.linear_h1(first), self.linear_h2(second)
        if self.gate1:
            h1 = torch.sigmoid(self.linear_z1(first, second)) * h1
        if self.gate2:
            h2 = torch.sigmoid(self.linear_z2(first, second)) * h2
        return self.linear_o1(h1), self.linear_o2(h2)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Fused (B, mmhid) of (B, dim1) and (B, dim2)."""
        out = self.encoder1(self.post_fusion_dropout(kronecker_fusion(*self.gated(first, second))))
        if self.skip:
            out = torch.cat([out, first, second], dim=1)
        return self.encoder2(out)


class LateFusion(_TaskModel):
    """AttMIL x SNN late fusion, the Concat, Add and Bilinear rows of Table 1, laid out as
    MCAT's ``MIL_Attention_FC_surv`` (Chen et al., ICCV 2021; https://github.com/mahmoodlab/MCAT).

    Patch vector: :class:`AttentionMILEncoder` (1024 -> 512, gated attention 256, rho -> 256);
    gene vector: SNN (256, 256). ``fusion``:

    - ``"concat"``: MLP over [patch; gene] (Linear 2 x 256 -> 256, ReLU, Linear, ReLU), as MCAT;
    - ``"add"``: the same MLP over patch + gene (widths must match);
    - ``"bilinear"``: :class:`BilinearFusion` (scale 8, ``mmhid`` 256), as MCAT and Pathomic
      Fusion (the Bilinear row).

    then a linear head. The MCAT code has no "add" option; the MLP after the sum is this
    file's choice, so that Concat and Add differ only in the fusion operation.
    """

    def __init__(
        self,
        in_dim: int = 1024,
        n_genes: int = 1,
        n_outputs: int = 2,
        task: str = "classification",
        *,
        fusion: str = "concat",
        hidden_dim: int = 512,
        attention_dim: int = 256,
        fusion_dim: int = 256,
        gene_hidden_dims: Sequence[int] = (256, 256),
        bilinear_scale: int = 8,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.task, self.num_classes = check_task(task), n_outputs
        self.fusion = _check_fusion(fusion, FUSIONS)
        self.patch_encoder = AttentionMILEncoder(
            in_dim, hidden_dim, attention_dim, fusion_dim, dropout
        )
        self.gene_encoder = _snn(n_genes, gene_hidden_dims, dropout)
        patch_dim, gene_dim = self.patch_encoder.out_dim, self.gene_encoder.out_dim
        if fusion == "add" and patch_dim != gene_dim:
            raise ValueError(
                f"add fusion needs equal widths, got fusion_dim={patch_dim} and gene "
                f"width {gene_dim}"
            )
        if fusion == "bilinear":
            self.mm = BilinearFusion(
                patch_dim, gene_dim, bilinear_scale, bilinear_scale, fusion_dim, dropout
            )
        else:
            width = patch_dim + gene_dim if fusion == "concat" else patch_dim
            self.mm = nn.Sequential(
                nn.Linear(width, fusion_dim),
                nn.ReLU(),
                nn.Linear(fusion_dim, fusion_dim),
                nn.ReLU(),
            )
        self.head = nn.Linear(fusion_dim, n_outputs)

    def forward_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        patch, attention = self.patch_encoder(batch["patches"])
        gene = self.gene_encoder(batch["genes"])
        if self.fusion == "bilinear":
            fused = self.mm(patch, gene)
        elif self.fusion == "concat":
            fused = self.mm(torch.cat([patch, gene], dim=1))
        else:
            fused = self.mm(patch + gene)
        return {
            "logits": self.head(fused),
            "attention": attention,
            "patch_features": patch,
            "gene_features": gene,
        }


# -------------------------------------------------------------------------------- MCAT


class GeneGroupTokens(nn.Module):
    """One token per gene group: an SNN per group over that group's genes (MCAT's genomic bag;
    CMTA's genomic embedding). ``gene_groups`` maps a name to indices into ``genes``.
    """

    def __init__(
        self, gene_groups: Mapping[str, Sequence[int]], widths: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        if not gene_groups:
            raise ValueError("gene_groups must name at least one group of genes, got none")
        self.names = list(gene_groups)
        self.networks = nn.ModuleList()
        for index, name in enumerate(self.names):
            genes = torch.as_tensor(list(gene_groups[name]), dtype=torch.long)
            if genes.numel() == 0:
                raise ValueError(f"gene group {name!r} is empty")
            self.register_buffer(f"genes_{index}", genes, persistent=False)
            self.networks.append(_snn(genes.numel(), widths, dropout))
        self.out_dim = self.networks[0].out_dim

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        """Gene vector (B, G) -> tokens (B, n_groups, width)."""
        tokens = [
            network(genes[:, getattr(self, f"genes_{index}")])
            for index, network in enumerate(self.networks)
        ]
        return torch.stack(tokens, dim=1)


def _set_transformer(dim: int, heads: int, ffn_dim: int, layers: int, dropout: float):
    layer = nn.TransformerEncoderLayer(
        dim, heads, ffn_dim, dropout, activation="relu", batch_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class MCAT(_TaskModel):
    """Multimodal co-attention transformer (Chen et al., "Multimodal co-attention transformer
    for survival prediction in gigapixel whole slide images", ICCV 2021;
    https://github.com/mahmoodlab/MCAT, ``MCAT_Surv``).

    - Patch tokens: fc (in_dim -> 256, ReLU, dropout); gene tokens: one SNN (256, 256) per
      gene group (:class:`GeneGroupTokens`).
    - Genomic-guided co-attention (GCA layer): one-head attention with the gene tokens as
      queries and the patch tokens as keys and values, giving one co-attended patch token per
      gene group, softmax(W_q G (W_k H)^T / sqrt(d)) W_v H.
    - Set-based MIL transformers: a 2-layer transformer encoder (8 heads,
      feed-forward 512, ReLU, post-norm) on each stream, then gated attention pooling
      (attention 256) and rho (256 -> 256, ReLU, dropout) on each.
    - Fusion: ``"concat"`` (MLP 512 -> 256 -> 256, the authors' default) or ``"bilinear"``
      (:class:`BilinearFusion`), then a linear head.

    Outputs: ``logits``, ``coattention`` (B, n_groups, N), ``patch_attention`` and
    ``gene_attention`` (B, n_groups) and ``gene_tokens`` (B, n_groups, dim).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        gene_groups: Mapping[str, Sequence[int]] | None = None,
        n_outputs: int = 4,
        task: str = "survival",
        *,
        dim: int = 256,
        gene_hidden_dims: Sequence[int] = (256,),
        heads: int = 8,
        ffn_dim: int = 512,
        layers: int = 2,
        attention_dim: int | None = None,
        fusion: str = "concat",
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if gene_groups is None:
            raise ValueError("MCAT needs gene_groups (one genomic token per group), got None")
        self.task, self.num_classes = check_task(task), n_outputs
        self.fusion = _check_fusion(fusion, ("concat", "bilinear"))
        attention_dim = attention_dim or dim
        self.patch_fc = _fc(in_dim, dim, dropout)
        self.gene_tokens = GeneGroupTokens(gene_groups, (*gene_hidden_dims, dim), dropout)
        self.coattention = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.patch_transformer = _set_transformer(dim, heads, ffn_dim, layers, dropout)
        self.patch_pool = GatedAttentionPool(dim, attention_dim, dropout)
        self.patch_rho = _fc(dim, dim, dropout)
        self.gene_transformer = _set_transformer(dim, heads, ffn_dim, layers, dropout)
        self.gene_pool = GatedAttentionPool(dim, attention_dim, dropout)
        self.gene_rho = _fc(dim, dim, dropout)
        if fusion == "bilinear":
            self.mm = BilinearFusion(dim, dim, 8, 8, dim, dropout)
        else:
            self.mm = nn.Sequential(
                nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU()
            )
        self.head = nn.Linear(dim, n_outputs)

    def forward_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        patches = self.patch_fc(batch["patches"])  # H: (B, N, dim)
        genes = self.gene_tokens(batch["genes"])  # G: (B, n_groups, dim)
        coattended, coattention = self.coattention(genes, patches, patches, need_weights=True)
        patch_vector, patch_attention = self.patch_pool(self.patch_transformer(coattended))
        gene_vector, gene_attention = self.gene_pool(self.gene_transformer(genes))
        patch_vector, gene_vector = self.patch_rho(patch_vector), self.gene_rho(gene_vector)
        if self.fusion == "bilinear":
            fused = self.mm(patch_vector, gene_vector)
        else:
            fused = self.mm(torch.cat([patch_vector, gene_vector], dim=1))
        return {
            "logits": self.head(fused),
            "coattention": coattention,
            "patch_attention": patch_attention,
            "gene_attention": gene_attention,
            "gene_tokens": genes,
        }


# -------------------------------------------------------------------------------- CMTA


class CMTA(_TaskModel):
    """Cross-modal translation and alignment (Zhou and Chen, "Cross-modal translation and
    alignment for survival analysis", ICCV 2023; https://github.com/FT-ZHOU-ZZZ/CMTA).

    - Embeddings: patches fc (in_dim -> 256, ReLU, dropout); one SNN (1024, 256) per gene
      group (:class:`GeneGroupTokens`).
    - Encoders: a TransMIL body with PPEG for pathology (``Transformer_P``) and one without
      squaring or PPEG for gene tokens (``Transformer_G``), each with a class token
      (:class:`TransMILEncoder`, class tokens drawn from N(0, 1e-6^2) as the authors).
    - Cross-modal translators: one-head attention with the pathology tokens as queries over the
      gene tokens (pathology re-expressed from genomics) and the reverse; decoders of the
      same two kinds read the translated tokens, and their class tokens are the translated
      representations P_hat (pathology) and G_hat (genomics).
    - Alignment: L1 between each translated class token and the encoder's, with the encoder's
      side detached (as the authors' training loop); loss = task + alpha (L1(P, P_hat) +
      L1(G, G_hat)), alpha = 0.5 (the authors' default).
    - Fusion: concat (or ``"bilinear"``) of (P + P_hat) / 2 and (G + G_hat) / 2, MLP as MCAT,
      linear head.

    The authors' pathology encoder returns the squaring copies among its patch tokens and so
    attends over them in the translator; here only the N real tokens are passed on.
    Outputs: ``logits``, ``path_encoded`` (P), ``path_translated`` (P_hat), ``gene_encoded``
    (G) and ``gene_translated`` (G_hat), each (B, dim).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        gene_groups: Mapping[str, Sequence[int]] | None = None,
        n_outputs: int = 4,
        task: str = "survival",
        *,
        dim: int = 256,
        gene_hidden_dims: Sequence[int] = (1024,),
        heads: int = 8,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        attention_dropout: float = 0.1,
        fusion: str = "concat",
        alignment_weight: float = 0.5,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if gene_groups is None:
            raise ValueError("CMTA needs gene_groups (one genomic token per group), got None")
        if alignment_weight < 0:
            raise ValueError(f"alignment_weight must be >= 0, got {alignment_weight}")
        self.task, self.num_classes = check_task(task), n_outputs
        self.fusion = _check_fusion(fusion, ("concat", "bilinear"))
        self.alignment_weight = float(alignment_weight)
        self.patch_fc = _fc(in_dim, dim, dropout)
        self.gene_tokens = GeneGroupTokens(gene_groups, (*gene_hidden_dims, dim), dropout)
        body = {
            "dim": dim,
            "heads": heads,
            "n_landmarks": n_landmarks,
            "pinv_iterations": pinv_iterations,
            "dropout": attention_dropout,
            "class_token_std": 1e-6,
        }
        self.path_encoder = TransMILEncoder(positional=True, **body)
        self.path_decoder = TransMILEncoder(positional=True, **body)
        self.gene_encoder = TransMILEncoder(positional=False, **body)
        self.gene_decoder = TransMILEncoder(positional=False, **body)
        self.path_from_genes = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.genes_from_path = nn.MultiheadAttention(dim, 1, batch_first=True)
        if fusion == "bilinear":
            self.mm = BilinearFusion(dim, dim, 8, 8, dim, dropout)
        else:
            self.mm = nn.Sequential(
                nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU()
            )
        self.head = nn.Linear(dim, n_outputs)

    def forward_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        patches = self.patch_fc(batch["patches"])
        genes = self.gene_tokens(batch["genes"])
        path_encoded, path_tokens = self.path_encoder(patches)
        gene_encoded, gene_tokens = self.gene_encoder(genes)
        path_in_genes, _ = self.path_from_genes(path_tokens, gene_tokens, gene_tokens)
        genes_in_path, _ = self.genes_from_path(gene_tokens, path_tokens, path_tokens)
        path_translated, _ = self.path_decoder(path_in_genes)
        gene_translated, _ = self.gene_decoder(genes_in_path)
        path_vector = (path_encoded + path_translated) / 2
        gene_vector = (gene_encoded + gene_translated) / 2
        if self.fusion == "bilinear":
            fused = self.mm(path_vector, gene_vector)
        else:
            fused = self.mm(torch.cat([path_vector, gene_vector], dim=1))
        return {
            "logits": self.head(fused),
            "path_encoded": path_encoded,
            "path_translated": path_translated,
            "gene_encoded": gene_encoded,
            "gene_translated": gene_translated,
        }

    def auxiliary_terms(
        self, outputs: Mapping[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """alpha * L1 of each translated class token to the (detached) encoded one."""
        weight = self.alignment_weight
        return {
            "path_alignment": weight
            * F.l1_loss(outputs["path_translated"], outputs["path_encoded"].detach()),
            "gene_alignment": weight
            * F.l1_loss(outputs["gene_translated"], outputs["gene_encoded"].detach()),
        }


# ------------------------------------------------------------------------- constructors

_GROUPS = {"tumour": [0, 1, 2, 3], "immune": [4, 5, 6, 7], "stroma": [8, 9, 10, 11]}


def _tiny_batch(task: str = "classification", n_outputs: int = 3, seed: int = 0) -> dict:
    """B = 4 cases of 9 patches of 8 features (on a 3 x 3 grid) and 12 genes."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(4, 8, 3, 3, generator=generator)
    batch = {
        "patches": grid.flatten(2).transpose(1, 2).contiguous(),
        "grid": grid,
        "grid_mask": torch.ones(4, 1, 3, 3),
        "genes": torch.randn(4, 12, generator=generator),
        "label": torch.tensor([0, 1, 2, 1]) % n_outputs,
        "event": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "time": torch.tensor([3.0, 10.0, 25.0, 14.0]),
    }
    return batch


def _example(**kwargs):
    task = kwargs.get("task", "classification")
    return lambda: (dict(kwargs), _tiny_batch(task, kwargs["n_outputs"]))


_TINY_MIL = {"in_dim": 8, "n_outputs": 3, "hidden_dim": 16, "attention_dim": 8, "rho_dim": 8}
_TINY_FUSION = {
    "in_dim": 8,
    "n_genes": 12,
    "n_outputs": 3,
    "hidden_dim": 16,
    "attention_dim": 8,
    "fusion_dim": 8,
    "gene_hidden_dims": (16, 8),
}
_TINY_TOKENS = {"in_dim": 8, "gene_groups": _GROUPS, "n_outputs": 4, "task": "survival"}


@register_model(family="ksfusion", example=_example(**_TINY_MIL))
def attmil(**kwargs) -> AttMIL:
    """AttMIL row of Table 1 (histology only)."""
    return AttMIL(**kwargs)


@register_model(
    family="ksfusion",
    example=_example(in_dim=8, n_outputs=3, dim=16, heads=2, n_landmarks=4),
)
def transmil(**kwargs) -> TransMIL:
    """TransMIL row of Table 1 (histology only)."""
    return TransMIL(**kwargs)


@register_model(family="ksfusion", example=_example(n_genes=12, n_outputs=3, hidden_dims=(16, 8)))
def snn(**kwargs) -> SNNClassifier:
    """SNN row of Table 1 (genes only)."""
    return SNNClassifier(**kwargs)


@register_model(family="ksfusion", example=_example(**_TINY_FUSION))
def concat_fusion(**kwargs) -> LateFusion:
    """Concat row of Table 1: AttMIL and SNN vectors concatenated."""
    return LateFusion(fusion="concat", **kwargs)


@register_model(family="ksfusion", example=_example(**_TINY_FUSION))
def add_fusion(**kwargs) -> LateFusion:
    """Add row of Table 1: AttMIL and SNN vectors added."""
    return LateFusion(fusion="add", **kwargs)


@register_model(family="ksfusion", example=_example(**_TINY_FUSION, bilinear_scale=2))
def bilinear_fusion(**kwargs) -> LateFusion:
    """Bilinear row of Table 1: Pathomic Fusion's gated Kronecker fusion of the two vectors."""
    return LateFusion(fusion="bilinear", **kwargs)


@register_model(
    family="ksfusion",
    example=_example(**_TINY_TOKENS, dim=16, gene_hidden_dims=(16,), heads=2, ffn_dim=32),
)
def mcat(**kwargs) -> MCAT:
    """MCAT row of Table 1."""
    return MCAT(**kwargs)


@register_model(
    family="ksfusion",
    example=_example(**_TINY_TOKENS, dim=16, gene_hidden_dims=(16,), heads=2, n_landmarks=4),
)
def cmta(**kwargs) -> CMTA:
    """CMTA row of Table 1."""
    return CMTA(**kwargs)
