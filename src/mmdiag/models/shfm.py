r"""SHFM, the spatial-differentiated hetero-modal fusion module of MHD-Net, and its ablation.

Paper: H. Zhang et al., "MHD-Net: Memory-Aware Hetero-Modal Distillation Network for Thymic
Epithelial Tumor Typing With Missing Pathology Modality", IEEE Journal of Biomedical and Health
Informatics, 2024 (Section III-A, eqs. 1-3, Fig. 3). Authors' code:
https://github.com/wangpengyu0829/MHD-Net (``fusion_module.py``, commit dd00296).

SHFM fuses a radiology (CT) feature map ``f_R`` and a pathology (WSI) feature map ``f_P`` of the
same stage, both ``(B, c, t, h, w)``: the ``t`` WSI patches are treated as frames like the ``t``
CT frames. With ``κ`` the involution size and ``r`` the channel reduction:

- eq. 1: ``C(t) = f̂_R(t)ᵀ f̂_P``, the product of every CT voxel's ``c`` channels (after a 1³
  convolution) with the WSI feature (after another 1³ convolution) average-pooled to
  ``t × κ × κ`` positions: ``C`` has ``κ²t`` channels per CT voxel. A 1³ convolution maps it
  to the ``κ²`` weights of a spatial involution kernel ``Ik`` at every voxel.
- eq. 2: ``G = σ(conv(C))``, ``t + 1`` gates per CT voxel. The WSI feature, reduced to ``c/r``
  channels, has its frames folded into channels and is concatenated to every CT frame
  (``c + t·c/r`` channels, in ``t + 1`` groups: CT, then WSI frame 1 ... t); group ``b`` is
  multiplied by gate ``b``.
- eq. 3: each frame of the gated feature is aggregated over ``κ × κ`` neighbourhoods (zero
  padded) by its voxel's kernel ``Ik`` (:func:`mmdiag.kernels.involution.involution3d`), then
  projected back to ``c`` channels.

Choices where the paper is silent or ambiguous, and departures from the authors' code:

- The gate convolution is ``gate_kernel³`` (paper "7 × 7 3D convolution": default 7; the code
  uses 5³). It maps ``κ²t`` to ``t + 1`` channels, so it costs ``κ²t·(t+1)·gate_kernel³``
  weights: about 2.6 M at the paper's first stage (κ 7, t 12) with 7³ and 0.95 M with 5³, and
  as many multiply-adds per CT voxel.
- The WSI channel reduction is a ``reduce_kernel³`` convolution (paper "1 × 1": default 1; the
  code uses 3³).
- The WSI frames are folded frame-major (channels of frame 1, then frame 2 ...), so that group
  ``b + 1`` of eq. 2 is exactly WSI frame ``b``. The authors' code folds them channel-major but
  lays the gates out frame-major, so its gates mix frames; this is not reproduced.
- The gated feature is ``f̃ · G`` as in eq. 2; the code adds the ungated feature
  (``f̃ · G + f̃``), passes it through a 1³ convolution, batch norm and ReLU before the
  involution and adds it back after it. Those extras are left out.
- After the involution, ``norm_layer`` (default batch norm, as the code's ``bn2``) normalises the
  ``c + t·c/r`` channels before the 1³ projection to ``c``: eq. 1 multiplies features without
  any scaling, so the involution output has a scale far from that of the backbone's features.
  ``norm_layer=nn.Identity`` gives eqs. 1-3 exactly.
- The paper uses κ = 7 at every stage (Table V); the code's (7, 5, 3) per stage is a variant the
  caller chooses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmdiag.kernels.involution import involution3d


class SHFM(nn.Module):
    """Spatial-differentiated hetero-modal fusion of CT and WSI features of one stage (eqs. 1-3).

    Parameters
    ----------
    channels
        Channels ``c`` of both inputs and of the output.
    frames
        Frames ``t`` of both inputs (CT frames and WSI patches at this stage).
    kernel_size
        Involution size κ (odd); the paper's reference is 7.
    gate_kernel
        Size of the 3D convolution from ``C`` to the gates (odd; paper 7, authors' code 5).
    reduction
        Reduction rate ``r`` of the WSI channels (paper 4); must divide ``channels``.
    reduce_kernel
        Size of the WSI reduction convolution (odd; paper 1, authors' code 3).
    norm_layer
        Normalisation of the involution output, called with its channel count;
        ``nn.Identity`` for the bare equations.
    backend
        Involution backend (see :func:`mmdiag.kernels.involution.involution3d`).
    """

    def __init__(
        self,
        channels: int,
        frames: int,
        *,
        kernel_size: int = 7,
        gate_kernel: int = 7,
        reduction: int = 4,
        reduce_kernel: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm3d,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size=kernel_size, gate_kernel=gate_kernel, reduce_kernel=reduce_kernel)
        if channels % reduction:
            raise ValueError(f"reduction {reduction} must divide channels, got {channels}")
        self.channels, self.frames, self.kernel_size = channels, frames, kernel_size
        self.reduced = channels // reduction
        taps = kernel_size * kernel_size
        fused = channels + frames * self.reduced
        self.embed_ct = nn.Conv3d(channels, channels, 1)
        self.embed_wsi = nn.Conv3d(channels, channels, 1)
        self.pool_wsi = nn.AdaptiveAvgPool3d((frames, kernel_size, kernel_size))
        self.to_kernel = nn.Conv3d(taps * frames, taps, 1)
        self.to_gate = nn.Conv3d(taps * frames, frames + 1, gate_kernel, padding=gate_kernel // 2)
        self.reduce_wsi = nn.Conv3d(
            channels, self.reduced, reduce_kernel, padding=reduce_kernel // 2
        )
        self.norm = norm_layer(fused)
        self.project = nn.Conv3d(fused, channels, 1)
        self.backend = backend

    def correlation(self, f_r: torch.Tensor, f_p: torch.Tensor) -> torch.Tensor:
        """Correlation embedding ``C`` (eq. 1): ``(B, κ²t, t, h, w)``, channel ``s·κ² + tap``."""
        b, c, t, h, w = f_r.shape
        ct = self.embed_ct(f_r).flatten(2)  # (B, c, t·h·w)
        wsi = self.pool_wsi(self.embed_wsi(f_p)).flatten(2)  # (B, c, κ²t): GAP to t × κ × κ
        return torch.einsum("bcv,bcj->bjv", ct, wsi).reshape(b, -1, t, h, w)

    def gated(self, f_r: torch.Tensor, f_p: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``f̄_F``: CT and folded WSI channels, each group times its gate (eq. 2)."""
        b, c, t, h, w = f_r.shape
        wsi = self.reduce_wsi(f_p).transpose(1, 2)  # (B, t, c/r, h, w): frame-major
        wsi = wsi.reshape(b, t, self.reduced, 1, h, w).expand(-1, -1, -1, t, -1, -1)
        wsi = wsi * gate[:, 1:, None]  # WSI frame s times gate s + 1, at every CT frame
        ct = f_r * gate[:, :1]  # CT channels times gate 1
        return torch.cat([ct, wsi.reshape(b, t * self.reduced, t, h, w)], dim=1)

    def forward(self, f_r: torch.Tensor, f_p: torch.Tensor) -> torch.Tensor:
        """Fuse ``f_r`` (CT) and ``f_p`` (WSI), both ``(B, c, t, h, w)``, into that shape."""
        self._check_shapes(f_r, f_p)
        corr = self.correlation(f_r, f_p)
        kernel = self.to_kernel(corr).transpose(1, 2)  # eq. 1: Ik, (B, t, κ², h, w)
        gate = torch.sigmoid(self.to_gate(corr))  # eq. 2: G, (B, t + 1, t, h, w)
        fused = involution3d(self.gated(f_r, f_p, gate), kernel.contiguous(), backend=self.backend)
        return self.project(self.norm(fused))  # eq. 3, then back to c channels

    def _check_shapes(self, f_r: torch.Tensor, f_p: torch.Tensor) -> None:
        expected = (self.channels, self.frames)
        if f_r.shape != f_p.shape or tuple(f_r.shape[1:3]) != expected:
            raise ValueError(
                f"SHFM expects CT and WSI features of one shape (B, {self.channels}, "
                f"{self.frames}, h, w), got {tuple(f_r.shape)} and {tuple(f_p.shape)}"
            )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, frames={self.frames}, kernel_size={self.kernel_size}"


class ConcatFusion(nn.Module):
    """The "w/o SHFM" ablation (Fig. 5): CT and WSI features concatenated, then a 1³ convolution
    back to ``c`` channels. Same call as :class:`SHFM`; ``frames`` and further keywords are
    accepted and ignored so the two are interchangeable."""

    def __init__(self, channels: int, frames: int | None = None, **_: object) -> None:
        super().__init__()
        self.project = nn.Conv3d(2 * channels, channels, 1)

    def forward(self, f_r: torch.Tensor, f_p: torch.Tensor) -> torch.Tensor:
        """``(B, c, t, h, w)`` from CT and WSI features of that shape."""
        return self.project(torch.cat([f_r, f_p], dim=1))


def _check_odd(**sizes: int) -> None:
    for name, size in sizes.items():
        if size < 1 or size % 2 == 0:
            raise ValueError(f"{name} must be a positive odd number, got {size}")
