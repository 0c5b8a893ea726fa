"""Data-parallel training across processes: one process per GPU (or CPU process), via torchrun.

A trainer calls :func:`init_distributed` once. Started by ``torchrun --nproc-per-node N`` the
environment holds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and a process group is created (NCCL on
GPUs, gloo on CPUs); started by plain ``python`` the context is a single process and nothing
else changes, so every trainer works unchanged with one process.

Determinism across world sizes: :func:`global_batches` splits one seeded permutation of the
data into global batches, and each rank takes its contiguous share of every global batch. With
per-sample random draws keyed by the sample index, batch normalisation synchronised across
ranks (:func:`sync_batchnorm`) and DDP's gradient averaging, N processes compute the same
updates as one process with the whole batch (up to float summation order).

Losses that couple the samples of a batch (a Gram matrix, a contrastive loss) need the global
batch on every rank: :func:`all_gather_with_grad` concatenates every rank's rows in rank order
and lets the gradient flow back to the rank that computed them. Each rank then computes the
same global term; the backward pass sums the gradient over ranks before taking this rank's
rows, so with the training loop's share weights (which sum to the number of ranks) DDP's
average gives the parameters exactly the gradient of the global term (see
:mod:`mmdiag.training.loop`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmdiag.training.device import resolve_device
from mmdiag.training.stages import freeze, frozen_module_names


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process writes outputs and logs progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment, if any.

    ``device`` is ``auto`` (CUDA when available), ``cuda`` or ``cpu``, as for
    :func:`~mmdiag.training.device.resolve_device`. Each rank uses GPU ``LOCAL_RANK``; on CPUs
    the gloo backend is used.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device, local_rank=local_rank)
    use_cuda = chosen.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def current_context(device: torch.device) -> DistContext | None:
    """This process's place in an initialised process group of several processes, else
    ``None``: for model code (a global-batch term, a gradient hook) that gathers or reduces
    only when it runs under data parallelism."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(context: DistContext) -> None:
    """Leave the process group (safe to call for a single process)."""
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.is_distributed:
        dist.barrier()


def global_batches(
    n_items: int, batch_size: int, *, generator: torch.Generator, drop_last: bool = True
) -> list[torch.Tensor]:
    """One epoch's global batches: a seeded permutation cut into ``batch_size`` pieces."""
    order = torch.randperm(n_items, generator=generator)
    stop = n_items - n_items % batch_size if drop_last else n_items
    return [order[start : start + batch_size] for start in range(0, stop, batch_size)]


def rank_share(batch: torch.Tensor, context: DistContext) -> torch.Tensor:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    return torch.tensor_split(batch, context.world_size)[context.rank]


def check_divisible(batch_size: int, context: DistContext) -> None:
    """Equal per-rank batches keep DDP's gradient average equal to the global-batch mean."""
    if batch_size % context.world_size:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {context.world_size} processes"
        )


def mean_over_ranks(value: float, context: DistContext) -> float:
    """The mean of a per-rank scalar over all ranks (the value itself for one process)."""
    if not context.is_distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor)
    return tensor.item() / context.world_size


def gather_rows(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Concatenate every rank's rows (equal row counts), rank 0's first, on every rank."""
    if not context.is_distributed:
        return tensor
    local = tensor.to(_collective_device(context)).contiguous()
    parts = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def _collective_device(context: DistContext) -> torch.device:
    return context.device if context.device.type == "cuda" else torch.device("cpu")


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss depends
    on every rank's inputs through the summed statistics."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over all ranks."""
    return _SumOverRanks.apply(tensor)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of rows (ranks may hold different row counts) whose gradient is this rank's
    rows of the gradient summed over ranks: every rank's loss depends on every rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.start, ctx.rows = sum(counts[:rank]), counts[rank]
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.start : ctx.start + ctx.rows], None, None


def all_gather_with_grad(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Every rank's rows of ``tensor``, concatenated in rank order, on every rank (autograd-aware).

    Ranks may hold different numbers of rows (a global batch of 5 splits 3 + 2). A loss of the
    result is a loss of the global batch; its gradient reaches each rank's own rows, summed
    over the ranks' (identical) losses. For one process ``tensor`` is returned as it is.
    """
    if not context.is_distributed:
        return tensor
    count = torch.tensor([len(tensor)], dtype=torch.int64, device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(context.world_size)]
    dist.all_gather(counts, count)
    return _AllGatherWithGrad.apply(tensor, [int(c) for c in counts], context.rank)


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation whose batch statistics are summed over all ranks.

    PyTorch's ``SyncBatchNorm`` runs on GPUs only; this module is the same computation in plain
    PyTorch (per-channel count, sum and sum of squares all-reduced with a differentiable
    collective), so CPU data-parallel runs equal single-process runs. It is also the reference
    the GPU path is compared with.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized()
        if not synced or dist.get_world_size() == 1:
            return super().forward(input)
        dims = [d for d in range(input.dim()) if d != 1]
        wide = input.double()  # E[x^2] - E[x]^2 in float64: no cancellation for large means
        count = torch.full((1,), input.numel() / input.shape[1], dtype=torch.float64)
        stats = torch.cat([count.to(input.device), wide.sum(dims), (wide * wide).sum(dims)])
        stats = sum_over_ranks(stats)
        total, channel_sum, channel_square = stats[0], *stats[1:].chunk(2)
        mean = (channel_sum / total).to(input.dtype)
        variance = (channel_square / total - (channel_sum / total) ** 2).to(input.dtype)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), total.detach())
        shape = [1, -1] + [1] * (input.dim() - 2)
        normalised = (input - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        return normalised

    @torch.no_grad()
    def _update_running_stats(self, mean, variance, total) -> None:
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
        unbiased = variance * total / (total - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def sync_batchnorm(model: nn.Module, context: DistContext) -> nn.Module:
    """Make every batch-norm layer use statistics of the global batch (no-op for one process).

    GPUs use PyTorch's ``SyncBatchNorm``; CPU processes use :class:`CrossRankBatchNorm`.
    Modules frozen by :func:`~mmdiag.training.stages.freeze` stay frozen (a replaced batch
    norm keeps its parameters' ``requires_grad`` and a frozen layer's evaluation mode).
    """
    if not context.is_distributed:
        return model
    frozen = frozen_module_names(model)
    if context.device.type == "cuda":
        from timm.layers import convert_sync_batchnorm  # also handles timm's BatchNormAct2d

        model = convert_sync_batchnorm(model)
    else:
        model = _replace_batchnorm(model)
    for name in frozen:
        freeze(model.get_submodule(name))
    return model


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in (
        *_PLAIN_BATCHNORMS,
        CrossRankBatchNorm,
    ):
        raise ValueError(
            f"{type(module).__name__} (a batch norm with extra behaviour) cannot be synchronised "
            "across CPU processes; use one process or GPUs"
        )
    if type(module) in _PLAIN_BATCHNORMS:
        # keep the layer's dtype and device (a float64 or GPU model stays so)
        like = next(iter([*module.parameters(), *module.buffers()]), None)
        placement = {} if like is None else {"device": like.device, "dtype": like.dtype}
        replaced = CrossRankBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            **placement,
        )
        replaced.load_state_dict(module.state_dict())
        for new, old in zip(replaced.parameters(), module.parameters(), strict=True):
            new.requires_grad_(old.requires_grad)
        replaced.train(module.training)
        return replaced
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorm(child))
    return module


def wrap_ddp(
    model: nn.Module, context: DistContext, *, find_unused_parameters: bool = False
) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on its device); itself otherwise.

    ``find_unused_parameters`` is needed when some parameters take no part in the loss (e.g.
    per-modality heads of a variant without the weighted loss); DDP fails on them otherwise.
    """
    if not context.is_distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
