"""Benchmark: SimSiam pretraining and feature extraction, real pipeline vs on-device ceiling.

Writes temporary patch stores of random smooth textures with noise (``--patches`` 256-px
patches, zstd, one chunk per patch, as the patching stage writes them) and measures, in
images/s, in one process:

- pretraining, real: zarr stores -> DataLoader workers decoding uint8 batches -> two augmented
  views on the device (:func:`mmdiag.ssl.augment.augment`) -> forward/backward/SGD step, i.e.
  :func:`mmdiag.ssl.train.train_one_epoch` fed by the loader over consecutive epochs;
- pretraining, ceiling: the same model and optimiser fed with two random normalised views
  already on the device (no loading, no augmentation);
- feature extraction, real: :func:`mmdiag.features.extract.extract_cohort_features` on all
  stores (loading the encoder file, decoding, embedding, writing the feature stores);
- feature extraction, ceiling: the same encoder on random normalised batches on the device.

The ratio real/ceiling says how much the data path costs. On a GPU both precisions are measured
(float32, and bfloat16 autocast with channels-last) unless ``--amp``/``--channels-last`` fix one.

    python benchmarks/ssl_throughput.py                 # GPU: resnet50, 224 px, batch 128
    python benchmarks/ssl_throughput.py --quick         # CPU: resnet18, a couple of minutes
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmdiag.features.extract import ExtractSettings, extract_cohort_features, load_encoder
from mmdiag.patching.store import write_patch_store
from mmdiag.ssl.augment import AugmentSettings
from mmdiag.ssl.data import EpochBatches, ScalePixels, pixel_loader
from mmdiag.ssl.simsiam import embedding_std, simsiam_loss
from mmdiag.ssl.train import SSLSettings, build_simsiam, make_optimiser, train_one_epoch
from mmdiag.training.distributed import DistContext

SCALE = "20x"


# ----------------------------------------------------------------------------- data


def texture_patches(n: int, patch_px: int, generator: torch.Generator) -> np.ndarray:
    """uint8 (n, px, px, 3): a random 8 x 8 colour field, bilinearly upsampled, plus noise."""
    coarse = torch.rand(n, 3, 8, 8, generator=generator) * 160 + 60
    smooth = F.interpolate(coarse, size=(patch_px, patch_px), mode="bilinear")
    noisy = smooth + 12 * torch.randn(smooth.shape, generator=generator)
    return noisy.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def write_texture_stores(folder: Path, n_patches: int, patch_px: int, n_stores: int) -> list:
    """``n_stores`` patch stores sharing ``n_patches`` textured patches at scale 20x."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index, count in enumerate(np.array_split(np.arange(n_patches), n_stores)):
        n = len(count)
        grid = pd.DataFrame(
            {
                f"x_{SCALE}": np.arange(n) * patch_px,
                f"y_{SCALE}": np.zeros(n, dtype=int),
                f"size_{SCALE}": np.full(n, patch_px),
                "tissue_fraction": np.ones(n),
                "patch_id": np.arange(n),
            }
        )
        pixels = np.concatenate(
            [texture_patches(len(rows), patch_px, generator) for rows in np.array_split(count, 8)]
        )
        path = folder / f"slide{index}.zarr"
        write_patch_store(path, grid, attrs={"slide": path.name}, pixels={SCALE: pixels})
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- timing


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function, *args) -> float:
    """Seconds of ``function(*args)``, device work included."""
    synchronise(device)
    started = time.perf_counter()
    function(*args)
    synchronise(device)
    return time.perf_counter() - started


def endless_batches(loader, sampler: EpochBatches):
    """The loader's batches over consecutive epochs, as pretraining sees them."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def pretrain_rates(stores, settings: SSLSettings, steps: int, warmup: int) -> tuple[float, float]:
    """Images/s of pretraining steps fed by the real loader, and by on-device tensors."""
    device = torch.device(settings.device)
    context = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    torch.manual_seed(settings.seed)
    model = build_simsiam(settings).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = make_optimiser(model, settings)
    real = real_pretrain_rate(stores, model, optimiser, settings, context, steps, warmup)
    return real, ceiling_pretrain_rate(model, optimiser, settings, device, steps, warmup)


def real_pretrain_rate(stores, model, optimiser, settings, context, steps, warmup) -> float:
    """:func:`train_one_epoch` fed by the loader; its workers stop when this returns."""
    dataset = ScalePixels(stores, SCALE)
    sampler = EpochBatches(len(dataset), settings.batch_size, context, settings.seed)
    loader = pixel_loader(
        dataset, sampler, workers=settings.workers, pin_memory=context.device.type == "cuda"
    )
    batches = endless_batches(loader, sampler)

    def run(n_steps: int) -> None:
        train_one_epoch(model, itertools.islice(batches, n_steps), optimiser, settings, context, 0)

    timed(context.device, run, warmup)  # starts the workers, warms the allocator and kernels
    rate = steps * settings.batch_size / timed(context.device, run, steps)
    batches.close()
    return rate


def ceiling_pretrain_rate(model, optimiser, settings, device, steps, warmup) -> float:
    """The same steps on two random normalised views already on the device."""
    shape = (settings.batch_size, 3, settings.image_px, settings.image_px)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    views = [
        torch.randn(shape, device=device).contiguous(memory_format=memory_format) for _ in range(2)
    ]
    use_amp = settings.amp and device.type == "cuda"

    def run(n_steps: int) -> None:
        model.train()
        loss_sum = torch.zeros((), device=device)
        std_sum = torch.zeros((), device=device)
        for _ in range(n_steps):  # train_one_epoch's step without loading and augmenting
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = model(*views)
            loss = simsiam_loss(outputs)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum += loss.detach()
            std_sum += embedding_std(outputs["z1"])
        loss_sum.item()

    timed(device, run, warmup)
    return steps * settings.batch_size / timed(device, run, steps)


def extract_rates(stores, weights: Path, settings: ExtractSettings, folder: Path, patch_px: int):
    """Patches/s of feature extraction from the stores, and of the encoder on device tensors."""
    device = torch.device(settings.device)
    ids = [store.stem for store in stores]

    def real(paths: list, out_dir: Path) -> None:
        extract_cohort_features(
            paths, ids[: len(paths)], {SCALE: weights}, settings, out_dir=out_dir, progress=False
        )

    timed(device, real, stores[:1], folder / "warmup")
    n_patches = sum(len(ScalePixels([store], SCALE)) for store in stores)
    real_rate = n_patches / timed(device, real, stores, folder / "features")

    encoder = load_encoder(settings.backbone, weights, device, settings)
    side = settings.image_px or patch_px
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    images = torch.randn(settings.batch_size, 3, side, side, device=device)
    images = images.contiguous(memory_format=memory_format)
    n_batches = max(1, n_patches // settings.batch_size)
    use_amp = settings.amp and device.type == "cuda"

    @torch.no_grad()
    def ceiling(batches: int) -> None:
        for _ in range(batches):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                features = encoder(images)
            features.float().cpu()

    timed(device, ceiling, 1)
    ceiling_rate = n_batches * settings.batch_size / timed(device, ceiling, n_batches)
    return real_rate, ceiling_rate


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--backbone", help="timm name (default resnet50 on GPU, resnet18 on CPU)")
    parser.add_argument("--image-px", type=int, default=224, help="SimSiam crop side")
    parser.add_argument("--patch-px", type=int, default=256, help="stored patch side")
    parser.add_argument("--patches", type=int, help="patches in all stores (2048; 128 quick)")
    parser.add_argument("--stores", type=int, default=4, help="patch stores (slides)")
    parser.add_argument("--batch", type=int, help="pretraining batch (128 GPU, 32 CPU, 16 quick)")
    parser.add_argument("--extract-batch", type=int, help="extraction batch (256 GPU, 64 CPU)")
    parser.add_argument("--steps", type=int, help="timed pretraining steps (30; 2 quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (5; 1 quick)")
    parser.add_argument("--workers", type=int, help="loader workers (min(8, cpus); 2 on CPU)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small run for a CPU machine")
    return parser.parse_args()


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the device and on --quick."""
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    args.device = "cuda" if cuda else "cpu"
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.patches = args.patches or (128 if args.quick else 2048)
    args.stores = min(args.stores, args.patches)
    args.batch = args.batch or (128 if cuda else 16 if args.quick else 32)
    args.extract_batch = args.extract_batch or (256 if cuda else 64)
    args.steps = args.steps or (2 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.workers = args.workers if args.workers is not None else (
        min(8, os.cpu_count() or 1) if cuda else 2
    )  # fmt: skip
    if args.amp is None and args.channels_last is None:
        args.configs = [(False, False), (True, True)] if cuda else [(False, False)]
    else:  # autocast is only used on GPUs (as in training and extraction)
        args.configs = [(bool(args.amp) and cuda, bool(args.channels_last))]
    return args


def main() -> None:
    args = resolve(parse_args())
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{os.cpu_count()}"
    print(
        f"device {name}, torch threads {torch.get_num_threads()}, backbone {args.backbone}, "
        f"{args.patches} patches of {args.patch_px} px in {args.stores} stores, SimSiam crops "
        f"{args.image_px} px, batch {args.batch} (extraction {args.extract_batch}), "
        f"{args.workers} workers, {args.steps} timed steps after {args.warmup}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-ssl-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        stores = write_texture_stores(tmp, args.patches, args.patch_px, args.stores)
        print(f"patch stores written in {time.perf_counter() - started:.1f} s")
        for amp, channels_last in args.configs:
            label = ("bf16" if amp else "fp32") + (" channels-last" if channels_last else "")
            settings = SSLSettings(
                backbone=args.backbone, image_px=args.image_px, batch_size=args.batch,
                workers=args.workers, amp=amp, channels_last=channels_last, device=args.device,
                epochs=1, augment=AugmentSettings(),
            )  # fmt: skip
            real, ceiling = pretrain_rates(stores, settings, args.steps, args.warmup)
            rows.append((label, "pretrain (img/s)", real, ceiling))
            print(f"{label}: pretraining {real:.1f} img/s, ceiling {ceiling:.1f} img/s")

            weights = tmp / "encoder.safetensors"
            backbone = build_simsiam(settings).backbone.state_dict()  # random weights will do
            save_file({k: v.contiguous() for k, v in backbone.items()}, str(weights))
            extract = ExtractSettings(
                backbone=args.backbone, batch_size=args.extract_batch, workers=args.workers,
                amp=amp, channels_last=channels_last, device=args.device,
            )  # fmt: skip
            real, ceiling = extract_rates(stores, weights, extract, tmp, args.patch_px)
            rows.append((label, "extract (patches/s)", real, ceiling))
            print(f"{label}: extraction {real:.1f} patches/s, ceiling {ceiling:.1f} patches/s")

    print(f"\n{'precision':<20} {'stage':<20} {'real':>10} {'ceiling':>10} {'real/ceiling':>13}")
    for label, stage, real, ceiling in rows:
        print(f"{label:<20} {stage:<20} {real:>10.1f} {ceiling:>10.1f} {real / ceiling:>13.2f}")


if __name__ == "__main__":
    main()
