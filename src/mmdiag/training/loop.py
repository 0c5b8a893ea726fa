"""A small, explicit supervised training loop shared by the per-fold trainers.

By default Adam with cosine annealing of the learning rate per epoch (CMUS-Net, Section 4.2);
the model of the last epoch is the one evaluated, as in the paper (it has no validation set).
When the split has a validation part its loss and accuracy are logged each epoch.
:class:`TrainSettings` also offers SGD (momentum, Nesterov), a learning rate lowered on a
plateau of the validation loss, early stopping with the best validation epoch restored,
class-weighted cross-entropy and a class-balanced sampler (:mod:`.sampling`). Model selection
only ever looks at validation values.

Methods plug in their model, data and collate function:

- ``model.loss(batch)`` (optional; else the cross-entropy of ``model(batch)``) returns
  ``(loss, logits)`` or ``(loss, logits, terms)``: ``logits`` are the rows of this process's
  batch (for the logged accuracy), ``terms`` a dict of named parts of the loss. A loss that
  accepts a ``class_weight`` keyword receives the settings' class weights.
- Training samples with ``set_epoch(epoch)`` are told each epoch before it starts.
- ``before_step(model, batch, terms)``, an argument of :func:`train_model`, runs after the
  backward pass of the total loss (after DDP's gradient average) and before the optimiser's
  step, e.g. to clip, project or coordinate gradients. When ``terms`` is not empty the graph
  is kept, so the hook may take ``torch.autograd.grad`` of single terms; those gradients are
  this process's own (a data-parallel hook averages them over processes itself).
- Multi-stage training freezes an earlier stage's module inside the model
  (:mod:`.stages`); only parameters that require gradients are optimised.

Data parallel: started by ``torchrun --nproc-per-node N`` (see :mod:`.distributed`), every
process draws the same seeded order of the epoch, cut into the same global batches; each
process trains on its contiguous share of every global batch, with batch normalisation
synchronised across processes and DDP averaging the gradients. Each share's loss is weighted by
its size, and every random draw (flips, dropout, the balanced sampler's draws) is made per
sample or for the whole global batch, never per process, so N processes train the same model
as one process (up to float summation order). Predictions are split across processes and
gathered on all of them.

Resume: given ``resume_dir``, :func:`train_model` saves its state after every epoch
(:mod:`.resume`: weights, optimiser, scheduler, every random stream, model selection and the
log) and a rerun with the same settings, data and initial weights continues after the last
saved epoch; on the CPU it ends bit-identical to an uninterrupted run. Under data parallelism
the first process writes the state and every process loads it; a run may resume with another
number of processes (it then continues the same run up to float summation order). A
``before_step`` hook with a state of its own must keep that state itself.

Loss scaling: the loss of a share is taken to be a per-sample mean over this process's rows;
it is multiplied by ``len(share) * N / len(global batch)``, so DDP's average of the gradients
is the gradient of the global batch's mean. A term that couples the samples of the batch (a
Gram matrix, a contrastive loss) is computed on the global batch: the model gathers its rows
with :func:`~mmdiag.training.distributed.all_gather_with_grad`, and every process holds the
same value of the term. Such a term needs no scaling of its own: the share weights sum to
``N`` over the processes and the gather's backward sums the gradient over processes, so after
DDP's average the term's gradient is its gradient on the global batch. Per-sample terms of the
process's own rows and global-batch terms may be added in one loss; the logged loss is then
the global batch's mean of the first plus the value of the second.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

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
from mmdiag.training.resume import EpochState, TrainerParts, fingerprint, weights_digest
from mmdiag.training.sampling import (
    SAMPLERS,
    class_weight_tensor,
    epoch_order,
    weighted_cross_entropy,
)

log = logging.getLogger(__name__)

# collate(samples, generators): one augmentation generator per sample, or None (no augmentation)
Collate = Callable[[Sequence, Sequence[torch.Generator] | None], dict[str, torch.Tensor]]

SEED_RANGE = 2**62  # per-sample seeds are drawn from [0, SEED_RANGE)

# before_step(model, batch, terms): after the backward pass, before the optimiser's step
BeforeStep = Callable[[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]], None]
# validate(model, val_samples) -> the epoch's validation values ({"val_cindex": ...})
Validate = Callable[[nn.Module, Sequence], Mapping[str, float]]


OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")
MONITOR_MODES = ("min", "max")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (``methods.<name>.train`` in the config).

    The defaults are CMUS-Net's recipe: Adam, cosine annealing from ``lr`` to ``lr_min``, the
    last epoch's model, plain cross-entropy, a seeded shuffle per epoch.

    Attributes
    ----------
    optimizer
        ``adam`` (with ``amsgrad``) or ``sgd`` (with ``momentum`` and ``nesterov``); both use
        ``weight_decay``.
    scheduler
        ``cosine`` (per epoch, to ``lr_min``), ``plateau`` (``lr * plateau_factor`` after
        ``plateau_patience`` epochs without improvement of ``monitor``; needs a validation set)
        or ``none``.
    early_stopping_patience
        Stop after this many epochs without improvement of ``monitor`` (``None``: never).
    restore_best
        Load the weights of the best validation epoch at the end (else the last epoch's).
    monitor, monitor_mode
        The validation value that selects the model and drives ``plateau`` (``val_loss`` or
        ``val_acc``), and whether lower (``min``) or higher (``max``) is better. Only
        validation values: the test set never selects a model.
    class_weights
        ``none``, ``balanced`` (``n / (K * n_c)`` from the training labels) or one weight per
        class, for :func:`~mmdiag.training.sampling.weighted_cross_entropy`.
    sampler
        ``shuffle`` (a permutation per epoch) or ``balanced`` (draws with replacement,
        probability proportional to ``1 / n_class``).
    """

    epochs: int
    batch_size: int
    lr: float
    lr_min: float
    weight_decay: float
    seed: int = 0
    device: str = "auto"
    amsgrad: bool = False  # Adam's AMSGrad variant (the CMUS-Net authors' code uses it)
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    scheduler: str = "cosine"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    early_stopping_patience: int | None = None
    restore_best: bool = False
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    class_weights: str | tuple[float, ...] = "none"
    sampler: str = "shuffle"

    def __post_init__(self) -> None:
        if not isinstance(self.class_weights, str):
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        for problem in _setting_problems(self):
            raise ValueError(f"train settings: {problem}")

    @property
    def selects_model(self) -> bool:
        """Whether validation picks the epoch (early stopping or restoring the best)."""
        return self.early_stopping_patience is not None or self.restore_best

    @property
    def needs_validation(self) -> bool:
        """Whether a setting monitors validation values (selection or the plateau schedule)."""
        return self.selects_model or self.scheduler == "plateau"


def _setting_problems(settings: TrainSettings) -> list[str]:
    """What is wrong with ``settings`` (nothing: an empty list)."""
    choices = {
        "optimizer": OPTIMIZERS,
        "scheduler": SCHEDULERS,
        "monitor_mode": MONITOR_MODES,
        "sampler": SAMPLERS,
    }
    problems = [
        f"{key} {getattr(settings, key)!r} is not one of {allowed}"
        for key, allowed in choices.items()
        if getattr(settings, key) not in allowed
    ]
    weights = settings.class_weights
    if isinstance(weights, str) and weights not in ("none", "balanced"):
        problems.append(f"class_weights {weights!r} is not none, balanced or a list of weights")
    if not isinstance(weights, str) and (not weights or min(weights) <= 0):
        problems.append(f"class_weights {list(weights)} must be positive, one per class")
    if not settings.monitor.startswith("val_"):
        problems.append(f"monitor {settings.monitor!r} is not a validation value (val_...)")
    if settings.nesterov and (settings.optimizer != "sgd" or settings.momentum <= 0):
        problems.append("nesterov needs the sgd optimizer with a positive momentum")
    if settings.amsgrad and settings.optimizer != "adam":
        problems.append("amsgrad is a variant of the adam optimizer")
    if not 0 < settings.plateau_factor < 1:
        problems.append(f"plateau_factor {settings.plateau_factor} is not in (0, 1)")
    patience = settings.early_stopping_patience
    if patience is not None and patience < 1:
        problems.append(f"early_stopping_patience {patience} is not at least 1")
    return problems


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

    def __init__(self, model: nn.Module, class_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.class_weight = class_weight
        if class_weight is not None and hasattr(model, "loss") and not _loss_takes_weights(model):
            raise ValueError(
                f"{type(model).__name__}.loss takes no class_weight: class weights apply to "
                "models trained with the loop's cross-entropy or whose loss accepts them"
            )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return _loss_logits_terms(self.model, batch, self.class_weight)


def _loss_takes_weights(model: nn.Module) -> bool:
    return "class_weight" in inspect.signature(model.loss).parameters


def _loss_logits_terms(
    model: nn.Module, batch: dict, class_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The loss, logits and loss terms of a training step.

    The model's own training loss when it defines one (e.g. CMUS-Net's weighted loss), else
    the (class-weighted) cross-entropy of its logits. ``model.loss(batch)`` returns
    ``(loss, logits)`` or ``(loss, logits, terms)``, ``terms`` naming parts of the loss for
    the ``before_step`` hook; it receives ``class_weight`` when it accepts that keyword.
    """
    if not hasattr(model, "loss"):
        logits = model(batch)
        return weighted_cross_entropy(logits, batch["label"], class_weight), logits, {}
    extra = {"class_weight": class_weight} if class_weight is not None else {}
    result = model.loss(batch, **extra)
    if len(result) == 2:
        return (*result, {})
    loss, logits, terms = result
    return loss, logits, dict(terms)


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
    before_step: BeforeStep | None = None,
    validate: Validate | None = None,
    resume_dir: Path | None = None,
    resume_key: Mapping | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place; return one log row per epoch.

    ``context`` (from :func:`~mmdiag.training.distributed.init_distributed`) makes this
    process one of several data-parallel ones; every process returns the same log.
    ``before_step(model, batch, terms)`` is called after each backward pass (and DDP's
    gradient average) and before the optimiser's step, with the unwrapped model, this
    process's batch and the loss terms the model's ``loss`` returned (see the module
    docstring). With model selection on, each row records whether its epoch was the best
    (``best``); training stops once ``early_stopping_patience`` epochs bring no improvement.
    ``validate(model, val_samples)`` replaces the validation loss and accuracy with values of
    the caller's own (e.g. a survival model's validation C-index, ``val_cindex``); it runs on
    every process with the unwrapped model in evaluation mode, without gradients.

    With ``resume_dir`` the state is saved there after every epoch, and a saved state of the
    same run is resumed (see :mod:`.resume`); the run is identified by the settings, the
    numbers of samples, the model's initial weights and ``resume_key`` (the caller's
    description of its data and settings, e.g. the fold's inputs). The caller removes the
    folder once it has written its outputs (:func:`~mmdiag.training.resume.clear_state`).
    """
    if not train_samples:
        raise ValueError("no training samples")
    if settings.needs_validation and not val_samples:
        raise ValueError(
            f"{', '.join(_validation_users(settings))} monitor {settings.monitor} and "
            "need validation samples"
        )
    context = context or single_process(resolve_device(settings.device))
    _check_batches_fit(len(train_samples), settings.batch_size, context)
    run = _prepare_run(model, train_samples, collate, settings, context, before_step)
    run.validate = validate
    scheduler = _make_scheduler(run.optimiser, settings)
    selection = _Selection(settings)
    run_key = {"n_val": len(val_samples), "key": resume_key}
    state = _epoch_state(run, scheduler, resume_dir, run_key, description)
    history = state.restore_history(selection)
    with _progress(context) as bar:
        task = bar.add_task(description, total=settings.epochs, status="", completed=len(history))
        for epoch in _epochs_left(history, selection, settings):
            row = _epoch_row(run, epoch, val_samples, selection)
            _step_scheduler(scheduler, settings, row)
            history.append(row)
            state.save(history, extra=selection.values(), extra_tensors=selection.tensors())
            status = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "lr"))
            bar.update(task, advance=1, status=status)
            if context.is_main:
                log.info("%s epoch %d/%d %s", description, epoch, settings.epochs, status)
            if selection.exhausted:
                _log_main(
                    context,
                    "%s: stopped after epoch %d, %d epochs without improvement",
                    description,
                    epoch,
                    selection.stale,
                )
                break
    _set_dropout_share(run.model, None)
    if settings.restore_best:
        selection.restore(run.model, context, description)
    return history


def _epoch_state(run: _Run, scheduler, resume_dir, run_key: dict, description) -> EpochState:
    """Saving and restoring the run's state in ``resume_dir`` (neither without one).

    The fingerprint is taken before the first step: the settings, the number of training
    samples, the initial weights (the same on every process and for any number of them) and
    ``run_key``.
    """
    key = ""
    if resume_dir is not None:
        key = fingerprint(
            {
                "trainer": "train_model",
                "settings": asdict(run.settings),
                "n_train": len(run.samples),
                "initial_weights": weights_digest(run.model),
                **run_key,
            }
        )
    generators = {"order": run.generator, "dropout": run.dropout_generator}
    parts = TrainerParts(run.model, run.optimiser, scheduler, generators=generators)
    return EpochState(resume_dir, key, parts, description=description, writes=run.context.is_main)


def _epochs_left(history: list[dict], selection: _Selection, settings: TrainSettings) -> range:
    """The epochs still to train: none when early stopping had ended the saved run."""
    if selection.exhausted:
        return range(0)
    return range(len(history) + 1, settings.epochs + 1)


def _validation_users(settings: TrainSettings) -> list[str]:
    """The settings that need a validation set."""
    users = {
        "the plateau scheduler": settings.scheduler == "plateau",
        "early stopping": settings.early_stopping_patience is not None,
        "restore_best": settings.restore_best,
    }
    return [name for name, used in users.items() if used]


def _log_main(context: DistContext, message: str, *args) -> None:
    if context.is_main:
        log.info(message, *args)


@dataclass
class _Run:
    """What every step of one training run uses."""

    objective: nn.Module  # the loss as a forward pass, DDP-wrapped when distributed
    model: nn.Module
    samples: Sequence
    labels: torch.Tensor | None  # training labels, when sampling or class weights need them
    collate: Collate
    optimiser: torch.optim.Optimizer
    settings: TrainSettings
    generator: torch.Generator  # the epoch order and the per-sample seeds
    dropout_generator: torch.Generator  # the masks of GlobalBatchDropout
    context: DistContext
    before_step: BeforeStep | None
    validate: Validate | None = None


def _prepare_run(model, samples, collate, settings, context, before_step) -> _Run:
    """Seeded generators, synchronised batch norm, the optimiser and the DDP objective."""
    generator = torch.Generator().manual_seed(settings.seed)
    dropout_generator = torch.Generator().manual_seed(settings.seed + 1)
    use_global_batch_dropout(model, dropout_generator)
    model = sync_batchnorm(model, context).to(context.device)
    labels = None
    if settings.sampler != "shuffle" or settings.class_weights != "none":
        labels = torch.tensor([int(s.label) for s in samples])
    weight = None if labels is None else class_weight_tensor(settings.class_weights, labels)
    weight = None if weight is None else weight.to(context.device)
    # unused parameters (e.g. per-modality heads without the weighted loss) get no gradient
    objective = wrap_ddp(_TrainingObjective(model, weight), context, find_unused_parameters=True)
    optimiser = _make_optimiser(model, settings)
    return _Run(
        objective=objective,
        model=model,
        samples=samples,
        labels=labels,
        collate=collate,
        optimiser=optimiser,
        settings=settings,
        generator=generator,
        dropout_generator=dropout_generator,
        context=context,
        before_step=before_step,
    )


def _make_optimiser(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """Adam or SGD over the parameters that take gradients (frozen stages are left out)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            nesterov=settings.nesterov,
        )
    return torch.optim.Adam(
        parameters, lr=settings.lr, weight_decay=settings.weight_decay, amsgrad=settings.amsgrad
    )


def _make_scheduler(optimiser: torch.optim.Optimizer, settings: TrainSettings):
    """The per-epoch learning-rate schedule (``None``: a constant rate)."""
    if settings.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=settings.epochs, eta_min=settings.lr_min
        )
    if settings.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimiser,
            mode=settings.monitor_mode,
            factor=settings.plateau_factor,
            patience=settings.plateau_patience,
        )
    return None


def _step_scheduler(scheduler, settings: TrainSettings, row: dict) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(_monitored(row, settings.monitor))
    elif scheduler is not None:
        scheduler.step()


def _progress(context: DistContext) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(
        *columns,
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not context.is_main,
    )


def _epoch_row(run: _Run, epoch: int, val_samples: Sequence, selection: _Selection) -> dict:
    """Train one epoch, validate, and note whether the epoch is the best so far.

    Training samples with a ``set_epoch(epoch)`` method (e.g. a dataset that pairs anew each
    epoch) are told the epoch first, so a resumed run sees the same epochs as an unbroken one.
    """
    set_epoch = getattr(run.samples, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    row = {"epoch": epoch, "lr": run.optimiser.param_groups[0]["lr"], **_train_one_epoch(run)}
    if val_samples and run.validate is not None:
        unwrap(run.model).eval()
        with torch.no_grad():
            row |= dict(run.validate(unwrap(run.model), val_samples))
    elif val_samples:
        row |= _validation_row(run.model, val_samples, run.collate, run.settings, run.context)
    if run.settings.selects_model:
        row["best"] = selection.update(row, run.model)
    return row


def _monitored(row: dict, key: str) -> float:
    if key not in row:
        raise KeyError(f"monitor {key!r} is not logged; the validation row has {sorted(row)}")
    return float(row[key])


class _Selection:
    """The best validation epoch so far (its weights, when they are to be restored)."""

    def __init__(self, settings: TrainSettings) -> None:
        self.monitor, self.mode = settings.monitor, settings.monitor_mode
        self.patience, self.keep_state = settings.early_stopping_patience, settings.restore_best
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0  # epochs since the best

    def update(self, row: dict, model: nn.Module) -> bool:
        """Record the epoch's monitored value; whether it is the best so far."""
        value = _monitored(row, self.monitor)
        better = math.isfinite(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        )
        if not better:
            self.stale += 1
            return False
        self.best, self.best_epoch, self.stale = value, int(row["epoch"]), 0
        if self.keep_state:
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
        return True

    def values(self) -> dict:
        """The selection's state as JSON values, for the resume state."""
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The best epoch's weights, when kept, as the resume state's ``best`` group."""
        return {} if self.best_state is None else {"best": self.best_state}

    def load(self, values: Mapping, best_state: dict[str, torch.Tensor] | None) -> None:
        """Take back a saved selection (:meth:`values` and :meth:`tensors`)."""
        self.best, self.best_epoch, self.stale = (
            values["best"],
            values["best_epoch"],
            values["stale"],
        )
        self.best_state = best_state if self.keep_state else None

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` epochs in a row brought no improvement."""
        return self.patience is not None and self.stale >= self.patience

    def restore(self, model: nn.Module, context: DistContext, description: str) -> None:
        """Load the best epoch's weights into ``model`` (the last ones stay if none was)."""
        if self.best_state is None:
            log.warning(
                "%s: no finite %s; the last epoch's weights are kept", description, self.monitor
            )
            return
        model.load_state_dict(self.best_state)
        _log_main(
            context,
            "%s: restored epoch %d (%s %.4g)",
            description,
            self.best_epoch,
            self.monitor,
            self.best,
        )


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


def _train_one_epoch(run: _Run) -> dict:
    """One pass over the epoch's order; every process draws the same order and seeds."""
    run.objective.train()
    started = time.perf_counter()
    n_items = len(run.samples)
    order = epoch_order(n_items, run.generator, sampler=run.settings.sampler, labels=run.labels)
    loss_sum, correct = 0.0, 0
    for global_batch in batch_indices(n_items, run.settings.batch_size, order):
        seeds = torch.randint(SEED_RANGE, (len(global_batch),), generator=run.generator)
        batch_loss_sum, batch_correct = _train_step(run, global_batch, seeds)
        loss_sum += batch_loss_sum
        correct += int(batch_correct)
    return {
        "train_loss": loss_sum / n_items,
        "train_acc": correct / n_items,
        "seconds": time.perf_counter() - started,
    }


def _train_step(run: _Run, global_batch: list[int], seeds: torch.Tensor) -> tuple[float, float]:
    """This process's share of one global batch: forward, backward, hook, optimiser step.

    Returns the global batch's summed loss (mean loss times samples) and correct count.
    """
    context = run.context
    shares = torch.tensor_split(torch.arange(len(global_batch)), context.world_size)
    first = int(shares[context.rank][0]) if context.is_distributed else 0
    local = rank_share(torch.tensor(global_batch), context).tolist()
    _set_dropout_share(run.model, (first, len(global_batch)))
    generators = sample_generators(rank_share(seeds, context))
    batch = _to_device(run.collate([run.samples[i] for i in local], generators), context.device)
    loss, logits, terms = run.objective(batch)
    # a global-batch term is the same on every process: it sums to term * global size
    batch_loss_sum, batch_correct = _sum_over_ranks(
        [loss.item() * len(local), (logits.argmax(1) == batch["label"]).sum().item()], context
    )
    if not math.isfinite(batch_loss_sum):
        raise FloatingPointError(f"training loss became {batch_loss_sum / len(global_batch)}")
    if context.is_distributed:
        # DDP averages over processes: weight each share so the result is the global mean
        loss = loss * (len(local) * context.world_size / len(global_batch))
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward(retain_graph=bool(terms) and run.before_step is not None)
    if run.before_step is not None:
        run.before_step(run.model, batch, terms)
    run.optimiser.step()
    return batch_loss_sum, batch_correct
