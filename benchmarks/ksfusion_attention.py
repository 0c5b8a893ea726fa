"""Benchmark: KS-Fusion's CM-Deform attention, fused kernel versus materialised scores.

One forward + backward of the two CM-Deform streams of :class:`mmdiag.models.ksfusion.KSFusion`
(tumour and microenvironment: teacher, offsets, deformable sampling, multi-head attention of
every grid cell's query over the H_G x W_G deformed keys, W_o, masked pooling) at the paper's
sizes: a 50 x 50 grid of 1024-d patch features, 8 heads x 64, 8 offset groups. Two ways:

- baseline: :func:`~mmdiag.models.ksfusion.explicit_attention`, softmax(Q K^T / sqrt(d)) V
  with the (H W) x (H_G W_G) score matrix of every head stored for the backward pass;
- ours: :func:`~mmdiag.models.ksfusion.fused_attention`, torch's
  ``scaled_dot_product_attention`` (the model's path), which does not keep the scores.

Each way runs in a fresh process (so one's peak does not hide the other's) on the CPU, or on
CUDA with ``--device cuda``. Printed: the peak memory of the forward + backward above what the
process held before it (VmHWM on the CPU, ``max_memory_allocated`` on CUDA), the median
seconds of a forward + backward, and the ratios baseline / ours.

The paper trains with batch 8; the default here is batch 2 so that a 2-core CPU finishes in a
few minutes (the score matrices grow linearly with the batch).

    python benchmarks/ksfusion_attention.py                # B 2, 50 x 50 grid
    python benchmarks/ksfusion_attention.py --batch 8      # the paper's batch
    python benchmarks/ksfusion_attention.py --quick        # B 2, 16 x 16 grid, 256-d features
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
import torch
from mmdiag.models.ksfusion import DeformableCrossAttention, explicit_attention, fused_attention

settings = json.loads(sys.argv[1])
device = torch.device(settings["device"])
torch.manual_seed(0)
side, batch, dim = settings["grid"], settings["batch"], settings["in_dim"]

def peak_bytes():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

streams = [
    DeformableCrossAttention(dim, settings["n_genes"], grid_size=(side, side), dropout=0.0)
    for _ in range(2)
]
for stream in streams:
    stream.attend = explicit_attention if settings["way"] == "explicit" else fused_attention
    stream.to(device)
mask = (torch.rand(batch, 1, side, side, device=device) > 0.1).float()
grid = torch.randn(batch, dim, side, side, device=device) * mask
genes = torch.randn(batch, settings["n_genes"], device=device)

def step():
    total = sum(s(grid, mask, genes)["z"].square().sum() for s in streams)
    total.backward()
    for stream in streams:
        stream.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)

if device.type == "cuda":
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
before = peak_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
started = time.perf_counter()
step()  # the first step's peak is the one measured
first = time.perf_counter() - started
grown = peak_bytes() - before
times = []
for _ in range(settings["repeats"]):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
seconds = sorted(times)[len(times) // 2] if times else first
print(json.dumps({"peak_bytes": grown, "seconds": seconds}))
"""


def measure(way: str, args: argparse.Namespace) -> dict:
    settings = {
        "way": way,
        "device": args.device,
        "grid": args.grid,
        "batch": args.batch,
        "in_dim": args.in_dim,
        "n_genes": 59,
        "repeats": args.repeats,
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(settings)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="slides per batch (paper: 8)")
    parser.add_argument("--grid", type=int, default=50, help="grid side, H = W = H_G = W_G")
    parser.add_argument("--in-dim", type=int, default=1024, help="patch feature width D")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="16 x 16 grid, D 256: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.grid, args.in_dim = 16, 256
    cells = args.grid**2
    print(
        f"CM-Deform, 2 streams, B {args.batch}, {args.grid}x{args.grid} grid "
        f"({cells} queries x {cells} deformed keys), 8 heads x 64, D {args.in_dim}, "
        f"{args.device}; one forward + backward"
    )
    explicit = measure("explicit", args)
    fused = measure("fused", args)
    for name, result in (("explicit scores (baseline)", explicit), ("fused SDPA (ours)", fused)):
        print(
            f"  {name:28} peak +{result['peak_bytes'] / 2**20:8.0f} MiB  {result['seconds']:7.3f} s"
        )
    print(
        f"  memory explicit/fused {explicit['peak_bytes'] / max(fused['peak_bytes'], 1):.2f}x, "
        f"time explicit/fused {explicit['seconds'] / fused['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
