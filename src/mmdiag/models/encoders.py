"""Image encoders from timm, randomly initialised or loaded from a local checkpoint file.

No weights are downloaded: an encoder either trains from scratch (or through the pipeline's own
self-supervised stage) or loads a state dict the user points the config at.

A checkpoint that cannot be used raises :class:`CheckpointError` naming the file and the
problem: truncated (a copy cut short, a disk that filled up), not a checkpoint at all, tensors
missing, or tensors of another shape (a checkpoint of another architecture). The format is
told from the content, not the suffix, so a safetensors file named ``.pt`` (or the reverse)
still loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

# Prefixes that training frameworks put in front of backbone parameter names.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "base_encoder.")
#: At most this many tensor names are quoted in an error message.
_MAX_NAMED = 5
# First bytes of torch.save files: a zip archive (torch >= 1.6), or the legacy format's
# pickled magic number (protocol 2, a 10-byte long).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\x0a")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model; the message names the file."""


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
        load_encoder_checkpoint(encoder, checkpoint, name=name)
    return encoder


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or a torch file (``weights_only`` loading).

    Raises ``FileNotFoundError`` when the file is missing and :class:`CheckpointError` naming
    it when it is truncated, not a checkpoint, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_torch(path)


def _is_safetensors(path: Path) -> bool:
    """Safetensors by content (a header length that fits, then ``{``), else by suffix.

    A file that starts like a torch.save file is read with torch whatever its name.
    """
    with path.open("rb") as file:
        head = file.read(9)
    if head.startswith(_TORCH_MAGIC):
        return False
    header_fits = 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size
    return (len(head) == 9 and header_fits and head[8:] == b"{") or path.suffix == ".safetensors"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problem = _safetensors_layout_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read as safetensors ({type(error).__name__}: {error})"
        ) from error


def _safetensors_layout_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, in words; ``None`` when it looks whole.

    The format is an 8-byte header length, a JSON header giving each tensor's byte range,
    then the data; a file shorter than the header says was cut short.
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return f"truncated or not a safetensors file: {size} bytes, no header"
        header_bytes = int.from_bytes(head, "little")
        if 8 + header_bytes > size:
            return (
                f"truncated or not a safetensors file: the header announces {header_bytes} "
                f"bytes of metadata, the file has {size} bytes in all"
            )
        try:
            header = json.loads(file.read(header_bytes))
            data_end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            return f"not a safetensors file (its header is not safetensors JSON: {error})"
    expected = 8 + header_bytes + data_end
    if size < expected:
        return (
            f"truncated: {size} bytes, but its header describes {expected} bytes "
            f"({expected - size} missing; an interrupted copy or a full disk?)"
        )
    return None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        # from an open file: torch.load given a path ending .safetensors reads it as one
        with path.open("rb") as file:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"checkpoint {path}: cannot be read as a torch checkpoint, truncated or not a "
            f"checkpoint file ({type(error).__name__}: {first_line})"
        ) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no state dict")
    return state


def load_encoder_checkpoint(encoder: nn.Module, path: str | Path, *, name: str = "") -> None:
    """Load backbone weights from ``path`` into ``encoder``, ignoring classifier heads.

    Wrapper prefixes (``module.``, ``backbone.`` ...) are stripped and tensors the encoder
    lacks (a classifier head) are dropped. Every other tensor must be there with the
    encoder's shape (batch-norm counters aside): features from a half-loaded encoder would
    be silently meaningless. Raises :class:`CheckpointError` naming the file, and ``name``
    (the configured encoder) when given, on a shape mismatch, on missing tensors and when no
    tensor matches; see :func:`read_state_dict` for unreadable files.
    """
    state = {_strip_prefixes(key): value for key, value in read_state_dict(path).items()}
    own = encoder.state_dict()
    fits = f"encoder {name!r}" if name else "the encoder"
    matched = {key: value for key, value in state.items() if key in own}
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)}, encoder {tuple(own[k].shape)}"
        for k, v in matched.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong_shape:
        raise CheckpointError(
            f"encoder checkpoint {path}: shape mismatch with {fits} for "
            f"{_named(wrong_shape)} (is it the same architecture as the configured encoder?)"
        )
    if not matched:
        raise CheckpointError(
            f"encoder checkpoint {path}: no parameter name matches {fits} "
            f"(checkpoint tensors: {_named(sorted(state))})"
        )
    missing = sorted(k for k in set(own) - set(matched) if not k.endswith("num_batches_tracked"))
    if missing:
        raise CheckpointError(
            f"encoder checkpoint {path}: {len(missing)} of {len(own)} tensors of {fits} are "
            f"missing: {_named(missing)} (a partial checkpoint, or another architecture?)"
        )
    encoder.load_state_dict(matched, strict=False)
    log.info("loaded %d tensors from encoder checkpoint %s", len(matched), path)


def _named(names: list[str]) -> str:
    """The first few names, and how many more there are."""
    shown = "; ".join(names[:_MAX_NAMED])
    more = len(names) - _MAX_NAMED
    return f"{shown} and {more} more" if more > 0 else shown


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key
