"""SimSiam pretraining of one encoder on the patches of one scale, resumable and data-parallel.

Optimisation follows SimSiam (Sec. 4): SGD with momentum 0.9, weight decay 1e-4, learning rate
``base_lr * batch_size / 256`` with a cosine decay per epoch, the predictor's learning rate
held fixed (``fix_predictor_lr``, the authors' recommended setting).

Run by plain ``python`` it uses one process; under ``torchrun`` every process takes its share
of each global batch, batch norm is synchronised and gradients are averaged (see
:mod:`mmdiag.training.distributed`), so the weights match a one-process run.

After every epoch the main process saves the model and optimiser state to ``state_dir``; a
rerun with the same settings continues from the last completed epoch and ends with the same
weights as an uninterrupted run (each epoch's data order and every augmentation are seeded by
``(seed, epoch, step)``). The state is removed once the outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch import nn

import mmdiag
from mmdiag.io.atomic import atomic_path, safetensors_metadata, write_json, write_tsv, write_yaml
from mmdiag.models.encoders import create_encoder
from mmdiag.ssl.augment import AugmentSettings, augment, sample_view_params
from mmdiag.ssl.data import EpochBatches, ScalePixels, pixel_loader
from mmdiag.ssl.simsiam import SimSiam, embedding_std, simsiam_loss
from mmdiag.training.distributed import (
    DistContext,
    barrier,
    check_divisible,
    gather_rows,
    init_distributed,
    mean_over_ranks,
    rank_share,
    shutdown,
    sync_batchnorm,
    unwrap,
    wrap_ddp,
)

log = logging.getLogger(__name__)

STATE_WEIGHTS_PATTERN = "state_{epochs_done}.safetensors"  # the JSON names the current one
STATE_INFO = "state.json"


@dataclass(frozen=True)
class SSLSettings:
    """``ssl`` section of the config (see config/schema.yaml for each key)."""

    backbone: str = "resnet50"
    init_checkpoint: str | None = None
    image_px: int = 224
    dim: int = 2048
    predictor_dim: int = 512
    epochs: int = 200
    batch_size: int = 128
    base_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    fix_predictor_lr: bool = True
    amp: bool = True
    channels_last: bool = True
    workers: int = 8
    seed: int = 0
    device: str = "auto"
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    @classmethod
    def from_config(cls, section: dict) -> SSLSettings:
        known = {f for f in cls.__dataclass_fields__ if f != "augment"}
        values = {key: value for key, value in section.items() if key in known}
        return cls(**values, augment=AugmentSettings.from_config(section.get("augment", {})))

    @property
    def init_lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    def fingerprint(self, scale: str, store_paths: Sequence[Path]) -> str:
        """Identifies a run: a saved state is only resumed by a run with the same fingerprint."""
        text = json.dumps(
            {"settings": asdict(self), "scale": scale, "stores": [str(p) for p in store_paths]},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()


def build_simsiam(settings: SSLSettings) -> SimSiam:
    """Backbone from timm (random, or the local ``init_checkpoint``) with SimSiam's heads."""
    backbone = create_encoder(settings.backbone, checkpoint=settings.init_checkpoint)
    return SimSiam(backbone, dim=settings.dim, predictor_dim=settings.predictor_dim)


def make_optimiser(model: SimSiam, settings: SSLSettings) -> torch.optim.SGD:
    """SGD over two groups: encoder (cosine-decayed lr) and predictor (fixed lr if asked)."""
    groups = [
        {"params": [*model.backbone.parameters(), *model.projector.parameters()], "fixed": False},
        {"params": list(model.predictor.parameters()), "fixed": settings.fix_predictor_lr},
    ]
    return torch.optim.SGD(
        groups, lr=settings.init_lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def cosine_lr(init_lr: float, epoch: int, epochs: int) -> float:
    """SimSiam's schedule: ``init_lr * 0.5 * (1 + cos(pi * epoch / epochs))``, epoch from 0."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def set_learning_rates(optimiser: torch.optim.Optimizer, lr: float, init_lr: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = init_lr if group["fixed"] else lr


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The augmentation random stream of one global batch."""
    state = np.random.SeedSequence([seed, epoch, step]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


# ----------------------------------------------------------------------------- resume state


def save_state(state_dir: Path, model: nn.Module, optimiser, info: dict) -> None:
    """Weights and momentum buffers (safetensors) and progress (JSON), each atomically.

    The weights go to a file named after the epoch, then the JSON naming that file replaces
    the old one, then older weight files are removed: a kill at any point leaves a JSON whose
    weights file is complete and of the same epoch.
    """
    tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimiser.param_groups:
        for parameter in group["params"]:
            buffer = optimiser.state.get(parameter, {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum/{names[id(parameter)]}"] = buffer.detach().contiguous()
    state_dir.mkdir(parents=True, exist_ok=True)
    weights_name = STATE_WEIGHTS_PATTERN.format(epochs_done=info["epochs_done"])
    with atomic_path(state_dir / weights_name) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    write_json({**info, "weights": weights_name}, state_dir / STATE_INFO)
    for old in state_dir.glob(STATE_WEIGHTS_PATTERN.format(epochs_done="*")):
        if old.name != weights_name:
            old.unlink(missing_ok=True)


def load_state(state_dir: Path, model: nn.Module, optimiser, fingerprint: str) -> dict | None:
    """Restore a saved state of the same run into ``model``/``optimiser``; its info or None."""
    info_path = state_dir / STATE_INFO
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("fingerprint") != fingerprint:
        log.warning("%s: saved state is from other settings; starting afresh", state_dir)
        return None
    weights_path = state_dir / info.get("weights", "")
    if not weights_path.is_file():
        log.warning("%s: %s names no weights file; starting afresh", state_dir, STATE_INFO)
        return None
    device = next(model.parameters()).device
    tensors = load_file(str(weights_path), device=str(device))
    model.load_state_dict(
        {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    )
    parameters = dict(model.named_parameters())
    for key, buffer in tensors.items():
        if key.startswith("momentum/"):
            optimiser.state[parameters[key.removeprefix("momentum/")]]["momentum_buffer"] = buffer
    log.info("resuming %s after epoch %d", state_dir, info["epochs_done"])
    return info


# ----------------------------------------------------------------------------- training


def train_one_epoch(
    model: nn.Module,
    loader,
    optimiser,
    settings: SSLSettings,
    context: DistContext,
    epoch: int,
    on_step=None,
) -> dict[str, float]:
    """One pass over this rank's batches; loss and collapse indicator averaged over ranks."""
    model.train()
    device = context.device
    use_amp = settings.amp and device.type == "cuda"
    share = rank_share(torch.arange(settings.batch_size), context)
    loss_sum = torch.zeros((), device=device)
    std_sum = torch.zeros((), device=device)
    started, n_steps = time.perf_counter(), 0
    for step, batch in enumerate(loader):
        pixels = batch["pixels"].to(device, non_blocking=True)
        height, width = pixels.shape[-2:]
        generator = step_generator(settings.seed, epoch, step)
        views = [
            augment(
                pixels,
                sample_view_params(
                    settings.batch_size, height, width, settings.augment, generator
                ).rows(share),
                settings.image_px,
                settings.augment,
            )
            for _ in range(2)
        ]
        if settings.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(*views)
        loss = simsiam_loss(outputs)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss_sum += loss.detach()  # summed on the device: no synchronisation per step
        std_sum += embedding_std(gather_rows(outputs["z1"], context))  # over the global batch
        n_steps += 1
        if on_step is not None:
            on_step()
    seconds = time.perf_counter() - started
    loss_value = loss_sum.item() / max(n_steps, 1)
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"SimSiam loss became {loss_value} in epoch {epoch + 1}")
    return {
        "loss": mean_over_ranks(loss_value, context),
        "embedding_std": mean_over_ranks(std_sum.item() / max(n_steps, 1), context),
        "images_per_s": n_steps * settings.batch_size / seconds if seconds else float("nan"),
        "seconds": seconds,
    }


def pretrain(
    store_paths: Sequence[str | Path],
    scale: str,
    settings: SSLSettings,
    *,
    out_dir: str | Path,
    state_dir: str | Path,
    progress: bool = True,
) -> list[dict]:
    """Pretrain the ``scale`` encoder on every patch of ``store_paths``; write ``out_dir``.

    ``out_dir`` receives ``encoder.safetensors`` (the backbone's state dict, timm names),
    ``train_log.tsv``, ``loss.png`` and ``config.yaml``; it appears complete or not at all.
    Returns the per-epoch log rows.
    """
    context = init_distributed(settings.device)
    try:
        return _pretrain(
            [Path(p) for p in store_paths],
            scale,
            settings,
            Path(out_dir),
            Path(state_dir),
            context,
            progress,
        )
    finally:
        shutdown(context)


def _pretrain(store_paths, scale, settings, out_dir, state_dir, context, progress) -> list[dict]:
    check_divisible(settings.batch_size, context)
    dataset = ScalePixels(store_paths, scale)
    torch.manual_seed(settings.seed)
    model = sync_batchnorm(build_simsiam(settings), context).to(context.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = make_optimiser(model, settings)
    fingerprint = settings.fingerprint(scale, store_paths)
    info = load_state(state_dir, model, optimiser, fingerprint)
    history = list(info["history"]) if info else []
    trained = wrap_ddp(model, context)
    sampler = EpochBatches(len(dataset), settings.batch_size, context, settings.seed)
    loader = pixel_loader(
        dataset,
        sampler,
        workers=settings.workers,
        pin_memory=context.device.type == "cuda",
    )
    log.info(
        "SimSiam %s at %s: %d patches, %d steps/epoch, %d process(es), device %s",
        settings.backbone,
        scale,
        len(dataset),
        len(sampler),
        context.world_size,
        context.device,
    )
    with _progress_bar(progress and context.is_main) as bar:
        task = bar.add_task(
            f"SimSiam {scale}",
            total=settings.epochs * len(sampler),
            status="",
            completed=len(history) * len(sampler),
        )
        for epoch in range(len(history), settings.epochs):
            lr = cosine_lr(settings.init_lr, epoch, settings.epochs)
            set_learning_rates(optimiser, lr, settings.init_lr)
            sampler.set_epoch(epoch)
            row = train_one_epoch(
                trained,
                loader,
                optimiser,
                settings,
                context,
                epoch,
                on_step=lambda: bar.advance(task),
            )
            history.append({"epoch": epoch + 1, "lr": lr, **row})
            status = f"loss={row['loss']:.4f} std={row['embedding_std']:.4f}"
            bar.update(task, status=status)
            log.info(
                "epoch %d/%d lr=%.4g %s %.0f img/s",
                epoch + 1,
                settings.epochs,
                lr,
                status,
                row["images_per_s"],
            )
            if context.is_main:
                save_state(
                    state_dir,
                    model,
                    optimiser,
                    {"fingerprint": fingerprint, "epochs_done": epoch + 1, "history": history},
                )
            barrier(context)
    if context.is_main:
        write_outputs(out_dir, unwrap(trained), history, settings, scale, store_paths, context)
        shutil.rmtree(state_dir, ignore_errors=True)
    barrier(context)
    return history


def _progress_bar(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(
        *columns,
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def write_outputs(out_dir, model: SimSiam, history, settings, scale, store_paths, context) -> None:
    """The backbone weights, the training log, a loss plot and the resolved settings."""
    backbone = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    metadata = safetensors_metadata(backbone=settings.backbone, scale=scale, epochs=settings.epochs)
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_file(backbone, str(tmp / "encoder.safetensors"), metadata=metadata)
        write_tsv(pd.DataFrame(history), tmp / "train_log.tsv")
        plot_training_curve(pd.DataFrame(history), tmp / "loss.png", title=f"SimSiam {scale}")
        write_yaml(
            {
                "ssl": json.loads(json.dumps(asdict(settings), default=list)),
                "scale": scale,
                "patch_stores": [str(p) for p in store_paths],
                "world_size": context.world_size,
                "device": str(context.device),
                "versions": {
                    "mmdiag": mmdiag.__version__,
                    "torch": str(torch.__version__),
                    "python": platform.python_version(),
                },
            },
            tmp / "config.yaml",
        )


def plot_training_curve(history: pd.DataFrame, path: Path, *, title: str) -> None:
    """Loss (left) and the embedding std collapse indicator (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, std_axis) = plt.subplots(1, 2, figsize=(8, 3), constrained_layout=True)
    loss_axis.plot(history["epoch"], history["loss"], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="SimSiam loss (min -1)", title=title)
    std_axis.plot(history["epoch"], history["embedding_std"], marker="o", color="tab:orange")
    std_axis.set(xlabel="epoch", ylabel="std of normalised z", title="collapse indicator")
    std_axis.set_ylim(bottom=0)
    figure.savefig(path, dpi=100)
    plt.close(figure)
