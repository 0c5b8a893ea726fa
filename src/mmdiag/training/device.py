"""The torch device a process computes on, from the ``device`` setting of the config.

Trainers (through :func:`mmdiag.training.distributed.init_distributed`) and feature extraction
share :func:`resolve_device`, so ``auto``, ``cpu`` and ``cuda`` mean the same everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_NAMES", "resolve_device"]

#: The values of the ``device`` setting (the config schema's enum).
DEVICE_NAMES = ("auto", "cpu", "cuda")


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """Return the device that the setting ``name`` selects for this process.

    Parameters
    ----------
    name
        ``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda"``.
    local_rank
        This process's index among the processes of its machine (torchrun's ``LOCAL_RANK``);
        on CUDA it is the GPU used, so that each process of a node has its own.

    Returns
    -------
    torch.device
        ``cpu``, or ``cuda:<local_rank>``.

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`DEVICE_NAMES` (a typo such as ``"gpu"`` must not
        silently fall back to the CPU).
    RuntimeError
        If CUDA is requested but not available, or fewer than ``local_rank + 1`` GPUs are
        visible.
    """
    if not isinstance(name, str) or name not in DEVICE_NAMES:
        allowed = ", ".join(repr(n) for n in DEVICE_NAMES)
        raise ValueError(f"device must be one of {allowed}, got {name!r}")
    use_cuda = torch.cuda.is_available() if name == "auto" else name == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    n_gpus = torch.cuda.device_count()
    if local_rank >= n_gpus:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {n_gpus} GPU(s) visible")
    return torch.device("cuda", local_rank)
