"""3D CNN backbones from MONAI for volumes (CT, MRI), without their classifiers.

:func:`create_backbone3d` builds MONAI's ResNet-18, ResNet-34 or DenseNet-121 with
``spatial_dims=3`` and wraps it in :class:`Backbone3d`, which returns pooled features and, for
methods that fuse or distil between stages, every stage's output. Weights are random or come
from a local checkpoint file (MONAI or MedicalNet layout); nothing is downloaded.

ResNet layout, as in MedicalNet (Chen et al. 2019, "Med3D") and MONAI's ``ResNetFeatures``:

- stem: 7x7x7 convolution with stride 2 and padding 3 along all three axes (MONAI
  ``conv1_t_size=7``, ``conv1_t_stride=2``), batch norm, ReLU. MONAI's default stride is 1,
  and Hara et al.'s video ResNets keep stride 1 along time only; a volume has no time axis, so
  every axis is halved, as in MedicalNet.
- stages: max pooling and ``layer1``, then ``layer2`` to ``layer4``, each halving the
  resolution with a stride-2 convolution. MedicalNet's segmentation networks trade the strides
  of ``layer3`` and ``layer4`` for dilation; a classifier keeps the plain strides.
- shortcut type B: where a block changes width or resolution, its shortcut is a 1x1x1
  convolution and batch norm; the convolution has no bias (``bias_downsample=False``), as in
  MedicalNet (MONAI keeps a bias by default for backward compatibility). MedicalNet's released
  ResNet-18/34 weights were trained with the parameter-free shortcut A: load them with
  ``shortcut_type="A"``.

The wrapper keeps MONAI's module names (``conv1``, ``layer1`` ... or ``features.*``), so a
MONAI or MedicalNet state dict loads once wrapper prefixes and classifier tensors are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from mmdiag.models.encoders import _strip_prefixes, read_state_dict

log = logging.getLogger(__name__)

#: Names :func:`create_backbone3d` accepts.
BACKBONES3D = ("densenet121", "resnet18", "resnet34")

# Classifier heads: MONAI ResNet, MONAI DenseNet, MedicalNet's segmentation head.
_HEAD_PREFIXES = ("fc.", "class_layers.", "conv_seg.")

# Module paths run by each stage; stage 0 is the stem.
_RESNET_STAGES = (
    ("conv1", "bn1", "act"),
    ("maxpool", "layer1"),
    ("layer2",),
    ("layer3",),
    ("layer4",),
)
_DENSENET_STAGES = (
    ("features.conv0", "features.norm0", "features.relu0"),
    ("features.pool0", "features.denseblock1"),
    ("features.transition1", "features.denseblock2"),
    ("features.transition2", "features.denseblock3"),
    ("features.transition3", "features.denseblock4", "features.norm5"),
)


class Backbone3d(nn.Module):
    """A MONAI 3D CNN without its classifier, run as a sequence of stages.

    Stage 0 is the stem; every later stage halves the resolution, so for an input of size
    ``s`` stage ``i`` outputs about ``s / 2 ** (i + 1)`` voxels per axis with
    ``stage_channels[i]`` channels. ``forward`` pools the last stage to
    ``(n, num_features)``.

    A method that inserts a block between stages runs them itself::

        x = backbone.stem(volume)
        for index in range(1, backbone.num_stages):
            x = fuse[index](backbone.stage(index, x))
        features = backbone.pool(x)

    Stages are looked up by module path at every call, not held as references, so modules
    replaced in place (``nn.SyncBatchNorm.convert_sync_batchnorm``, freezing wrappers) are the
    ones that run.

    Parameters
    ----------
    arch
        Architecture name, for messages.
    body
        Top-level modules under their MONAI names; they make up the state dict.
    stage_layout
        For each stage, the module paths (into ``body``) it runs in order.
    pool
        Parameter-free head from the last stage's map to a ``(n, channels)`` tensor.
    stage_channels
        Output channels of each stage.
    """

    def __init__(
        self,
        arch: str,
        body: Mapping[str, nn.Module],
        stage_layout: Sequence[Sequence[str]],
        pool: nn.Module,
        stage_channels: Sequence[int],
    ) -> None:
        super().__init__()
        if len(stage_layout) != len(stage_channels):
            raise ValueError(
                f"{arch}: {len(stage_layout)} stages but {len(stage_channels)} channel counts"
            )
        self.arch = arch
        for name, module in body.items():
            self.add_module(name, module)
        self.pool = pool
        self.stage_layout = tuple(tuple(paths) for paths in stage_layout)
        self.stage_channels = tuple(int(c) for c in stage_channels)
        self.num_features = self.stage_channels[-1]
        for index in range(self.num_stages):
            self.stage_modules(index)  # an unknown path fails here, not at the first forward

    @property
    def num_stages(self) -> int:
        """Number of stages, the stem included."""
        return len(self.stage_layout)

    def stage_modules(self, index: int) -> list[nn.Module]:
        """The modules stage ``index`` runs, in order (to freeze or inspect a stage)."""
        return [self.get_submodule(path) for path in self.stage_layout[index]]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Run stage 0 on an input volume ``(n, in_channels, d, h, w)``."""
        return self.stage(0, x)

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage ``index`` on the output of stage ``index - 1`` (or the input for 0)."""
        for module in self.stage_modules(index):
            x = module(x)
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, stem first: ``num_stages`` maps ``(n, c_i, d_i, h_i, w_i)``."""
        outputs = []
        for index in range(self.num_stages):
            x = self.stage(index, x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(n, num_features)`` of an input volume."""
        return self.pool(self.forward_stages(x)[-1])

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, stage_channels={self.stage_channels}"


def create_backbone3d(
    name: str,
    *,
    in_channels: int = 1,
    checkpoint: str | Path | None = None,
    shortcut_type: str | None = None,
) -> Backbone3d:
    """Build the 3D backbone ``name`` (see :data:`BACKBONES3D`), randomly initialised.

    Parameters
    ----------
    name
        ``"resnet18"``, ``"resnet34"`` or ``"densenet121"``.
    in_channels
        Channels of the input volume (1 for CT or a single MRI sequence).
    checkpoint
        Local state dict file to load (see :func:`load_backbone3d_checkpoint`).
    shortcut_type
        ResNets only: ``"B"`` (default, 1x1x1 convolution) or ``"A"`` (zero padding, to load
        MedicalNet's ResNet-18/34 weights; MONAI's shortcut A passes no gradient through the
        shortcut itself). ``None`` for DenseNet.

    Raises
    ------
    ValueError
        For an unknown name (listing the valid ones) or a shortcut type that does not apply.
    """
    if name not in BACKBONES3D:
        raise ValueError(f"unknown 3D backbone {name!r}; valid names: {', '.join(BACKBONES3D)}")
    if name.startswith("densenet"):
        if shortcut_type is not None:
            raise ValueError(f"shortcut_type applies to the ResNets only, not to {name}")
        backbone = _densenet121(in_channels)
    else:
        backbone = _resnet(name, in_channels, shortcut_type or "B")
    if checkpoint is not None:
        load_backbone3d_checkpoint(backbone, checkpoint)
    return backbone


def _resnet(name: str, in_channels: int, shortcut_type: str) -> Backbone3d:
    # MONAI is imported when a backbone is built: ``mmdiag.models`` imports every model module
    from monai.networks import nets

    if shortcut_type not in ("A", "B"):
        raise ValueError(f"shortcut_type must be 'A' or 'B', not {shortcut_type!r}")
    net = getattr(nets, name)(
        spatial_dims=3,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type=shortcut_type,
        bias_downsample=False,
        feed_forward=False,
    )
    names = ("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4")
    layers = [getattr(net, f"layer{i}") for i in range(1, 5)]
    channels = (net.conv1.out_channels, *(layer[-1].bn2.num_features for layer in layers))
    pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
    return Backbone3d(name, {n: getattr(net, n) for n in names}, _RESNET_STAGES, pool, channels)


def _densenet121(in_channels: int) -> Backbone3d:
    from monai.networks.nets import DenseNet121

    features = DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=1).features
    # each dense block's width, read where the next transition (or the final norm) takes it
    ends = [features.norm0, *(getattr(features, f"transition{i}").norm for i in range(1, 4))]
    channels = tuple(norm.num_features for norm in [*ends, features.norm5])
    # MONAI's classifier applies ReLU to the final norm before pooling; not in place, so the
    # returned last-stage map stays as it was
    pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
    return Backbone3d("densenet121", {"features": features}, _DENSENET_STAGES, pool, channels)


def load_backbone3d_checkpoint(backbone: Backbone3d, path: str | Path) -> None:
    """Load every backbone tensor of ``backbone`` from the local file ``path``.

    Reads ``.safetensors`` or torch files (a bare state dict or one under ``state_dict`` /
    ``model``, as MedicalNet writes), strips wrapper prefixes (``module.`` ...) and drops
    classifier tensors (``fc.``, ``class_layers.``, ``conv_seg.``). Loading is strict over the
    backbone: a missing tensor (batch-norm counters aside), an unexpected one or a shape
    mismatch raises ``ValueError`` naming the file and the keys, so a checkpoint of another
    architecture, shortcut type or input width never loads halfway.
    """
    state, dropped = _backbone_state(read_state_dict(path))
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"3D backbone checkpoint {path} does not fit {backbone.arch}: "
            f"missing keys {_preview(missing)}, unexpected keys {_preview(unexpected)} "
            f"(same architecture, shortcut type and input channels?)"
        )
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)}, backbone {tuple(own[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong_shape:
        raise ValueError(
            f"3D backbone checkpoint {path}: shape mismatch for {_preview(wrong_shape)}"
        )
    backbone.load_state_dict(state, strict=False)  # keys checked above
    log.info(
        "loaded %d tensors into 3D backbone %s from %s (dropped %d classifier tensors)",
        len(state),
        backbone.arch,
        path,
        len(dropped),
    )


def _backbone_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a checkpoint into backbone tensors (prefixes stripped) and classifier keys."""
    stripped = {_strip_prefixes(key): value for key, value in state.items()}
    head = [key for key in stripped if key.startswith(_HEAD_PREFIXES)]
    backbone = {k: v for k, v in stripped.items() if not k.startswith(_HEAD_PREFIXES)}
    return backbone, head


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    """Up to ``limit`` keys, with the total when there are more."""
    if len(keys) <= limit:
        return str(list(keys))
    return f"{list(keys[:limit])} and {len(keys) - limit} more"
