"""Models: a small registry of the methods' networks, built from timm encoders (2D) and MONAI
backbones (3D).

Every module here except the registry and the shared encoders and backbones is a method's
model file; each is imported once so that its constructors register themselves.
"""

import importlib
import pkgutil

from mmdiag.models.registry import create_model, list_models, register_model, registered_model

_SHARED_MODULES = {"registry", "encoders", "backbones3d"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["create_model", "list_models", "register_model", "registered_model"]
