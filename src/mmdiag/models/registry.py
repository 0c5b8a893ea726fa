"""Model registry: ``create_model(name, **kwargs)`` for every method and variant."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``constructor`` under its function name."""
    name = constructor.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = constructor
    return constructor


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; raises ``ValueError`` naming the known models."""
    try:
        constructor = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}") from None
    return constructor(**kwargs)


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)
