"""Models: a small registry of the methods' networks, built from timm encoders."""

from mmdiag.models.registry import create_model, list_models, register_model

# Importing the model modules registers their constructors.
from mmdiag.models import cmus as _cmus  # noqa: E402, F401  isort: skip
from mmdiag.models import csmil as _csmil  # noqa: E402, F401  isort: skip

__all__ = ["create_model", "list_models", "register_model"]
