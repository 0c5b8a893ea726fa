"""Model registry: ``create_model(name, **kwargs)`` for every method and variant.

Each registered constructor names its method ``family`` and a tiny ``example``: keyword
arguments for a small model and a batch it takes. One parametrised test builds every
registered model from its example and runs forward and backward, so a new model is tested the
moment it is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

#: ``example()`` -> (constructor keyword arguments, batch) of a tiny instance.
Example = Callable[[], tuple[dict, Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class RegisteredModel:
    """A constructor, the method family it belongs to and its tiny example."""

    name: str
    family: str
    constructor: Callable[..., nn.Module]
    example: Example


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(*, family: str, example: Example) -> Callable:
    """Decorator: register a constructor under its function name, with its family and example."""

    def register(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = constructor.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = RegisteredModel(name, family, constructor, example)
        return constructor

    return register


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; raises ``ValueError`` naming the known models."""
    return registered_model(name).constructor(**kwargs)


def registered_model(name: str) -> RegisteredModel:
    """The registry entry of ``name``; ``ValueError`` naming the known models."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}") from None


def list_models(family: str | None = None) -> list[str]:
    """Names of every registered model (of ``family`` when given), sorted."""
    return sorted(n for n, entry in _REGISTRY.items() if family in (None, entry.family))
