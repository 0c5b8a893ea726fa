"""Image encoders from timm, randomly initialised or loaded from a local checkpoint file.

No weights are downloaded: an encoder either trains from scratch (or through the pipeline's own
self-supervised stage) or loads a state dict the user points the config at.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

# Prefixes that training frameworks put in front of backbone parameter names.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "base_encoder.")


def create_encoder(name: str, *, checkpoint: str | Path | None = None) -> nn.Module:
    """Return timm model ``name`` without its classifier (``num_classes=0``: pooled features).

    ``encoder.num_features`` is the feature width. With ``checkpoint`` the weights come from
    that local file (see :func:`load_encoder_checkpoint`).
    """
    try:
        encoder = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as error:  # timm raises RuntimeError for unknown names
        raise ValueError(f"unknown timm encoder {name!r}: {error}") from None
    if checkpoint is not None:
        load_encoder_checkpoint(encoder, checkpoint)
    return encoder


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only`` loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"encoder checkpoint {path} holds no state dict")
    return state


def load_encoder_checkpoint(encoder: nn.Module, path: str | Path) -> None:
    """Load backbone weights from ``path`` into ``encoder``, ignoring classifier heads.

    Wrapper prefixes (``module.``, ``backbone.`` ...) are stripped. Raises ``ValueError``
    naming the file when a tensor's shape disagrees or when no backbone weight matches.
    """
    state = {_strip_prefixes(key): value for key, value in read_state_dict(path).items()}
    own = encoder.state_dict()
    matched = {key: value for key, value in state.items() if key in own}
    wrong_shape = [k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong_shape:
        raise ValueError(
            f"encoder checkpoint {path}: shape mismatch for {wrong_shape[:5]} "
            f"(is it the same architecture as the configured encoder?)"
        )
    if not matched:
        raise ValueError(f"encoder checkpoint {path}: no parameter name matches the encoder")
    missing = sorted(set(own) - set(matched))
    encoder.load_state_dict(matched, strict=False)
    if missing:
        log.warning("encoder checkpoint %s left %d tensors at random init", path, len(missing))
    log.info("loaded %d tensors from encoder checkpoint %s", len(matched), path)


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key
