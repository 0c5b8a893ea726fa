"""A small, explicit supervised training loop shared by the per-fold trainers.

Adam with cosine annealing of the learning rate per epoch (CMUS-Net, Section 4.2); the model of
the last epoch is the one evaluated, as in the paper (it has no validation set). When the split
has a validation part its loss and accuracy are logged each epoch.

Data parallel: started by ``torchrun --nproc-per-node N`` (see :mod:`.distributed`), every
process draws the same seeded order of the epoch, cut into the same global batches; each
process trains on its contiguous share of every global batch, with batch normalisation
synchronised across processes and DDP averaging the gradients. Each share's loss is weighted by
its size, and every random draw (flips, dropout) is made per sample or for the whole global
batch, never per process, so N processes train the same model as one process (up to float
summation order). Predictions are split across processes and gathered on all of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from mmdiag.training.device import resolve_device
from mmdiag.training.distributed import (
    DistContext,
    gather_rows,
    rank_share,
    sync_batchnorm,
    unwrap,
    wrap_ddp,
)

log = logging.getLogger(__name__)

# collate(samples, generators): one augmentation generator per sample, or None (no augmentation)
Collate = Callable[[Sequence, Sequence[torch.Generator] | None], dict[str, torch.Tensor]]

SEED_RANGE = 2**62  # per-sample seeds are drawn from [0, SEED_RANGE)


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
    amsgrad: bool = False  # Adam's AMSGrad variant (the CMUS-Net authors' code uses it)


def single_process(device: torch.device) -> DistContext:
    """The context of a plain (not torchrun) process on ``device``."""
    return DistContext(rank=0, world_size=1, local_rank=0, device=device)


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


def sample_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One augmentation generator per sample, seeded from the epoch's shared stream."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


class GlobalBatchDropout(nn.Dropout):
    """Dropout whose mask is drawn for the whole global batch and cut to this process's rows.

    Every process draws the same mask from the same generator and keeps the rows of its
    share (``share = (first_row, global_rows)``, set by the training loop before each step),
    so the masks do not depend on the number of processes. The first dimension of the input
    must be the batch of samples.
    """

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__(p)
        self.generator = generator
        self.share: tuple[int, int] | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return input
        first, total = self.share if self.share is not None else (0, input.shape[0])
        if self.share is not None and first + input.shape[0] > total:
            raise ValueError(
                f"dropout input of {input.shape[0]} rows does not fit the batch share "
                f"{self.share}: only layers whose first dimension is the sample can be split "
                "across processes"
            )
        mask_shape = (total, *input.shape[1:])
        keep = torch.empty(mask_shape).bernoulli_(1 - self.p, generator=self.generator)
        keep = keep[first : first + input.shape[0]].to(input.device, input.dtype)
        return input * keep / (1 - self.p)


def use_global_batch_dropout(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Replace every ``nn.Dropout`` of ``model`` (in place) by :class:`GlobalBatchDropout`."""
    for name, child in model.named_children():
        if type(child) is nn.Dropout:
            model.add_module(name, GlobalBatchDropout(child.p, generator))
        else:
            use_global_batch_dropout(child, generator)
    return model


def _set_dropout_share(model: nn.Module, share: tuple[int, int] | None) -> None:
    for module in model.modules():
        if isinstance(module, GlobalBatchDropout):
            module.share = share


class _TrainingObjective(nn.Module):
    """The model's loss as a forward pass, so that DDP sees (and synchronises) it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return _loss_and_logits(self.model, batch)


def _loss_and_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own training loss when it defines one (e.g. CMUS-Net's weighted loss),
    else cross-entropy of its logits."""
    if hasattr(model, "loss"):
        return model.loss(batch)
    logits = model(batch)
    return nn.functional.cross_entropy(logits, batch["label"]), logits


def _sum_over_ranks(values: list[float], context: DistContext) -> list[float]:
    """Element-wise sums over all processes (the values themselves for one process)."""
    if not context.is_distributed:
        return values
    device = context.device if context.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    samples: Sequence,
    collate: Collate,
    *,
    batch_size: int,
    device: torch.device,
    context: DistContext | None = None,
) -> tuple[torch.Tensor, float]:
    """Softmax class probabilities of ``samples`` (n, K) and their mean cross-entropy loss.

    With several processes each predicts a contiguous share (padded to equal length with
    copies of the first sample) and every process returns all rows in sample order.
    """
    context = context or single_process(device)
    model = unwrap(model)
    model.eval()
    positions = torch.tensor_split(torch.arange(len(samples)), context.world_size)[context.rank]
    rows_per_rank = math.ceil(len(samples) / context.world_size)
    padded = positions.tolist() + [0] * (rows_per_rank - len(positions))
    probs, losses = [], []
    for indices in batch_indices(len(padded), batch_size):
        batch = _to_device(collate([samples[padded[i]] for i in indices], None), device)
        logits = model(batch).float()
        losses.append(nn.functional.cross_entropy(logits, batch["label"], reduction="none"))
        probs.append(logits.softmax(dim=1))
    local = torch.cat([torch.cat(probs), torch.cat(losses)[:, None]], dim=1).double()
    gathered = gather_rows(local, context).cpu()
    counts = [len(p) for p in torch.tensor_split(torch.arange(len(samples)), context.world_size)]
    rows = torch.cat(
        [gathered[r * rows_per_rank : r * rows_per_rank + n] for r, n in enumerate(counts)]
    )
    return rows[:, :-1].float(), rows[:, -1].sum().item() / max(len(samples), 1)


def train_model(
    model: nn.Module,
    train_samples: Sequence,
    collate: Collate,
    settings: TrainSettings,
    *,
    val_samples: Sequence = (),
    description: str = "training",
    context: DistContext | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with cross-entropy; return one log row per epoch.

    ``context`` (from :func:`~mmdiag.training.distributed.init_distributed`) makes this
    process one of several data-parallel ones; every process returns the same log.
    """
    if not train_samples:
        raise ValueError("no training samples")
    context = context or single_process(resolve_device(settings.device))
    _check_batches_fit(len(train_samples), settings.batch_size, context)
    generator = torch.Generator().manual_seed(settings.seed)
    use_global_batch_dropout(model, torch.Generator().manual_seed(settings.seed + 1))
    model = sync_batchnorm(model, context).to(context.device)
    optimiser = torch.optim.Adam(
        model.parameters(),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        amsgrad=settings.amsgrad,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=settings.epochs, eta_min=settings.lr_min
    )
    # unused parameters (e.g. per-modality heads without the weighted loss) get no gradient
    objective = wrap_ddp(_TrainingObjective(model), context, find_unused_parameters=True)
    history = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    progress = Progress(
        *columns,
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not context.is_main,
    )
    with progress as bar:
        task = bar.add_task(description, total=settings.epochs, status="")
        for epoch in range(1, settings.epochs + 1):
            row = _train_one_epoch(
                objective, model, train_samples, collate, optimiser, settings, generator, context
            )
            row = {"epoch": epoch, "lr": optimiser.param_groups[0]["lr"], **row}
            scheduler.step()
            if val_samples:
                row |= _validation_row(model, val_samples, collate, settings, context)
            history.append(row)
            status = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "lr"))
            bar.update(task, advance=1, status=status)
            if context.is_main:
                log.info("%s epoch %d/%d %s", description, epoch, settings.epochs, status)
    _set_dropout_share(model, None)
    return history


def _check_batches_fit(n_items: int, batch_size: int, context: DistContext) -> None:
    """Every process needs at least one sample of every global batch."""
    smallest = min(len(b) for b in batch_indices(n_items, batch_size))
    if smallest < context.world_size:
        raise ValueError(
            f"a batch of {smallest} samples (batch_size {batch_size}, {n_items} samples) "
            f"cannot be split across {context.world_size} processes"
        )


def _validation_row(model, samples, collate, settings, context) -> dict[str, float]:
    prob, loss = predict_proba(
        model,
        samples,
        collate,
        batch_size=settings.batch_size,
        device=context.device,
        context=context,
    )
    labels = torch.tensor([s.label for s in samples])
    return {"val_loss": loss, "val_acc": (prob.argmax(1) == labels).float().mean().item()}


def _train_one_epoch(
    objective, model, samples, collate, optimiser, settings, generator, context
) -> dict:
    """One pass over ``samples``; every process draws the same order and per-sample seeds."""
    objective.train()
    started = time.perf_counter()
    order = torch.randperm(len(samples), generator=generator)
    loss_sum, correct = 0.0, 0
    for global_batch in batch_indices(len(samples), settings.batch_size, order):
        seeds = torch.randint(SEED_RANGE, (len(global_batch),), generator=generator)
        shares = torch.tensor_split(torch.arange(len(global_batch)), context.world_size)
        first = int(shares[context.rank][0]) if context.is_distributed else 0
        local = rank_share(torch.tensor(global_batch), context).tolist()
        local_seeds = rank_share(seeds, context)
        _set_dropout_share(model, (first, len(global_batch)))
        batch = _to_device(
            collate([samples[i] for i in local], sample_generators(local_seeds)), context.device
        )
        loss, logits = objective(batch)
        batch_loss_sum, batch_correct = _sum_over_ranks(
            [loss.item() * len(local), (logits.argmax(1) == batch["label"]).sum().item()],
            context,
        )
        if not math.isfinite(batch_loss_sum):
            raise FloatingPointError(f"training loss became {batch_loss_sum / len(global_batch)}")
        if context.is_distributed:
            # DDP averages over processes: weight each share so the result is the global mean
            loss = loss * (len(local) * context.world_size / len(global_batch))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss_sum += batch_loss_sum
        correct += int(batch_correct)
    return {
        "train_loss": loss_sum / len(samples),
        "train_acc": correct / len(samples),
        "seconds": time.perf_counter() - started,
    }
