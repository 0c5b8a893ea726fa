"""Benchmark: MHD-Net's per-frame 3D involution, the Triton kernel versus the unfold reference.

For each SHFM stage at MHD-Net's paper scale (B 8; stage 1: C 256, T 12, 56x56; stage 2:
C 320, T 6, 28x28; stage 3: C 448, T 3, 14x14), each dtype and each kernel size κ (7 at every
stage, and the authors' code's 5 and 3 at stages 2 and 3) it measures, in one process:

- forward ms and forward+backward ms of :func:`~mmdiag.kernels.involution.involution3d_reference`
  (``F.unfold`` per frame: κ² copies of x) and of the Triton kernel;
- the extra peak memory of forward+backward beyond the inputs and outputs (GiB);
- the ratio of the reference's time to the kernel's;
- the ratio of the kernel's forward to the memory floor: the bytes it must move (read x and
  the kernel, write y) at the device-to-device copy bandwidth measured here.

On a machine without CUDA it times the reference only (at ``--quick`` sizes unless told
otherwise) and says so; the kernel's CPU path is Triton's interpreter, which checks indexing,
not speed.

    python benchmarks/involution.py                 # GPU: the paper-scale table
    python benchmarks/involution.py --quick         # CPU: the reference at small sizes
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmdiag.kernels.involution import (
    involution3d_reference,
    involution3d_triton,
    triton_available,
)

GIB = 2**30


@dataclass(frozen=True)
class Stage:
    name: str
    channels: int
    frames: int
    side: int
    kernel_sizes: tuple[int, ...]


PAPER_STAGES = (
    Stage("stage 1", 256, 12, 56, (7,)),
    Stage("stage 2", 320, 6, 28, (7, 5)),
    Stage("stage 3", 448, 3, 14, (7, 3)),
)
QUICK_STAGES = (
    Stage("stage 1 (quick)", 32, 4, 28, (7,)),
    Stage("stage 2 (quick)", 40, 3, 14, (7, 5)),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``function`` in milliseconds, after one warm-up call."""
    function()
    synchronise(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronise(device)
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, n_bytes: int = 2 * GIB) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    source = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device, repeats=10)
    return 2 * n_bytes / (ms / 1e3)


def inputs(stage: Stage, kappa: int, batch: int, dtype, device, generator):
    """x (B, C, T, H, W) and kernel (B, T, κ², H, W), both requiring gradients."""
    shape_x = (batch, stage.channels, stage.frames, stage.side, stage.side)
    shape_k = (batch, stage.frames, kappa * kappa, stage.side, stage.side)
    x = torch.randn(shape_x, generator=generator).to(device, dtype).requires_grad_()
    kernel = (torch.randn(shape_k, generator=generator) / kappa).to(device, dtype)
    return x, kernel.requires_grad_()


def measure(operation, x, kernel, device, repeats: int) -> dict[str, float]:
    """Forward ms, forward+backward ms and extra peak GiB of ``operation(x, kernel)``."""
    upstream = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            return operation(x, kernel)

    def forward_backward():
        x.grad = kernel.grad = None
        operation(x, kernel).backward(upstream)

    forward_ms = time_ms(forward, device, repeats)
    step_ms = time_ms(forward_backward, device, repeats)
    extra_gib = float("nan")
    if device.type == "cuda":
        x.grad = kernel.grad = None
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward()
        synchronise(device)
        # the output and the two gradients are not "extra" (inputs and upstream are in baseline)
        resident = 2 * x.nbytes + kernel.nbytes
        extra_gib = (torch.cuda.max_memory_allocated(device) - baseline - resident) / GIB
    return {"forward_ms": forward_ms, "step_ms": step_ms, "extra_gib": max(extra_gib, 0.0)}


def floor_ms(x: torch.Tensor, kernel: torch.Tensor, bandwidth: float) -> float:
    """The forward's memory-bandwidth floor: read x and the kernel, write y."""
    return (2 * x.nbytes + kernel.nbytes) / bandwidth * 1e3


def run(stages, dtypes, batch: int, repeats: int, device: torch.device) -> list[dict]:
    use_kernel = device.type == "cuda" and triton_available()
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for stage in stages:
        for dtype_name in dtypes:
            for kappa in stage.kernel_sizes:
                x, kernel = inputs(stage, kappa, batch, DTYPES[dtype_name], device, generator)
                row = {"stage": stage.name, "dtype": dtype_name, "kappa": kappa}
                reference = measure(involution3d_reference, x, kernel, device, repeats)
                row |= {f"unfold_{key}": value for key, value in reference.items()}
                if use_kernel:
                    with torch.no_grad():
                        difference = involution3d_triton(x, kernel) - involution3d_reference(
                            x, kernel
                        )
                    row["max_abs_difference"] = difference.abs().max().item()
                    del difference
                    fused = measure(involution3d_triton, x, kernel, device, repeats)
                    row |= {f"triton_{key}": value for key, value in fused.items()}
                    row["speedup_step"] = reference["step_ms"] / fused["step_ms"]
                    row["forward_over_floor"] = fused["forward_ms"] / floor_ms(x, kernel, bandwidth)
                rows.append(row)
                print_row(row)
                del x, kernel
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def gib(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f} GiB"  # NaN: not measured (no CUDA)


def print_row(row: dict) -> None:
    text = f"{row['stage']:>16} {row['dtype']} κ={row['kappa']}: unfold fwd "
    text += f"{row['unfold_forward_ms']:.2f} ms, fwd+bwd {row['unfold_step_ms']:.2f} ms, "
    text += f"extra {gib(row['unfold_extra_gib'])}"
    if "triton_step_ms" in row:
        text += (
            f" | triton fwd {row['triton_forward_ms']:.3f} ms, fwd+bwd "
            f"{row['triton_step_ms']:.3f} ms, extra {gib(row['triton_extra_gib'])}"
            f" | fwd+bwd {row['speedup_step']:.1f}x faster, fwd {row['forward_over_floor']:.2f}x"
            f" the memory floor | max |Δy| {row['max_abs_difference']:.2e}"
        )
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stages (CPU default)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default 8; quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per number")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    quick = args.quick or device.type == "cpu"
    stages = QUICK_STAGES if quick else PAPER_STAGES
    batch = args.batch or (2 if quick else 8)
    repeats = args.repeats or (3 if device.type == "cpu" else 20)
    dtypes = args.dtypes or (["fp32"] if device.type == "cpu" else ["fp32", "bf16"])
    if device.type != "cuda":
        print(
            "no CUDA device: timing the unfold reference only (the Triton kernel runs on a GPU; "
            "on CPU only its interpreter, which checks indexing, not speed)"
        )
    print(f"device {device}, batch {batch}, {repeats} timed calls per number (median)")
    run(stages, dtypes, batch, repeats, device)


if __name__ == "__main__":
    main()
