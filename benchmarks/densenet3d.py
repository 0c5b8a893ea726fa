"""Benchmark: a training step of DeepGuide's inferior classifier, the 3D DenseNet.

One step is forward, cross-entropy, backward and an Adam update of
:class:`~mmdiag.models.guide.DenseNetVolumeClassifier`. In one process it times the plain
float32 step (the baseline) and, for the same model and batch:

- activation checkpointing of the dense blocks (less memory, one more forward per block);
- on a GPU, bfloat16 autocast with channels-last-3d volumes, with and without checkpointing,
  and each configuration's peak memory.

Each line prints the median step time and its ratio to the baseline's.

    python benchmarks/densenet3d.py                # the demo's network on demo crops (CPU)
    python benchmarks/densenet3d.py --paper        # DenseNet-121 on 4 x 140 x 220 x 220, batch 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from mmdiag.models.guide import DenseNetVolumeClassifier

DEMO = {"crop": (20, 28, 28), "batch": 8, "network": {"init_features": 16, "growth_rate": 8,
        "block_config": (3, 3, 3)}}  # fmt: skip
PAPER = {"crop": (140, 220, 220), "batch": 10, "network": {}}  # DenseNet-121 defaults
GIB = 2**30


def _step_times(model, volume, label, repeats: int) -> tuple[float, float]:
    """Median seconds of one training step and the peak memory (GiB, CUDA only)."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    device = volume.device
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = F.cross_entropy(model({"volume": volume}), label)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:  # the first step warms up (cuDNN algorithm search, allocations)
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="DenseNet-121 at the paper's crops")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels", type=int, default=4, help="MR sequences (ALL: 4)")
    arguments = parser.parse_args()
    scale = PAPER if arguments.paper else DEMO
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    volume = torch.randn(scale["batch"], arguments.channels, *scale["crop"], device=device)
    label = torch.randint(3, (scale["batch"],), device=device)
    configurations = {"fp32": {"precision": "fp32", "channels_last": False}}
    configurations["fp32 + checkpointing"] = configurations["fp32"] | {"checkpointing": True}
    if device.type == "cuda":
        configurations["bf16 + channels-last"] = {"precision": "bf16", "channels_last": True}
        configurations["bf16 + channels-last + checkpointing"] = configurations[
            "bf16 + channels-last"
        ] | {"checkpointing": True}
    print(f"device {device}, batch {scale['batch']} x {arguments.channels} x {scale['crop']}")
    baseline = None
    for name, options in configurations.items():
        torch.manual_seed(0)
        model = DenseNetVolumeClassifier(arguments.channels, 3, **scale["network"], **options).to(
            device
        )
        seconds, peak = _step_times(model.train(), volume, label, arguments.repeats)
        baseline = baseline or seconds
        memory = "" if peak != peak else f", peak {peak:.2f} GiB"
        speed = baseline / seconds
        print(f"{name:40s} {seconds * 1e3:9.1f} ms/step  speed x{speed:.2f} of fp32{memory}")


if __name__ == "__main__":
    main()
