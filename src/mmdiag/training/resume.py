"""A trainer's resume state: what an epoch loop needs to continue after a kill as if never cut.

After every completed epoch a trainer calls :meth:`EpochState.save`; a rerun of the same run
calls :meth:`EpochState.restore` before its first epoch and continues after the saved one. On
the CPU the rerun ends with the weights, log and predictions of an uninterrupted run, bit for
bit, because everything that the remaining epochs read is saved:

- the model's weights and buffers, the optimiser's state (moments, step counts, the learning
  rate of each parameter group) and the learning-rate scheduler's state;
- every random stream: the given ``torch.Generator`` objects (batch order, dropout masks),
  numpy generators (e.g. bag drawing), and torch's global generator (CPU, and the CUDA one of
  the model's GPU, which keeps GPU runs close but not bit-identical);
- the epoch log so far and the trainer's own extra values and tensors (e.g. model selection's
  best epoch and its weights).

Not saved: Python's and numpy's global generators (the trainers draw from their own), and
whatever state a trainer's hooks keep. Data-parallel processes all load the state that the
first one wrote, so each takes the first one's global torch generator; the trainers' own
draws come from shared generators and do not depend on it.

Layout of the state folder: ``tensors_<epoch>.safetensors`` holds every tensor, ``state.json``
everything else, with the name of its tensors file. The tensors are written first under a new
name, then ``state.json`` is renamed into place, then older files are removed, so at any
moment ``state.json`` names a complete tensors file and a kill leaves the state of the last
or the previous epoch. Optimiser and scheduler state is stored as safetensors plus JSON (no
pickle), so loading executes no code from the file.

Each state carries a *fingerprint* of the run (:func:`fingerprint`: settings, data, initial
weights): a state of other settings is ignored with a warning and the run starts afresh (its
first save replaces the old state). A state that cannot be read is an error
(:class:`ResumeStateError`) naming the file: writes are atomic, so such a state is not the
mark of a kill, and discarding it silently could throw away days of training; deleting the
folder starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmdiag.io import sha256_path
from mmdiag.io.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

#: Version of the folder's layout; a state of another version is not resumed.
STATE_FORMAT = 1
STATE_INFO = "state.json"
#: Tensor groups the state itself uses; a trainer's extra groups take other names.
RESERVED_GROUPS = ("model", "optimiser", "generator", "torch_rng")
#: Method settings that never change how a fold trains (the job's resources, reports and
#: figures): a rerun that changes them, e.g. a longer runtime after a time-out, still resumes.
NOT_TRAINING_KEYS = frozenset(
    {"resources", "stats", "tables", "headline", "reference", "attention", "loss_weight_grid"}
)


class ResumeStateError(RuntimeError):
    """A saved state exists but cannot be read or does not fit the run."""


def state_dir_beside(out_dir: Path) -> Path:
    """The hidden state folder of an output folder: ``<parent>/.<name>.resume``.

    It lives beside the outputs, not inside, so that neither the atomic replacement of the
    output folder nor a workflow manager's removal of incomplete outputs deletes it.
    """
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.resume"


def fingerprint(parts: Mapping[str, Any]) -> str:
    """SHA-256 of ``parts`` as sorted JSON (values JSON cannot hold are written as text)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def training_settings(method_settings: Mapping, variant: str) -> dict:
    """A method's settings as far as they can change the training of ``variant``: without
    :data:`NOT_TRAINING_KEYS` and with only that variant's entry (for a fingerprint)."""
    kept = {k: v for k, v in method_settings.items() if k not in NOT_TRAINING_KEYS}
    return kept | {"variants": {variant: method_settings["variants"][variant]}}


def fold_resume_key(
    method: str, variant: str, fold: int, method_settings: Mapping, inputs: Mapping[str, Path]
) -> dict:
    """What a fold trainer's saved state must match to be resumed: the fold, the settings that
    change the variant's training and the checksums of its input files (the split file, a
    teacher's checkpoint ...)."""
    return {
        "method": method,
        "variant": variant,
        "fold": fold,
        "method_settings": training_settings(method_settings, variant),
        "inputs": {name: sha256_path(path) for name, path in inputs.items()},
    }


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state: every entry's name, dtype, shape and bytes.

    Part of a run's fingerprint: a changed architecture, initialisation or pretrained
    checkpoint gives another digest.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def clear_state(state_dir: Path | None) -> None:
    """Remove a state folder (once the run's outputs are written)."""
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)


@dataclass
class TrainerParts:
    """The live objects of a training run whose state a resume brings back."""

    model: nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: Any = None  # a torch learning-rate scheduler, or None
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)
    numpy_rngs: Mapping[str, np.random.Generator] = field(default_factory=dict)


@dataclass(frozen=True)
class Resumed:
    """What a restored state gives back to its trainer besides the restored parts."""

    history: list[dict]
    extra: dict
    extra_tensors: dict[str, dict[str, torch.Tensor]]

    @property
    def epochs_done(self) -> int:
        return len(self.history)


class SelectionState(Protocol):
    """A trainer's model selection as the resume state keeps it."""

    def load(
        self, values: Mapping[str, Any], best_state: Mapping[str, torch.Tensor] | None
    ) -> None: ...


class EpochState:
    """Save and restore a trainer's state in ``state_dir`` (``None``: do neither).

    ``writes`` is false on every data-parallel process but the first: all processes restore
    the same state, only one writes it. ``description`` names the run in the log.
    """

    def __init__(
        self,
        state_dir: Path | None,
        run_fingerprint: str,
        parts: TrainerParts,
        *,
        description: str = "training",
        writes: bool = True,
    ) -> None:
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.fingerprint = run_fingerprint
        self.parts = parts
        self.description = description
        self.writes = writes

    def restore_history(self, selection: SelectionState) -> list[dict]:
        """Restore the saved epochs into the parts and ``selection``; their log, or [].

        ``selection`` is the trainer's model selection: it gets the ``extra`` values and the
        ``best`` tensors it saved (:meth:`save`).
        """
        resumed = self.restore()
        if resumed is None:
            return []
        selection.load(resumed.extra, resumed.extra_tensors.get("best"))
        return resumed.history

    def save(
        self,
        history: Sequence[Mapping],
        *,
        extra: Mapping[str, Any] | None = None,
        extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Save the state after epoch ``len(history)``.

        Side effects: writes ``tensors_<epoch>.safetensors`` and ``state.json`` in the state
        folder, each atomically, then removes every other file there.
        """
        if self.state_dir is None or not self.writes:
            return
        tensors, values = _capture(self.parts)
        for group, group_tensors in (extra_tensors or {}).items():
            if group in RESERVED_GROUPS or "/" in group:
                raise ValueError(f"extra tensor group {group!r} is reserved or holds a '/'")
            tensors |= {f"{group}/{k}": v for k, v in group_tensors.items()}
        epochs_done = len(history)
        tensors_name = f"tensors_{epochs_done:05d}.safetensors"
        with atomic_path(self.state_dir / tensors_name) as tmp:
            save_file(_plain_tensors(tensors), str(tmp))
        info = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "epochs_done": epochs_done,
            "tensors": tensors_name,
            "history": [dict(row) for row in history],
            "extra": dict(extra or {}),
            **values,
        }
        write_json(info, self.state_dir / STATE_INFO)
        _remove_all_but(self.state_dir, {STATE_INFO, tensors_name})

    def restore(self) -> Resumed | None:
        """Load the saved state of this run into the parts; ``None`` when there is none.

        A state of another fingerprint or format is ignored with a warning (a fresh start);
        an unreadable one raises :class:`ResumeStateError` naming the file.
        """
        info = self._read_info()
        if info is None:
            return None
        tensors_path = self.state_dir / str(info.get("tensors"))
        try:
            grouped = _grouped(load_file(str(tensors_path)))
            _restore(self.parts, grouped, info)
            resumed = Resumed(
                history=[dict(row) for row in info["history"]],
                extra=dict(info["extra"]),
                extra_tensors={k: v for k, v in grouped.items() if k not in RESERVED_GROUPS},
            )
        except (OSError, SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ResumeStateError(
                f"{tensors_path}: cannot restore the saved training state ({error}); "
                f"delete {self.state_dir} to start afresh"
            ) from error
        if self.writes:
            log.info(
                "%s: resuming from %s after epoch %d",
                self.description,
                self.state_dir,
                resumed.epochs_done,
            )
        return resumed

    def _read_info(self) -> dict | None:
        """The state's JSON when it is this run's (``None``: none, or another run's)."""
        if self.state_dir is None:
            return None
        path = self.state_dir / STATE_INFO
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ResumeStateError(
                f"{path}: the saved training state is unreadable ({error}); "
                f"delete {self.state_dir} to start afresh"
            ) from error
        if not isinstance(info, dict):
            raise ResumeStateError(f"{path}: not a training state; delete {self.state_dir}")
        if info.get("format") != STATE_FORMAT or info.get("fingerprint") != self.fingerprint:
            log.warning(
                "%s: the state in %s is of other settings, data or format; starting afresh",
                self.description,
                self.state_dir,
            )
            return None
        return info


def _capture(parts: TrainerParts) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The parts' state as named tensors and JSON values."""
    tensors = {f"model/{k}": v for k, v in parts.model.state_dict().items()}
    optimiser_tensors, optimiser_values = _optimiser_state(parts.optimiser)
    tensors |= optimiser_tensors
    tensors |= {f"generator/{k}": g.get_state() for k, g in parts.generators.items()}
    tensors |= {f"torch_rng/{k}": v for k, v in _torch_rng_states(parts.model).items()}
    values = {
        "optimiser": optimiser_values,
        "scheduler": None if parts.scheduler is None else parts.scheduler.state_dict(),
        "numpy_rngs": {k: rng.bit_generator.state for k, rng in parts.numpy_rngs.items()},
    }
    return tensors, values


def _restore(parts: TrainerParts, grouped: dict[str, dict], info: Mapping) -> None:
    """Load a saved state into the parts (the optimiser before its scheduler)."""
    parts.model.load_state_dict(grouped.get("model", {}))
    _load_optimiser_state(parts.optimiser, grouped.get("optimiser", {}), info["optimiser"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(info["scheduler"])
    saved_generators = grouped.get("generator", {})
    for name, generator in parts.generators.items():
        generator.set_state(saved_generators[name])
    for name, rng in parts.numpy_rngs.items():
        rng.bit_generator.state = info["numpy_rngs"][name]
    _set_torch_rng_states(parts.model, grouped.get("torch_rng", {}))


def _optimiser_state(optimiser: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimiser's state dict split into tensors (``optimiser/<index>/<key>``) and JSON."""
    state = optimiser.state_dict()
    tensors, others = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimiser/{index}/{key}"] = value
            else:
                others.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "values": others}


def _load_optimiser_state(optimiser, tensors: Mapping[str, torch.Tensor], values: Mapping):
    """Rebuild the state dict of :func:`_optimiser_state` and load it."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in values["values"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = []
    for live, saved in zip(optimiser.param_groups, values["param_groups"], strict=True):
        # JSON turns tuples (Adam's betas) into lists; give back the live group's types
        groups.append(
            {k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()}
        )
    optimiser.load_state_dict({"state": state, "param_groups": groups})


def _torch_rng_states(model: nn.Module) -> dict[str, torch.Tensor]:
    """torch's global CPU generator, and the CUDA one of the model's GPU."""
    states = {"cpu": torch.get_rng_state()}
    device = _model_device(model)
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_torch_rng_states(model: nn.Module, states: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    device = _model_device(model)
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors for safetensors; tensors that share memory are copied."""
    plain, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    return plain


def _grouped(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``group/name`` keys as ``{group: {name: tensor}}``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        group, name = key.split("/", 1)
        grouped.setdefault(group, {})[name] = tensor
    return grouped


def _remove_all_but(folder: Path, keep: set[str]) -> None:
    """Older tensors files and the temporary folders of writes a kill cut short."""
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
