"""A small, explicit supervised training loop shared by the per-fold trainers.

Adam with cosine annealing of the learning rate per epoch (CMUS-Net, Section 4.2); the model of
the last epoch is the one evaluated, as in the paper (it has no validation set). When the split
has a validation part its loss and accuracy are logged each epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

log = logging.getLogger(__name__)

Collate = Callable[[Sequence, torch.Generator | None], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (``methods.<name>.train`` in the config)."""

    epochs: int
    batch_size: int
    lr: float
    lr_min: float
    weight_decay: float
    seed: int = 0
    device: str = "auto"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def batch_indices(
    n_items: int, batch_size: int, order: torch.Tensor | None = None
) -> list[list[int]]:
    """Consecutive batches of ``order``; a last batch of a single item joins the one before.

    Batch normalisation cannot train on one sample (a last batch of 1 patient, e.g. 13
    patients in batches of 4), and dropping it would lose a patient every epoch.
    """
    order = (torch.arange(n_items) if order is None else order).tolist()
    batches = [order[start : start + batch_size] for start in range(0, n_items, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] += last
    return batches


@torch.no_grad()
def predict_proba(
    model: nn.Module, samples: Sequence, collate: Collate, *, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Softmax class probabilities of ``samples`` (n, K) and their mean cross-entropy loss."""
    model.eval()
    probs, loss_sum = [], 0.0
    for indices in batch_indices(len(samples), batch_size):
        batch = _to_device(collate([samples[i] for i in indices], None), device)
        logits = model(batch).float()
        loss_sum += nn.functional.cross_entropy(logits, batch["label"], reduction="sum").item()
        probs.append(logits.softmax(dim=1).cpu())
    return torch.cat(probs), loss_sum / max(len(samples), 1)


def train_model(
    model: nn.Module,
    train_samples: Sequence,
    collate: Collate,
    settings: TrainSettings,
    *,
    val_samples: Sequence = (),
    description: str = "training",
) -> list[dict[str, float]]:
    """Train ``model`` in place with cross-entropy; return one log row per epoch."""
    if not train_samples:
        raise ValueError("no training samples")
    device = resolve_device(settings.device)
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=settings.epochs, eta_min=settings.lr_min
    )
    history = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TextColumn("{task.fields[status]}"), TimeElapsedColumn()) as bar:
        task = bar.add_task(description, total=settings.epochs, status="")
        for epoch in range(1, settings.epochs + 1):
            row = _train_one_epoch(
                model, train_samples, collate, optimiser, settings, generator, device
            )
            row = {"epoch": epoch, "lr": optimiser.param_groups[0]["lr"], **row}
            scheduler.step()
            if val_samples:
                prob, val_loss = predict_proba(
                    model, val_samples, collate, batch_size=settings.batch_size, device=device
                )
                labels = torch.tensor([s.label for s in val_samples])
                row["val_loss"] = val_loss
                row["val_acc"] = (prob.argmax(1) == labels).float().mean().item()
            history.append(row)
            status = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "lr"))
            bar.update(task, advance=1, status=status)
            log.info("%s epoch %d/%d %s", description, epoch, settings.epochs, status)
    return history


def _loss_and_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own training loss when it defines one (e.g. CMUS-Net's weighted loss),
    else cross-entropy of its logits."""
    if hasattr(model, "loss"):
        return model.loss(batch)
    logits = model(batch)
    return nn.functional.cross_entropy(logits, batch["label"]), logits


def _train_one_epoch(model, samples, collate, optimiser, settings, generator, device) -> dict:
    model.train()
    started = time.perf_counter()
    order = torch.randperm(len(samples), generator=generator)
    loss_sum, correct = 0.0, 0
    for indices in batch_indices(len(samples), settings.batch_size, order):
        batch = _to_device(collate([samples[i] for i in indices], generator), device)
        loss, logits = _loss_and_logits(model, batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss_sum += loss.item() * len(indices)
        correct += (logits.argmax(1) == batch["label"]).sum().item()
    return {
        "train_loss": loss_sum / len(samples),
        "train_acc": correct / len(samples),
        "seconds": time.perf_counter() - started,
    }
