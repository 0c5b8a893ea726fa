"""Benchmark: the MHD-Net teacher's training step on CPU, with SHFM and with "w/o SHFM" fusion.

Builds :class:`~mmdiag.models.mhd.MHDTeacher` twice, with ``fusion="shfm"`` and with the
baseline ``fusion="concat"`` (the "w/o SHFM" ablation of Fig. 5: concatenation and a 1³
convolution), same seed, same batch, and measures, in one process (median of ``--repeats``
calls after ``--warmup`` calls; the two teachers' steps alternate):

- the full training step: :meth:`~mmdiag.models.mhd.MHDTeacher.loss` (eq. 4), backward and an
  Adam step, for both teachers, and the ratio SHFM / concat;
- per stage, the forward+backward time of each branch's stage (``B_R``, ``B_P``, ``B_F``) and
  of each fusion module (SHFM, and its gate convolution ``to_gate`` alone; the concat module).
  Each is timed by calling the submodule directly on its input stored from one forward of the
  teacher (not by hooks), the input requiring a gradient as in training (except the volumes
  fed to the stems), backward from a fixed random upstream gradient. Batch norm stays in
  training mode. The parts leave out the heads, the losses, the additions into ``B_F`` and
  Adam (timed alone, on the last step's gradients), so their sum is under the step;
- the FLOPs of SHFM's gate convolution, analytically: at every SHFM of the run, and at the
  paper's stage 1 (B 8, t 12, 56², κ 7, gate 7³), to check the issue's "~1.6 TFLOP".

Sizes: ``demo`` (default; the tests' demo teacher: batch 2, T 8, 32², widths 8/16/32/64, κ 3,
gate 3) and ``large`` (batch 2, T 12, 64², widths 16/32/64/128, κ 7, gate 7: the paper's κ and
gate, so SHFM's share of the time is closer to the paper's). One torch thread unless
``--threads`` says otherwise. Timings on a shared CPU are noisy.

    python benchmarks/mhd_teacher.py                  # demo size, under a minute
    python benchmarks/mhd_teacher.py --size large     # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mmdiag.models.mhd import BRANCHES, FUSED_STAGES, MHDTeacher, stage_frames


@dataclass(frozen=True)
class Size:
    batch: int
    frames: int
    side: int
    widths: tuple[int, int, int, int]
    kappa: int
    gate: int


SIZES = {
    "demo": Size(batch=2, frames=8, side=32, widths=(8, 16, 32, 64), kappa=3, gate=3),
    "large": Size(batch=2, frames=12, side=64, widths=(16, 32, 64, 128), kappa=7, gate=7),
}
#: The paper's stage 1 (24 × 224² input): B 8, t 12, 56², κ 7, gate 7³.
PAPER_STAGE1 = {"batch": 8, "frames": 12, "side": 56, "kappa": 7, "gate": 7}
N_CLASSES = 8


# ------------------------------------------------------------------------------ FLOPs


def gate_conv_flops(
    batch: int, frames: int, side: int, kappa: int, gate: int, *, valid_only: bool = False
) -> float:
    """Forward FLOPs (2 per multiply-add) of SHFM's ``to_gate`` at one stage.

    ``to_gate`` is a ``gate³`` convolution, padding ``gate // 2``, from ``C`` (``κ²t``
    channels) to ``t + 1`` gates, on the ``t × h × w`` grid:

        FLOPs = 2 · B · (t·h·w) · (κ²·t) · (t + 1) · gate³

    (the bias adds ``B·t·h·w·(t+1)``, left out). Dense counting includes the taps that fall on
    the zero padding, as a dense convolution computes them; with ``valid_only`` only the taps
    inside the volume count: each axis of size ``n`` contributes ``n·g - 2·Σ_{i=1}^{g//2} i``
    taps instead of ``n·g``. The backward (gradients of the input and the weights) is about
    twice the forward.
    """
    taps_per_axis = []
    for n in (frames, side, side):
        full = n * gate
        taps_per_axis.append(full - 2 * sum(range(1, gate // 2 + 1)) if valid_only else full)
    positions_times_taps = taps_per_axis[0] * taps_per_axis[1] * taps_per_axis[2]
    return 2.0 * batch * positions_times_taps * (kappa * kappa * frames) * (frames + 1)


# ------------------------------------------------------------------------------ timing


def time_ms(function: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``function`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


def make_batch(size: Size, generator: torch.Generator) -> dict[str, torch.Tensor]:
    shape = (size.batch, size.frames, size.side, size.side)
    return {
        "ct": torch.randn(size.batch, 1, *shape[1:], generator=generator),
        "wsi": torch.randn(size.batch, 3, *shape[1:], generator=generator),
        "label": torch.randint(0, N_CLASSES, (size.batch,), generator=generator),
    }


def make_teacher(size: Size, fusion: str, backbone: str) -> MHDTeacher:
    torch.manual_seed(0)
    return MHDTeacher(
        N_CLASSES,
        frames=size.frames,
        widths=size.widths,
        backbone=backbone,
        kernel_sizes=(size.kappa,) * len(FUSED_STAGES),
        fusion=fusion,
        gate_kernel=size.gate,
    ).train()


def step_ms(models: dict[str, MHDTeacher], batch: dict, repeats: int, warmup: int) -> dict:
    """ms of one training step (eq. 4, backward, Adam) of each model, and of its Adam update
    alone (key ``adam_<name>``). The models' steps alternate, so drift in the machine's load
    falls on all of them alike."""
    optimisers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}

    def step(name: str) -> float:
        started = time.perf_counter()
        optimisers[name].zero_grad(set_to_none=True)
        loss, _, _ = models[name].loss(batch)
        loss.backward()
        optimisers[name].step()
        return (time.perf_counter() - started) * 1e3

    times: dict[str, list[float]] = {name: [] for name in models}
    for call in range(warmup + repeats):
        for name in models:
            elapsed = step(name)
            if call >= warmup:
                times[name].append(elapsed)
    result = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    for name, optimiser in optimisers.items():  # on the last step's gradients
        result[f"adam_{name}"] = time_ms(optimiser.step, repeats, warmup)
        optimiser.zero_grad(set_to_none=True)
    return result


@torch.no_grad()
def stage_inputs(model: MHDTeacher, batch: dict) -> dict[tuple[str, int], tuple[torch.Tensor, ...]]:
    """The input of every stage and fusion module, as :meth:`MHDTeacher.forward` feeds them.

    Keys ``(branch, stage)`` with stage 0 the stem of ``B_R``/``B_P``; ``("fuse", s)`` holds
    ``(f_R^s, f_P^s)``; ``B_F``'s stage ``s`` (paper numbering, 2-4) is its module index
    ``s - 2``.
    """
    inputs: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {
        ("radiology", 0): (batch["ct"],),
        ("pathology", 0): (batch["wsi"],),
    }
    f_r, f_p = model.radiology.stem(batch["ct"]), model.pathology.stem(batch["wsi"])
    x_f = None
    for stage in range(1, 5):
        inputs[("radiology", stage)], inputs[("pathology", stage)] = (f_r,), (f_p,)
        f_r, f_p = model.radiology.stage(stage, f_r), model.pathology.stage(stage, f_p)
        if x_f is not None:
            inputs[("fusion", stage)] = (x_f,)
            x_f = model.fusion.stage(stage - 2, x_f)
        if stage in FUSED_STAGES:
            inputs[("fuse", stage)] = (f_r, f_p)
            f_f = model.fuse[stage - 1](f_r, f_p)
            x_f = f_f if x_f is None else x_f + f_f
    return inputs


def forward_backward_ms(
    function: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    *,
    input_grad: bool,
    repeats: int,
    warmup: int,
) -> float:
    """Forward + backward of ``function(*inputs)`` from a fixed random upstream gradient."""
    leaves = tuple(x.detach().clone().requires_grad_(input_grad) for x in inputs)
    with torch.no_grad():
        upstream = torch.randn_like(function(*leaves))

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        function(*leaves).backward(upstream)

    return time_ms(run, repeats, warmup)


def per_stage(model: MHDTeacher, batch: dict, repeats: int, warmup: int) -> dict:
    """Forward+backward ms of every branch stage and fusion module, keyed like stage_inputs."""
    inputs = stage_inputs(model, batch)
    times: dict = {}
    for (name, stage), xs in inputs.items():
        if name == "fuse":
            module: nn.Module = model.fuse[stage - 1]
            function = module
        else:
            branch = getattr(model, name)
            index = stage - 2 if name == "fusion" else stage

            def function(x, branch=branch, index=index):
                return branch.stage(index, x)

        times[(name, stage)] = forward_backward_ms(
            function, xs, input_grad=stage > 0, repeats=repeats, warmup=warmup
        )
        if name == "fuse" and hasattr(model.fuse[stage - 1], "to_gate"):
            shfm = model.fuse[stage - 1]
            with torch.no_grad():
                corr = shfm.correlation(*xs)
            times[("gate", stage)] = forward_backward_ms(
                shfm.to_gate, (corr,), input_grad=True, repeats=repeats, warmup=warmup
            )
    for parameter in model.parameters():
        parameter.grad = None
    return times


# ------------------------------------------------------------------------------ report


def cell(times: dict, key: tuple[str, int]) -> str:
    return f"{times[key]:9.2f}" if key in times else f"{'-':>9}"


def report(size: Size, shfm: dict, concat: dict, step: dict, backbone: str) -> None:
    t = stage_frames(size.frames)
    print(f"\nper stage, forward+backward ms (submodules called on stored inputs; {backbone})")
    header = f"{'stage':>6} {'t×h×w':>9} {'B_R':>9} {'B_P':>9} {'B_F':>9} {'SHFM':>9}"
    header += f" {'to_gate':>9} {'gate GF':>8} {'concat':>9}"
    print(header)
    side = ((size.side + 1) // 2 + 1) // 2  # stem, then stage 1 pooling: each ceil(n / 2)
    for stage in range(5):
        shape = "input" if stage == 0 else f"{t[stage - 1]}×{side}²"
        line = f"{stage:>6} {shape:>9}"
        for key in (("radiology", stage), ("pathology", stage), ("fusion", stage)):
            line += " " + cell(shfm, key)
        line += " " + cell(shfm, ("fuse", stage)) + " " + cell(shfm, ("gate", stage))
        if stage in FUSED_STAGES:
            flops = gate_conv_flops(size.batch, t[stage - 1], side, size.kappa, size.gate)
            line += f" {flops / 1e9:8.3g}"
        else:
            line += f" {'-':>8}"
        line += " " + cell(concat, ("fuse", stage))
        print(line)
        if stage > 0:
            side = (side + 1) // 2
    branches = sum(v for (name, _), v in shfm.items() if name in BRANCHES)
    shfm_total = sum(v for (name, _), v in shfm.items() if name == "fuse")
    gate_total = sum(v for (name, _), v in shfm.items() if name == "gate")
    concat_total = sum(v for (name, _), v in concat.items() if name == "fuse")
    print(
        f"{'sum':>6} {'':>9} {'branches':>9} {branches:9.2f} {'':>9} {shfm_total:9.2f}"
        f" {gate_total:9.2f} {'':>8} {concat_total:9.2f}"
    )
    print("(gate GF: analytical forward GFLOP of to_gate, dense; its backward is about 2x that)")

    print("\ntraining step (eq. 4 + backward + Adam), ms")
    print(f"  teacher with SHFM        {step['shfm']:9.2f}")
    print(f"  teacher w/o SHFM (concat){step['concat']:9.2f}")
    print(f"  ratio SHFM / concat      {step['shfm'] / step['concat']:9.2f}x")
    print(f"  of which Adam: SHFM {step['adam_shfm']:.2f}, concat {step['adam_concat']:.2f}")
    print(f"  SHFMs / SHFM step        {shfm_total / step['shfm']:9.1%}")
    print(f"  to_gate / SHFMs          {gate_total / shfm_total:9.1%}")
    parts = branches + shfm_total + step["adam_shfm"]
    print(f"  (parts + Adam) / step    {parts / step['shfm']:9.1%}")


def report_paper_flops() -> None:
    p = PAPER_STAGE1
    dense = gate_conv_flops(p["batch"], p["frames"], p["side"], p["kappa"], p["gate"])
    valid = gate_conv_flops(
        p["batch"], p["frames"], p["side"], p["kappa"], p["gate"], valid_only=True
    )
    channels = p["kappa"] ** 2 * p["frames"]
    weights = channels * (p["frames"] + 1) * p["gate"] ** 3
    print(
        f"\nSHFM gate convolution at the paper's stage 1 (B {p['batch']}, t {p['frames']}, "
        f"{p['side']}², C = κ²t = {channels} -> t+1 = {p['frames'] + 1}, {p['gate']}³): "
        f"{weights / 1e6:.2f} M weights"
    )
    print(f"  forward, dense (padding taps counted): {dense / 1e12:.2f} TFLOP per batch")
    print(f"  forward, taps inside the volume only:  {valid / 1e12:.2f} TFLOP per batch")
    print(f"  forward+backward (about 3x forward):   {3 * dense / 1e12:.2f} TFLOP per batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--backbone", choices=("resnet34", "resnet18"), default="resnet34")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per number")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        # One thread by default: on a busy machine, OpenMP threads waiting at barriers for a
        # descheduled sibling made small ops erratic (a 2 × 8 log_softmax took ~10 ms).
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    print(
        f"size {args.size}: batch {size.batch}, T {size.frames}, {size.side}², widths "
        f"{'/'.join(map(str, size.widths))}, κ {size.kappa}, gate {size.gate}³, {args.backbone}"
    )
    print(
        f"CPU, torch threads: {torch.get_num_threads()}, float32; median of {args.repeats} calls "
        f"after {args.warmup} warm-up calls (shared CPU: noisy)"
    )
    batch = make_batch(size, torch.Generator().manual_seed(0))
    models = {fusion: make_teacher(size, fusion, args.backbone) for fusion in ("shfm", "concat")}
    for fusion, model in models.items():
        n_parameters = sum(p.numel() for p in model.parameters())
        print(f"teacher {fusion}: {n_parameters / 1e6:.2f} M parameters")
    step = step_ms(models, batch, args.repeats, args.warmup)
    stages = {name: per_stage(m, batch, args.repeats, args.warmup) for name, m in models.items()}
    report(size, stages["shfm"], stages["concat"], step, args.backbone)
    report_paper_flops()


if __name__ == "__main__":
    main()
