"""Model explanations: Grad-CAM maps and per-encoder embeddings (CMUS-Net's Figs. 8 and 4).

Grad-CAM: R. R. Selvaraju et al., "Grad-CAM: Visual explanations from deep networks via
gradient-based localization", ICCV 2017. For a target layer with activations ``A`` (channels c,
positions (i, j)) and the logit ``y`` of the explained class,

    w_c = mean_ij dy / dA_cij                  # eq. 1: channel weights, gradients pooled
    L   = ReLU(sum_c w_c A_c)                  # eq. 2: the class-discriminative map

and each map is divided by its maximum so that it lies in [0, 1] (an all-zero map stays zero).

A model here is called as ``model(batch)`` with a dict batch and returns logits (B, K); an
encoder may see more images than there are patients (the TEM bag), and every image that passes
through the target layer gets a map.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def last_feature_module(encoder: nn.Module) -> nn.Module:
    """The submodule whose output is ``encoder``'s last feature map (Grad-CAM's usual target).

    timm models list their feature stages in ``encoder.feature_info`` (dicts with a
    ``'module'`` name); the last one is returned. Raises ``ValueError`` naming the encoder
    class when it has no such list.
    """
    info = _feature_info(encoder)
    if info is None:
        raise ValueError(
            f"encoder {type(encoder).__name__} has no feature_info with module names; "
            f"pass the Grad-CAM target module explicitly"
        )
    return encoder.get_submodule(info[-1]["module"])


def _feature_info(module: nn.Module) -> list[dict] | None:
    info = getattr(module, "feature_info", None)
    if isinstance(info, Sequence) and info and isinstance(info[-1], Mapping):
        if "module" in info[-1]:
            return list(info)
    return None


def _feature_channels(model: nn.Module, target: nn.Module) -> int | None:
    """``num_chs`` of ``target`` when some timm submodule of ``model`` lists it as last stage."""
    for module in model.modules():
        info = _feature_info(module)
        if info is None or "num_chs" not in info[-1]:
            continue
        try:
            if module.get_submodule(info[-1]["module"]) is target:
                return int(info[-1]["num_chs"])
        except AttributeError:
            continue
    return None


def _is_channels_last(shape: torch.Size, channels: int | None) -> bool:
    """Whether a 4-d feature map is NHWC: by the known channel count, else by square maps."""
    if channels is not None:
        if shape[3] == channels and shape[1] != channels:
            return True
        if shape[1] == channels and shape[3] != channels:
            return False
    if shape[2] == shape[3] and shape[1] != shape[2]:
        return False
    if shape[1] == shape[2] and shape[3] != shape[1]:
        return True
    raise ValueError(
        f"cannot tell whether the target's output of shape {tuple(shape)} is NCHW or NHWC; "
        f"pass channels_last explicitly"
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _class_indices(class_index: int | Sequence[int], n_rows: int, n_classes: int) -> torch.Tensor:
    if isinstance(class_index, int | np.integer):
        indices = torch.full((n_rows,), int(class_index), dtype=torch.long)
    else:
        indices = torch.as_tensor(list(class_index), dtype=torch.long)
        if indices.shape != (n_rows,):
            raise ValueError(
                f"class_index must be an int or one index per batch row ({n_rows}), "
                f"got {len(indices)} values"
            )
    bad = indices[(indices < 0) | (indices >= n_classes)]
    if bad.numel():
        raise ValueError(f"class_index must lie in 0..{n_classes - 1}, got {bad.tolist()}")
    return indices


def grad_cam(
    model: nn.Module,
    batch: dict,
    target_module: nn.Module,
    *,
    class_index: int | Sequence[int],
    sample_index: int | None = None,
    channels_last: bool | None = None,
) -> np.ndarray:
    """Grad-CAM maps of ``target_module`` for the logit of ``class_index``.

    Parameters
    ----------
    model
        Called as ``model(batch)``, returning logits (B, K).
    batch
        The model's input.
    target_module
        A submodule of ``model`` with a 4-d output; see :func:`last_feature_module`.
    class_index
        The explained class: one for every batch row, or one index per row.
    sample_index
        Explain only this row's logit; maps of images of other rows are then zero.
    channels_last
        Whether the target's output is NHWC (timm Swin stages) rather than NCHW. ``None``
        decides from the ``num_chs`` of a timm ``feature_info`` entry naming the target, else
        from the shape (square maps).

    Returns
    -------
    numpy.ndarray
        (N, h, w) maps in [0, 1], one per image that passed through ``target_module`` (several
        calls of the target in one forward pass are concatenated in call order).

    Notes
    -----
    With ``A`` the target's activations and ``y = sum_b logits[b, class_index[b]]`` (or only
    row ``sample_index``), ``w_nc = mean_ij dy/dA_ncij`` and ``cam_n = ReLU(sum_c w_nc A_nc)``,
    divided by its maximum when positive. Rows do not interact in eval mode, so each image's
    map reflects only its own patient's logit.

    The model runs in eval mode and each submodule's training flag is restored afterwards.
    The gradient is taken only with respect to the activations (``torch.autograd.grad`` on a
    detached copy that the hook puts in the graph), so no parameter ``.grad`` is created or
    changed, and frozen models work. The hook is removed even when the forward pass fails.

    References
    ----------
    R. R. Selvaraju et al., "Grad-CAM: Visual explanations from deep networks via
    gradient-based localization", ICCV 2017.
    """
    if not any(module is target_module for module in model.modules()):
        raise ValueError(
            f"target_module {type(target_module).__name__} is not a submodule of "
            f"{type(model).__name__}"
        )
    activations: list[torch.Tensor] = []

    def keep_activation(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(f"target_module must output a 4-d tensor, got {shape}")
        leaf = output.detach().requires_grad_(True)
        activations.append(leaf)
        return leaf.clone()  # a non-leaf, so that in-place layers after the target still work

    handle = target_module.register_forward_hook(keep_activation)
    try:
        with _eval_mode(model), torch.enable_grad():
            logits = model(batch)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                raise ValueError("model(batch) must return logits of shape (B, K)")
            if not activations:
                raise ValueError("target_module did not run in model(batch)")
            n_rows, n_classes = logits.shape
            indices = _class_indices(class_index, n_rows, n_classes)
            chosen = logits.gather(1, indices[:, None]).squeeze(1)
            if sample_index is not None:
                if not 0 <= sample_index < n_rows:
                    raise ValueError(
                        f"sample_index must lie in 0..{n_rows - 1}, got {sample_index}"
                    )
                chosen = chosen[sample_index : sample_index + 1]
            if chosen.requires_grad:
                gradients = torch.autograd.grad(chosen.sum(), activations, allow_unused=True)
            else:  # the logits do not depend on the target's output
                gradients = (None,) * len(activations)
    finally:
        handle.remove()

    cams = []
    for activation, gradient in zip(activations, gradients, strict=True):
        if gradient is None:  # this call of the target does not reach the explained logits
            gradient = torch.zeros_like(activation)
        nhwc = channels_last
        if nhwc is None:
            nhwc = _is_channels_last(activation.shape, _feature_channels(model, target_module))
        a, g = activation.detach(), gradient.detach()
        if nhwc:
            a, g = a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
        weights = g.mean(dim=(2, 3), keepdim=True)  # eq. 1
        cams.append(torch.relu((weights * a).sum(dim=1)))  # eq. 2
    if len({tuple(c.shape[1:]) for c in cams}) > 1:
        raise ValueError(
            f"target_module ran {len(cams)} times with different map sizes "
            f"{[tuple(c.shape[1:]) for c in cams]}; explain one call at a time"
        )
    cam = torch.cat(cams).double()
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), cam)
    return cam.numpy()
