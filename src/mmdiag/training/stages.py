"""Multi-stage training: a module trained in an earlier stage, loaded and frozen for the next.

A later stage (e.g. a student distilled from a teacher, or a head on a pretrained encoder)
holds the earlier stage's module as a submodule. :func:`load_stage` reads its weights from
the earlier stage's safetensors checkpoint (``model.safetensors`` of a fold folder, written by
:func:`~mmdiag.training.fold_outputs.write_fold_folder`) and :func:`freeze` fixes it: its
parameters take no gradient (the training loop optimises only parameters that require one)
and it stays in evaluation mode when the enclosing model is put in training mode, so its batch
normalisation statistics do not move and its dropout is off.
"""

from __future__ import annotations

from pathlib import Path
from types import MethodType

from torch import nn

_FROZEN = "_frozen_stage"


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a frozen module: evaluation mode whatever ``mode`` asks."""
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: no gradients, evaluation mode for good; return it."""
    module.requires_grad_(False)
    module.train = MethodType(_stay_in_eval, module)
    setattr(module, _FROZEN, True)
    module.eval()
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze` fixed ``module`` itself."""
    return bool(getattr(module, _FROZEN, False))


def frozen_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the frozen modules of ``model`` (``""`` for ``model`` itself)."""
    return [name for name, module in model.named_modules() if is_frozen(module)]


def load_stage(module: nn.Module, checkpoint_path: str | Path, *, prefix: str = "") -> nn.Module:
    """Load an earlier stage's safetensors checkpoint into ``module`` and freeze it.

    Every tensor of ``module`` must be in the checkpoint and vice versa (strict loading), so a
    mismatched architecture fails here rather than training on random weights. ``prefix``
    selects the tensors of one submodule of the checkpointed model (e.g. ``"encoder."``).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"stage checkpoint {path} does not exist")
    if prefix:
        from safetensors.torch import load_file

        state = {
            k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)
        }
        if not state:
            raise ValueError(f"stage checkpoint {path} holds no tensor under {prefix!r}")
        module.load_state_dict(state, strict=True)
    else:
        from safetensors.torch import load_model

        load_model(module, str(path), strict=True)
    return freeze(module)
