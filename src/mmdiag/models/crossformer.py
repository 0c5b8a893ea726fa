"""CrossFormer++: a vision transformer with cross-scale embeddings and short/long attention.

Paper: W. Wang et al., "CrossFormer++: A versatile vision transformer hinging on cross-scale
attention", IEEE TPAMI, 2023. Authors' code: https://github.com/cheerss/CrossFormer
(``models/crossformer.py`` with ``configs/crossformer_pp/*``, commit 7952010).
A row of CMUS-Net's Tables 5 and 6 (K. Long et al., Medical Image Analysis 2025, Sec. 5.2.1),
where one CrossFormer++ per modality gives pooled features that are concatenated and
classified.

The parts, as the authors' code builds them:

- cross-scale embedding layer (CEL): convolutions of several kernel sizes with one stride,
  their outputs concatenated along channels (kernels 4/8/16/32 at the input, 2/4 between
  stages), the larger kernels given fewer channels;
- long-short distance attention: blocks alternate between short-distance attention (SDA,
  G x G adjacent tokens per group) and long-distance attention (LDA, G x G tokens sampled at
  interval I), padding the map to a multiple of the group and masking the padded keys;
  a group as large as the map is plain self-attention;
- dynamic position bias (DPB): an MLP maps each relative offset (dy, dx) to one bias per head;
- CrossFormer++'s progressive group sizes (constant per stage: 4, 4, 14, 7 with intervals 4,
  2, 1, 1) and its amplitude cooling layer (ACL): after every third block of a stage but its
  last, a depthwise 3x3 convolution and a LayerNorm replace the features.

Choices where the CMUS-Net paper names no size: CrossFormer++-S (``crossformerpp_small``,
the smallest CrossFormer++ the authors publish: width 64, depths 2-2-18-2, heads 2-4-8-16,
stochastic depth 0.2). ``num_classes=0`` leaves out the classifier (the layer-normalised,
average-pooled last stage; the timm encoder convention), the form
:class:`mmdiag.models.cmus.CMUSConcat` uses. Nothing is downloaded; a local checkpoint of this
module's state dict loads through the shared encoder checkpoint loader; the parameter names
follow the authors' code, so their ImageNet CrossFormer++-S state dict should load as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.nn import functional as F

NEG_INF = -1000000.0  # the authors' mask value for padded keys


@dataclass(frozen=True)
class CrossFormerSize:
    """One CrossFormer++ configuration (``configs/crossformer_pp`` of the authors' code)."""

    embed_dim: int = 64
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    group_size: tuple[int, ...] = (4, 4, 14, 7)
    interval: tuple[int, ...] = (4, 2, 1, 1)
    patch_size: tuple[int, ...] = (4, 8, 16, 32)
    merge_size: tuple[int, ...] = (2, 4)
    drop_path_rate: float = 0.2
    img_size_px: int = 224


#: Encoder names a CMUS variant can give; ``test_crossformerpp`` is tiny, for tests (32 px).
CROSSFORMER_SIZES = {
    "crossformerpp_small": CrossFormerSize(),
    "test_crossformerpp": CrossFormerSize(
        embed_dim=32,  # DPB width dim / 16 >= 2: a width-1 LayerNorm gives constants
        depths=(1, 1, 4, 1),  # four blocks: SDA, LDA, SDA + ACL, LDA
        num_heads=(1, 2, 2, 4),
        group_size=(2, 2, 2, 1),
        interval=(2, 1, 1, 1),
        drop_path_rate=0.0,
        img_size_px=32,
    ),
}


# --------------------------------------------------------------------------- embeddings


def cross_scale_widths(total: int, n_kernels: int) -> list[int]:
    """Channels of each kernel of a CEL: halves for the smaller kernels, the last two equal."""
    widths = [total // 2 ** (i + 1) for i in range(n_kernels - 1)]
    return [*widths, total // 2 ** (n_kernels - 1)]


def cross_scale_convs(
    in_channels: int, out_channels: int, kernel_sizes: Sequence[int], stride: int
) -> nn.ModuleList:
    """A CEL's convolutions: one per kernel size, all at ``stride``, centred by padding."""
    widths = cross_scale_widths(out_channels, len(kernel_sizes))
    return nn.ModuleList(
        nn.Conv2d(in_channels, width, kernel, stride=stride, padding=(kernel - stride) // 2)
        for width, kernel in zip(widths, kernel_sizes, strict=True)
    )


def cross_scale_tokens(convs: nn.ModuleList, grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H' * W', sum of widths): every kernel's map, concatenated."""
    return torch.cat([conv(grid).flatten(2).transpose(1, 2) for conv in convs], dim=2)


class PatchEmbed(nn.Module):
    """The input CEL: kernels 4, 8, 16, 32 at stride 4, then LayerNorm."""

    def __init__(self, embed_dim: int, kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        self.projs = cross_scale_convs(3, embed_dim, kernel_sizes, stride=kernel_sizes[0])
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(cross_scale_tokens(self.projs, images))


class PatchMerging(nn.Module):
    """The CEL between two stages: LayerNorm, then kernels 2 and 4 at stride 2, 2x width."""

    def __init__(self, resolution: int, dim: int, kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(dim)
        self.reductions = cross_scale_convs(dim, 2 * dim, kernel_sizes, stride=2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, dim = tokens.shape
        grid = self.norm(tokens).view(batch, self.resolution, self.resolution, dim)
        return cross_scale_tokens(self.reductions, grid.permute(0, 3, 1, 2))


# --------------------------------------------------------------------------- attention


class DynamicPosBias(nn.Module):
    """DPB: an MLP from a relative offset (dy, dx) to one attention bias per head."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        pos_dim = max(dim // 4, 1)
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


def relative_offsets(group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every offset in a G x G group, ((2G-1)^2, 2), and each token pair's index into it."""
    span = torch.arange(1 - group, group)
    offsets = torch.stack(torch.meshgrid(span, span, indexing="ij")).flatten(1).T.float()
    coords = torch.stack(
        torch.meshgrid(torch.arange(group), torch.arange(group), indexing="ij")
    ).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (group - 1)
    return offsets, relative[..., 0] * (2 * group - 1) + relative[..., 1]


class GroupAttention(nn.Module):
    """Multi-head self-attention within groups of G x G tokens, with the DPB bias."""

    def __init__(self, dim: int, group: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.group = num_heads, group
        self.pos = DynamicPosBias(dim // 4, num_heads)
        offsets, index = relative_offsets(group)
        self.register_buffer("biases", offsets, persistent=False)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """(heads, G^2, G^2): the DPB bias of every query-key pair."""
        return self.pos(self.biases)[self.relative_position_index].permute(2, 0, 1)

    def forward(self, groups: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``groups`` (B * nG, G^2, C); ``mask`` (nG, G^2, G^2) of 0 / NEG_INF, or None."""
        n, length, dim = groups.shape
        qkv = self.qkv(groups).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = self.position_bias()[None]
        if mask is not None:
            n_groups = mask.shape[0]
            bias = (bias + mask[:, None]).repeat(n // n_groups, 1, 1, 1)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(attended.transpose(1, 2).reshape(n, length, dim))


def padding_for(resolution: int, multiple: int) -> int:
    return (multiple - resolution % multiple) % multiple


def to_groups(grid: torch.Tensor, group: int, interval: int, long_distance: bool) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B * nG, G^2, C): adjacent G x G tokens (SDA) or tokens sampled every
    ``interval`` (LDA)."""
    batch, height, width, dim = grid.shape
    if not long_distance:
        grid = grid.reshape(batch, height // group, group, width // group, group, dim)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(-1, group * group, dim)
    rows, cols = height // (group * interval), width // (group * interval)
    grid = grid.reshape(batch, rows, group, interval, cols, group, interval, dim)
    return grid.permute(0, 1, 4, 3, 6, 2, 5, 7).reshape(-1, group * group, dim)


def from_groups(
    groups: torch.Tensor, batch: int, size: int, group: int, interval: int, long_distance: bool
) -> torch.Tensor:
    """The inverse of :func:`to_groups` for a ``size`` x ``size`` padded map."""
    dim = groups.shape[-1]
    if not long_distance:
        grid = groups.reshape(batch, size // group, size // group, group, group, dim)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, size, size, dim)
    n = size // (group * interval)
    grid = groups.reshape(batch, n, n, interval, interval, group, group, dim)
    return grid.permute(0, 1, 5, 3, 2, 6, 4, 7).reshape(batch, size, size, dim)


class CrossFormerBlock(nn.Module):
    """One SDA or LDA block: LN -> group attention -> residual, LN -> MLP -> residual, then
    the ACL (depthwise 3x3 conv + LN, no residual) when ``amplitude_cooling``."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        *,
        group: int,
        interval: int,
        long_distance: bool,
        amplitude_cooling: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        if resolution <= group:  # a group as large as the map: plain self-attention
            long_distance, group = False, resolution
        self.resolution, self.group, self.interval = resolution, group, interval
        self.long_distance = long_distance
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupAttention(dim, group, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        if amplitude_cooling:
            self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.ex_ln = nn.LayerNorm(dim)
        self.register_buffer("attn_mask", self.padding_mask(), persistent=False)

    @property
    def padded_size(self) -> int:
        multiple = self.group * (self.interval if self.long_distance else 1)
        return self.resolution + padding_for(self.resolution, multiple)

    def padding_mask(self) -> torch.Tensor | None:
        """(nG, G^2, G^2): NEG_INF on the keys that are padding (bottom and right), else None."""
        size = self.padded_size
        if size == self.resolution:
            return None
        padded = torch.zeros(1, size, size, 1)
        padded[:, self.resolution :] = -1
        padded[:, :, self.resolution :] = -1
        keys = to_groups(padded, self.group, self.interval, self.long_distance)  # (nG, G^2, 1)
        mask = torch.zeros(keys.shape[0], keys.shape[1], keys.shape[1])
        return mask.masked_fill(keys.transpose(1, 2) < 0, NEG_INF)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, dim = tokens.shape
        pad = self.padded_size - self.resolution
        grid = tokens.view(batch, self.resolution, self.resolution, dim)
        grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        groups = to_groups(grid, self.group, self.interval, self.long_distance)
        groups = self.attn(groups, self.attn_mask)
        grid = from_groups(
            groups, batch, self.padded_size, self.group, self.interval, self.long_distance
        )
        return grid[:, : self.resolution, : self.resolution].reshape(batch, -1, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.drop_path(self.attention(self.norm1(tokens)))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        if hasattr(self, "ex_conv"):  # ACL
            batch, _, dim = tokens.shape
            grid = tokens.view(batch, self.resolution, self.resolution, dim).permute(0, 3, 1, 2)
            tokens = self.ex_ln(self.ex_conv(grid).flatten(2).transpose(1, 2))
        return tokens


class Stage(nn.Module):
    """``depth`` blocks alternating SDA and LDA, then the CEL down to the next stage."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        *,
        group: int,
        interval: int,
        drop_paths: Sequence[float],
        merge_size: Sequence[int] | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            CrossFormerBlock(
                dim,
                resolution,
                num_heads,
                group=group,
                interval=interval,
                long_distance=i % 2 == 1,
                amplitude_cooling=(i + 1) % 3 == 0 and i < depth - 1,
                drop_path=drop_paths[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, merge_size) if merge_size else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens if self.downsample is None else self.downsample(tokens)


# --------------------------------------------------------------------------- model


class CrossFormerPP(nn.Module):
    """CrossFormer++ classifier (``num_classes=0``: the pooled, layer-normalised features)."""

    def __init__(self, num_classes: int = 0, *, size: CrossFormerSize = CrossFormerSize()) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        n_stages = len(size.depths)
        stride = size.patch_size[0]
        multiple = stride * 2 ** (n_stages - 1)  # every stage's map even before merging
        if size.img_size_px % multiple:
            raise ValueError(f"img_size_px {size.img_size_px} is not a multiple of {multiple}")
        self.num_classes = num_classes
        self.img_size_px = size.img_size_px
        self.patch_embed = PatchEmbed(size.embed_dim, size.patch_size)
        drop_paths = torch.linspace(0, size.drop_path_rate, sum(size.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(size.depths):
            start = sum(size.depths[:i])
            self.layers.append(
                Stage(
                    size.embed_dim * 2**i,
                    size.img_size_px // stride // 2**i,
                    depth,
                    size.num_heads[i],
                    group=size.group_size[i],
                    interval=size.interval[i],
                    drop_paths=drop_paths[start : start + depth],
                    merge_size=size.merge_size if i < n_stages - 1 else None,
                )
            )
        self.num_features = size.embed_dim * 2 ** (n_stages - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.img_size_px, self.img_size_px):
            raise ValueError(
                f"CrossFormer++ expects {self.img_size_px} px images, got {tuple(images.shape)}"
            )
        tokens = self.patch_embed(images)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm(tokens).mean(dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _init_weights(module: nn.Module) -> None:
    """The authors' initialisation: truncated normal (std 0.02) linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def is_crossformer_encoder(encoder: str) -> bool:
    return encoder in CROSSFORMER_SIZES


def create_crossformer_encoder(encoder: str) -> CrossFormerPP:
    """The headless CrossFormer++ of ``encoder`` (a key of :data:`CROSSFORMER_SIZES`)."""
    if encoder not in CROSSFORMER_SIZES:
        raise ValueError(
            f"unknown CrossFormer++ encoder {encoder!r}; known: {sorted(CROSSFORMER_SIZES)}"
        )
    return CrossFormerPP(0, size=CROSSFORMER_SIZES[encoder])
