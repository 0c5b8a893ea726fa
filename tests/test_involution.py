"""Per-frame 3D involution (mmdiag.kernels.involution): reference, Triton kernels, dispatcher.

The reference is checked against a direct loop over the taps and by ``gradcheck``; the Triton
kernels (values, grad x and grad kernel) against the reference. Tests named ``test_triton_*``
need a Triton runtime: a CUDA device, or Triton's CPU interpreter. Triton decides whether a
kernel is interpreted when the kernel module is imported, so on a machine without CUDA
:func:`test_interpreter_runs_the_triton_tests` runs those tests again in a fresh
``pytest`` process with ``TRITON_INTERPRET=1`` (and reports its output when they fail).

Tolerances against the fp32 reference of the same (rounded) inputs: fp32 ``1e-5``. In bf16
and fp16 the kernels accumulate in fp32 and round once to the dtype, so the difference is one
rounding, at most the unit roundoff ``u`` times the value (bf16 ``u = 2**-8``, fp16
``u = 2**-11``); the tests allow ``2u`` relative plus ``1e-5`` absolute (fp32 summation and
fp16 subnormals).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmdiag.kernels import involution
from mmdiag.kernels.involution import (
    BACKEND_ENV,
    BLOCK_C,
    GRAD_K_BLOCK_C,
    involution3d,
    involution3d_reference,
    involution3d_triton,
    kernel_size_of,
    resolve_backend,
    triton_available,
    triton_interpreted,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = triton_interpreted()
TRITON_RUNS = triton_available() and (HAS_CUDA or INTERPRETED)

requires_triton_runtime = pytest.mark.skipif(
    not TRITON_RUNS, reason="needs Triton with CUDA, or TRITON_INTERPRET=1 at import"
)
requires_plain_cpu = pytest.mark.skipif(
    INTERPRETED, reason="Triton kernels run on CPU here (TRITON_INTERPRET=1)"
)
cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")

#: Devices of the reference tests.
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
#: Devices of the Triton tests: CPU only through the interpreter.
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="not interpreted")),
    pytest.param("cuda", marks=cuda),
]

FP32 = {"rtol": 1e-5, "atol": 1e-5}
LOW_PRECISION = {
    torch.bfloat16: {"rtol": 2 * 2**-8, "atol": 1e-5},
    torch.float16: {"rtol": 2 * 2**-11, "atol": 1e-5},
}

# (B, C, T, H, W, κ): frames that are no multiple of the position block, single batch,
# channel and frame, channels beyond both channel blocks with a remainder, κ = 9 on frames
# smaller than the kernel, and a 1×1 frame.
TRITON_SHAPES = [
    (2, BLOCK_C + 4, 2, 13, 11, 3),
    (1, 1, 1, 7, 9, 5),
    (1, 3, 2, 9, 8, 7),
    (2, 2, 1, 5, 6, 9),
    (1, GRAD_K_BLOCK_C + 1, 1, 4, 3, 9),
    (1, 2, 3, 1, 1, 3),
]


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """Random ``x``, ``kernel`` and upstream gradient for ``(B, C, T, H, W, κ)``."""
    b, c, t, h, w, kappa = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, t, h, w, generator=gen)
    kernel = torch.randn(b, t, kappa * kappa, h, w, generator=gen)
    grad_y = torch.randn(b, c, t, h, w, generator=gen)
    return tuple(a.to(device=device, dtype=dtype) for a in (x, kernel, grad_y))


def _loop_involution(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The formula itself: a loop over the taps ``(u, v)`` of shifted, zero-padded frames."""
    kappa = math.isqrt(kernel.shape[2])
    p = kappa // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p))
    y = torch.zeros_like(x)
    for u in range(-p, p + 1):
        for v in range(-p, p + 1):
            tap = (u + p) * kappa + (v + p)
            shifted = padded[..., p + u : p + u + h, p + v : p + v + w]
            y += shifted * kernel[:, None, :, tap]
    return y


def _value_and_grads(fn, x, kernel, grad_y):
    """``fn(x, kernel)`` and its gradients in ``x`` and ``kernel`` for upstream ``grad_y``."""
    x = x.detach().requires_grad_()
    kernel = kernel.detach().requires_grad_()
    y = fn(x, kernel)
    grad_x, grad_k = torch.autograd.grad(y, (x, kernel), grad_y)
    return y.detach(), grad_x, grad_k


def _assert_matches_reference(x, kernel, grad_y, tolerance):
    """The Triton value and gradients equal the fp32 reference of the same inputs."""
    got = _value_and_grads(involution3d_triton, x, kernel, grad_y)
    want = _value_and_grads(involution3d_reference, x.float(), kernel.float(), grad_y.float())
    for name, a, b in zip(("y", "grad x", "grad kernel"), got, want, strict=True):
        assert a.dtype == x.dtype, name
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


# -------------------------------------------------------------------------- reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [(2, 3, 2, 6, 5, 3), (1, 2, 1, 7, 4, 5), (1, 1, 2, 4, 3, 9), (1, 2, 1, 3, 3, 1)]
)
def test_reference_matches_the_formula(device, shape):
    x, kernel, _ = _inputs(shape, dtype=torch.float64, device=device)
    y = involution3d_reference(x, kernel)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y, _loop_involution(x, kernel))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_gradcheck(device):
    x, kernel, _ = _inputs((1, 2, 2, 4, 5, 3), dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(
        involution3d_reference, (x.requires_grad_(), kernel.requires_grad_())
    )


@pytest.mark.parametrize("device", DEVICES)
def test_reference_of_non_contiguous_inputs(device):
    x, kernel, _ = _inputs((2, 3, 2, 5, 4, 3), device=device)
    x_view = x.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(involution3d_reference(x_view, kernel), _loop_involution(x, kernel))


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("x_shape", "kernel_shape", "match"),
    [
        ((1, 2, 5, 5), (1, 1, 9, 5, 5), "input must be 5-D"),
        ((1, 2, 1, 5, 5), (1, 9, 5, 5), "kernel must be 5-D"),
        ((1, 2, 1, 5, 5), (1, 1, 8, 5, 5), "must be κ² for some κ, got 8"),
        ((1, 2, 1, 5, 5), (1, 1, 4, 5, 5), "κ must be odd, got κ=2"),
        ((2, 2, 1, 5, 5), (1, 1, 9, 5, 5), r"expected \(B, T, κ², H, W\) = \(2, 1, 9, 5, 5\)"),
        ((1, 2, 3, 5, 5), (1, 1, 9, 5, 5), "does not match input"),
        ((1, 2, 1, 5, 6), (1, 1, 9, 5, 5), "does not match input"),
    ],
)
@pytest.mark.parametrize("fn", [involution3d_reference, involution3d_triton, involution3d])
def test_bad_shapes_raise(fn, x_shape, kernel_shape, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(x_shape), torch.zeros(kernel_shape))


def test_mismatched_dtypes_raise():
    with pytest.raises(ValueError, match="must share dtype and device"):
        involution3d_reference(torch.zeros(1, 1, 1, 3, 3), torch.zeros(1, 1, 9, 3, 3).double())


def test_kernel_size_of():
    assert kernel_size_of(torch.zeros(1, 1, 49, 2, 2)) == 7


@pytest.mark.parametrize("kappa", [1, 11])
def test_triton_kernel_sizes_are_3_to_9(kappa):
    x = torch.zeros(1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match=f"got κ={kappa}"):
        involution3d_triton(x, torch.zeros(1, 1, kappa * kappa, 4, 4))


# --------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_dispatch(monkeypatch, caplog):
    """No backend in the environment, the once-per-process log line not yet written."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(involution, "_backend_logged", False)
    caplog.set_level(logging.INFO, logger=involution.__name__)
    return caplog


def _backend_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "involution3d backend" in r.getMessage()]


@requires_plain_cpu
def test_auto_runs_the_reference_on_plain_cpu_and_logs_it_once(fresh_dispatch):
    x, kernel, _ = _inputs((1, 2, 1, 4, 4, 3))
    assert resolve_backend("cpu") == "reference"
    y = involution3d(x, kernel)
    involution3d(x, kernel)
    torch.testing.assert_close(y, involution3d_reference(x, kernel))
    (line,) = _backend_lines(fresh_dispatch)
    assert "backend: reference (auto:" in line and "TRITON_INTERPRET=1" in line


@requires_plain_cpu
def test_forcing_triton_on_plain_cpu_raises(fresh_dispatch, monkeypatch):
    x, kernel, _ = _inputs((1, 2, 1, 4, 4, 3))
    with pytest.raises(RuntimeError, match="'triton' requested but tensors are on cpu"):
        resolve_backend("cpu", "triton")
    with pytest.raises(RuntimeError, match="'triton' requested"):
        involution3d(x, kernel, backend="triton")
    with pytest.raises(RuntimeError, match="Triton involution cannot run: tensors are on cpu"):
        involution3d_triton(x, kernel)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="'triton' requested"):
        involution3d(x, kernel)


def test_without_triton_auto_is_the_reference_and_forcing_raises(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(involution, "triton_available", lambda: False)
    assert resolve_backend("cuda") == "reference"
    with pytest.raises(RuntimeError, match="'triton' requested but Triton cannot be imported"):
        resolve_backend("cuda", "triton")


def test_backend_from_argument_and_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend("cuda") == "reference"
    monkeypatch.setenv(BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match=f"backend \\({BACKEND_ENV}\\) must be one of .* 'gpu'"):
        resolve_backend("cpu")
    assert resolve_backend("cpu", "reference") == "reference"
    with pytest.raises(ValueError, match=r"backend \(argument\) must be one of .* 'Triton'"):
        resolve_backend("cpu", "Triton")


def test_auto_falls_back_to_the_reference_for_other_kernel_sizes(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(involution, "_triton_problem", lambda device: None)  # Triton "runs"
    x, kernel, _ = _inputs((1, 2, 1, 6, 6, 11))
    assert resolve_backend("cpu") == "triton"
    torch.testing.assert_close(involution3d(x, kernel), _loop_involution(x, kernel))
    assert "reference (auto: no Triton kernel for κ=11)" in _backend_lines(fresh_dispatch)[0]


# ----------------------------------------------------------------------- Triton kernels


@requires_triton_runtime
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_fp32(device, shape):
    _assert_matches_reference(*_inputs(shape, device=device), FP32)


@requires_triton_runtime
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_low_precision_accumulates_in_fp32(device, dtype):
    x, kernel, grad_y = _inputs((2, BLOCK_C + 2, 2, 9, 11, 5), dtype=dtype, device=device)
    _assert_matches_reference(x, kernel, grad_y, LOW_PRECISION[dtype])


@requires_triton_runtime
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_reads_non_contiguous_inputs(device):
    b, c, t, h, w, kappa = 2, 5, 2, 7, 6, 3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, c, h, w, generator=gen).to(device).permute(0, 2, 1, 3, 4)
    wide = torch.randn(b, t, 2 * kappa * kappa, h, w + 3, generator=gen).to(device)
    kernel = wide[:, :, ::2, :, 1 : w + 1]
    grad_y = torch.randn(w, h, t, c, b, generator=gen).to(device).permute(4, 3, 2, 1, 0)
    assert not (x.is_contiguous() or kernel.is_contiguous() or grad_y.is_contiguous())
    _assert_matches_reference(x, kernel, grad_y, FP32)


@requires_triton_runtime
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_gradient_of_one_input(device):
    x, kernel, grad_y = _inputs((1, 3, 1, 5, 5, 3), device=device)
    x.requires_grad_()
    (grad_x,) = torch.autograd.grad(involution3d_triton(x, kernel), x, grad_y)
    want = _value_and_grads(involution3d_reference, x, kernel, grad_y)[1]
    torch.testing.assert_close(grad_x, want, **FP32)


@requires_triton_runtime
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_is_what_auto_runs(device, fresh_dispatch, monkeypatch):
    calls = []

    def counted(x, kernel):
        calls.append(x.shape)
        return involution3d_triton(x, kernel)

    monkeypatch.setattr(involution, "involution3d_triton", counted)
    x, kernel, _ = _inputs((1, 2, 1, 4, 5, 3), device=device)
    assert resolve_backend(device) == "triton"
    torch.testing.assert_close(involution3d(x, kernel), involution3d_reference(x, kernel), **FP32)
    assert len(calls) == 1
    assert "backend: triton (auto: Triton on" in _backend_lines(fresh_dispatch)[0]


# ------------------------------------------------------------------------ interpreter run


@pytest.mark.skipif(TRITON_RUNS, reason="the Triton tests run in this process")
@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_interpreter_runs_the_triton_tests():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(BACKEND_ENV, None)
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, "-k", "test_triton_", "--tb=short"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or " passed" not in result.stdout:
        pytest.fail(
            f"Triton tests under TRITON_INTERPRET=1 failed (exit {result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
