r"""Per-frame 3D involution (MHD-Net's SHFM module): Triton kernels and a PyTorch reference.

For a clip ``x`` of shape ``(B, C, T, H, W)`` and a generated kernel of shape
``(B, T, κ², H, W)`` (κ odd), the involution is

.. math::

    y[b, c, t, h, w] = \sum_{u, v = -κ//2}^{κ//2}
        x[b, c, t, h + u, w + v] \; k[b, t, (u + κ//2) κ + (v + κ//2), h, w]

with zeros outside the frame. Every frame and position has its own κ×κ kernel, shared by all
channels; frames do not mix. ``y`` has the shape of ``x``.

The reference (:func:`involution3d_reference`) unfolds every frame into its κ² shifted copies,
so it holds a ``κ²``-times larger intermediate than ``x``. The Triton kernels
(:func:`involution3d_triton`) never build that tensor: the forward pass and both backward
passes read shifted, masked tiles of their inputs straight from memory and accumulate in fp32.

:func:`involution3d` picks one of the two (:func:`resolve_backend`): the argument ``backend``
or the environment variable ``MMDIAG_INVOLUTION`` chooses ``"auto"`` (default),
``"triton"`` or ``"reference"``. ``"auto"`` runs Triton on CUDA tensors, and on CPU tensors
too when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before this module is
imported: Triton decides when a kernel is defined whether it runs interpreted), else the
reference. The choice and its reason are logged once per process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still runs
    triton = None
    tl = None

log = logging.getLogger(__name__)

#: Values of the ``backend`` argument and of :data:`BACKEND_ENV`.
BACKENDS = ("auto", "triton", "reference")
#: Environment variable that chooses the backend when the argument is not given.
BACKEND_ENV = "MMDIAG_INVOLUTION"
#: Kernel sizes the Triton kernels are built for (κ is a compile-time constant).
TRITON_KERNEL_SIZES = (3, 5, 7, 9)
#: Tile of the forward and grad-x kernels: channels × flattened positions of one frame.
BLOCK_C = 16
BLOCK_HW = 64
#: Tile of the grad-kernel reduction: channels summed per step × positions.
GRAD_K_BLOCK_C = 32
GRAD_K_BLOCK_HW = 64
NUM_WARPS = 4

_backend_logged = False


def _jit(fn):
    """``triton.jit`` when Triton imports; else the kernel stays a plain, never-launched
    function, so this module imports (and the reference runs) without Triton."""
    return fn if triton is None else triton.jit(fn)


# ----------------------------------------------------------------------------- checks


def kernel_size_of(kernel: torch.Tensor) -> int:
    """κ of a ``(B, T, κ², H, W)`` involution kernel.

    Raises
    ------
    ValueError
        When ``kernel`` is not 5-D or its third axis is not the square of an odd number.
    """
    if kernel.dim() != 5:
        raise ValueError(
            f"involution kernel must be 5-D (B, T, κ², H, W), got shape {tuple(kernel.shape)}"
        )
    taps = kernel.shape[2]
    kappa = math.isqrt(taps)
    if kappa * kappa != taps:
        raise ValueError(f"involution kernel axis 2 must be κ² for some κ, got {taps} taps")
    if kappa % 2 == 0:
        raise ValueError(f"involution kernel size κ must be odd, got κ={kappa}")
    return kappa


def _check_inputs(x: torch.Tensor, kernel: torch.Tensor) -> int:
    """Check that ``x`` and ``kernel`` fit together and return κ."""
    if x.dim() != 5:
        raise ValueError(f"involution input must be 5-D (B, C, T, H, W), got {tuple(x.shape)}")
    kappa = kernel_size_of(kernel)
    b, _, t, h, w = x.shape
    expected = (b, t, kappa * kappa, h, w)
    if tuple(kernel.shape) != expected:
        raise ValueError(
            f"involution kernel of shape {tuple(kernel.shape)} does not match input "
            f"{tuple(x.shape)}: expected (B, T, κ², H, W) = {expected}"
        )
    if kernel.dtype != x.dtype or kernel.device != x.device:
        raise ValueError(
            f"involution input and kernel must share dtype and device, got {x.dtype} on "
            f"{x.device} and {kernel.dtype} on {kernel.device}"
        )
    return kappa


def _check_triton_kernel_size(kappa: int) -> None:
    if kappa not in TRITON_KERNEL_SIZES:
        raise ValueError(
            f"Triton involution supports κ in {TRITON_KERNEL_SIZES}, got κ={kappa}; "
            "use the reference backend"
        )


# -------------------------------------------------------------------------- reference


def involution3d_reference(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-frame involution by unfolding, differentiable through PyTorch's autograd.

    Frames go into the batch (``(B·T, C, H, W)``); :func:`torch.nn.functional.unfold` with
    zero padding κ//2 gives the κ² shifted copies of every frame, which are weighted by the
    kernel and summed. Runs on any device and floating dtype, for any odd κ, at the cost of a
    ``κ²·|x|`` intermediate.

    Parameters
    ----------
    x
        Input of shape ``(B, C, T, H, W)``.
    kernel
        Kernels of shape ``(B, T, κ², H, W)``, tap ``(u + κ//2)·κ + (v + κ//2)`` weighting
        the neighbour at offset ``(u, v)``; same dtype and device as ``x``.

    Returns
    -------
    torch.Tensor
        ``y`` of the shape of ``x`` (contiguous).
    """
    kappa = _check_inputs(x, kernel)
    b, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    shifted = F.unfold(frames, kappa, padding=kappa // 2).view(b * t, c, kappa * kappa, h, w)
    weights = kernel.reshape(b * t, 1, kappa * kappa, h, w)
    y = (shifted * weights).sum(dim=2)
    return y.view(b, t, c, h, w).permute(0, 2, 1, 3, 4).contiguous()


# ------------------------------------------------------------------------ Triton kernels


@_jit
def _involution_fwd_kernel(
    x_ptr,
    k_ptr,
    y_ptr,
    C,
    T,
    H,
    W,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,
    skb,
    skt,
    skk,
    skh,
    skw,
    syb,
    syc,
    syt,
    syh,
    syw,
    KAPPA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """y for one frame ``(b, t)``, a block of channels and a block of flattened positions."""
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    n_hw = tl.cdiv(H * W, BLOCK_HW)
    c_block = pid % n_c
    hw_block = (pid // n_c) % n_hw
    frame = pid // (n_c * n_hw)
    b = (frame // T).to(tl.int64)
    t = (frame % T).to(tl.int64)

    offs_hw = hw_block * BLOCK_HW + tl.arange(0, BLOCK_HW)
    in_hw = offs_hw < H * W
    h = (offs_hw // W).to(tl.int64)
    w = (offs_hw % W).to(tl.int64)
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < C
    x_rows = x_ptr + b * sxb + t * sxt + offs_c.to(tl.int64)[:, None] * sxc
    k_taps = k_ptr + b * skb + t * skt + h * skh + w * skw

    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for tap in tl.static_range(KAPPA * KAPPA):
        hh = h + (tap // KAPPA - KAPPA // 2)
        ww = w + (tap % KAPPA - KAPPA // 2)
        inside = in_hw & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        weight = tl.load(k_taps, mask=in_hw, other=0.0).to(tl.float32)
        xs = tl.load(
            x_rows + (hh * sxh + ww * sxw)[None, :],
            mask=in_c[:, None] & inside[None, :],
            other=0.0,
        )
        acc += xs.to(tl.float32) * weight[None, :]
        k_taps += skk

    y_ptrs = y_ptr + b * syb + t * syt + offs_c.to(tl.int64)[:, None] * syc
    y_ptrs += (h * syh + w * syw)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_c[:, None] & in_hw[None, :])


@_jit
def _involution_grad_x_kernel(
    gy_ptr,
    k_ptr,
    gx_ptr,
    C,
    T,
    H,
    W,
    sgb,
    sgc,
    sgt,
    sgh,
    sgw,
    skb,
    skt,
    skk,
    skh,
    skw,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,
    KAPPA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """grad x: the involution of grad y with the flipped kernel, read at the shifted position.

    ``gx[c, p] = Σ_d gy[c, p − d] · k[d, p − d]``: the position ``p − d`` whose output read
    ``x[p]`` through tap ``d``.
    """
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    n_hw = tl.cdiv(H * W, BLOCK_HW)
    c_block = pid % n_c
    hw_block = (pid // n_c) % n_hw
    frame = pid // (n_c * n_hw)
    b = (frame // T).to(tl.int64)
    t = (frame % T).to(tl.int64)

    offs_hw = hw_block * BLOCK_HW + tl.arange(0, BLOCK_HW)
    in_hw = offs_hw < H * W
    h = (offs_hw // W).to(tl.int64)
    w = (offs_hw % W).to(tl.int64)
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < C
    gy_rows = gy_ptr + b * sgb + t * sgt + offs_c.to(tl.int64)[:, None] * sgc
    k_tap = k_ptr + b * skb + t * skt

    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for tap in tl.static_range(KAPPA * KAPPA):
        hs = h - (tap // KAPPA - KAPPA // 2)
        ws = w - (tap % KAPPA - KAPPA // 2)
        inside = in_hw & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        weight = tl.load(k_tap + hs * skh + ws * skw, mask=inside, other=0.0).to(tl.float32)
        gys = tl.load(
            gy_rows + (hs * sgh + ws * sgw)[None, :],
            mask=in_c[:, None] & inside[None, :],
            other=0.0,
        )
        acc += gys.to(tl.float32) * weight[None, :]
        k_tap += skk

    gx_ptrs = gx_ptr + b * sxb + t * sxt + offs_c.to(tl.int64)[:, None] * sxc
    gx_ptrs += (h * sxh + w * sxw)[None, :]
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=in_c[:, None] & in_hw[None, :])


@_jit
def _involution_grad_kernel_kernel(
    gy_ptr,
    x_ptr,
    gk_ptr,
    C,
    T,
    H,
    W,
    sgb,
    sgc,
    sgt,
    sgh,
    sgw,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,
    skb,
    skt,
    skk,
    skh,
    skw,
    KAPPA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """grad kernel for one frame, one tap and a block of positions: ``Σ_c gy[c, p]·x[c, p + d]``.

    Loops over blocks of channels, accumulating the products in an fp32 tile that is summed
    over channels once at the end.
    """
    pid = tl.program_id(0)
    taps = KAPPA * KAPPA
    n_hw = tl.cdiv(H * W, BLOCK_HW)
    tap = pid % taps
    hw_block = (pid // taps) % n_hw
    frame = pid // (taps * n_hw)
    b = (frame // T).to(tl.int64)
    t = (frame % T).to(tl.int64)

    offs_hw = hw_block * BLOCK_HW + tl.arange(0, BLOCK_HW)
    in_hw = offs_hw < H * W
    h = (offs_hw // W).to(tl.int64)
    w = (offs_hw % W).to(tl.int64)
    hh = h + (tap // KAPPA - KAPPA // 2)
    ww = w + (tap % KAPPA - KAPPA // 2)
    inside = in_hw & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    gy_cols = gy_ptr + b * sgb + t * sgt + (h * sgh + w * sgw)[None, :]
    x_cols = x_ptr + b * sxb + t * sxt + (hh * sxh + ww * sxw)[None, :]

    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        in_c = (chans < C)[:, None]
        rows = chans.to(tl.int64)[:, None]
        gys = tl.load(gy_cols + rows * sgc, mask=in_c & in_hw[None, :], other=0.0)
        xs = tl.load(x_cols + rows * sxc, mask=in_c & inside[None, :], other=0.0)
        acc += gys.to(tl.float32) * xs.to(tl.float32)

    grad = tl.sum(acc, axis=0)
    gk_ptrs = gk_ptr + b * skb + t * skt + tap.to(tl.int64) * skk + h * skh + w * skw
    tl.store(gk_ptrs, grad.to(gk_ptr.dtype.element_ty), mask=in_hw)


# ------------------------------------------------------------------------ Triton launches


def _launch(kernel_fn, programs: int, *args, **meta) -> None:
    """Launch ``kernel_fn`` on a 1-D grid of ``programs`` programs, on the tensors' GPU."""
    if programs == 0:  # an empty tensor: nothing to compute
        return
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel_fn[(programs,)](*args, **meta, num_warps=NUM_WARPS)


def _triton_forward(x: torch.Tensor, kernel: torch.Tensor, kappa: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = b * t * triton.cdiv(c, BLOCK_C) * triton.cdiv(h * w, BLOCK_HW)
    _launch(
        _involution_fwd_kernel,
        programs,
        *(x, kernel, y, c, t, h, w, *x.stride(), *kernel.stride(), *y.stride()),
        KAPPA=kappa,
        BLOCK_C=BLOCK_C,
        BLOCK_HW=BLOCK_HW,
    )
    return y


def _triton_grad_x(grad_y: torch.Tensor, kernel: torch.Tensor, kappa: int) -> torch.Tensor:
    b, c, t, h, w = grad_y.shape
    grad_x = torch.empty(grad_y.shape, dtype=grad_y.dtype, device=grad_y.device)
    programs = b * t * triton.cdiv(c, BLOCK_C) * triton.cdiv(h * w, BLOCK_HW)
    _launch(
        _involution_grad_x_kernel,
        programs,
        *(grad_y, kernel, grad_x, c, t, h, w, *grad_y.stride(), *kernel.stride()),
        *grad_x.stride(),
        KAPPA=kappa,
        BLOCK_C=BLOCK_C,
        BLOCK_HW=BLOCK_HW,
    )
    return grad_x


def _triton_grad_kernel(grad_y: torch.Tensor, x: torch.Tensor, kappa: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    grad_k = torch.empty((b, t, kappa * kappa, h, w), dtype=x.dtype, device=x.device)
    programs = b * t * kappa * kappa * triton.cdiv(h * w, GRAD_K_BLOCK_HW)
    _launch(
        _involution_grad_kernel_kernel,
        programs,
        *(grad_y, x, grad_k, c, t, h, w, *grad_y.stride(), *x.stride(), *grad_k.stride()),
        KAPPA=kappa,
        BLOCK_C=GRAD_K_BLOCK_C,
        BLOCK_HW=GRAD_K_BLOCK_HW,
    )
    return grad_k


class _Involution3dTriton(torch.autograd.Function):
    """Autograd wrapper of the three Triton kernels (first derivatives only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, kappa: int) -> torch.Tensor:
        ctx.save_for_backward(x, kernel)
        ctx.kappa = kappa
        return _triton_forward(x, kernel, kappa)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, kernel = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype)
        grad_x = _triton_grad_x(grad_y, kernel, ctx.kappa) if ctx.needs_input_grad[0] else None
        grad_k = _triton_grad_kernel(grad_y, x, ctx.kappa) if ctx.needs_input_grad[1] else None
        return grad_x, grad_k, None


def involution3d_triton(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-frame involution by Triton kernels, differentiable in ``x`` and ``kernel``.

    One program per frame ``(b, t)``, block of ``BLOCK_C`` channels and block of ``BLOCK_HW``
    flattened positions (a 1-D grid, channel blocks fastest) loads the κ² weights of its
    positions once and adds up κ² shifted, zero-padded tiles of ``x`` in fp32; no ``κ²·|x|``
    intermediate is built. grad x is the same loop over grad y with the flipped kernel; grad
    kernel is one program per frame, tap and block of positions, reducing over channels in
    blocks of ``GRAD_K_BLOCK_C``. Inputs are read through their strides, so non-contiguous
    tensors are not copied; outputs and gradients are contiguous, in the input dtype
    (float32, bfloat16 or float16; accumulation is always fp32).

    Parameters
    ----------
    x
        Input of shape ``(B, C, T, H, W)`` on a CUDA device (or on CPU under
        ``TRITON_INTERPRET=1``).
    kernel
        Kernels of shape ``(B, T, κ², H, W)`` with κ in :data:`TRITON_KERNEL_SIZES`; same
        dtype and device as ``x``.

    Returns
    -------
    torch.Tensor
        ``y`` of the shape of ``x``.

    Raises
    ------
    ValueError
        On mismatched shapes, dtypes or devices, or an unsupported κ.
    RuntimeError
        When Triton cannot run on the tensors' device.
    """
    kappa = _check_inputs(x, kernel)
    _check_triton_kernel_size(kappa)
    problem = _triton_problem(x.device)
    if problem is not None:
        raise RuntimeError(f"Triton involution cannot run: {problem}")
    return _Involution3dTriton.apply(x, kernel, kappa)


# --------------------------------------------------------------------------- dispatch


def triton_available() -> bool:
    """Whether Triton imports in this environment."""
    return triton is not None


def triton_interpreted() -> bool:
    """Whether this module's Triton kernels run in Triton's CPU interpreter.

    Triton fixes this when a kernel is defined, i.e. when this module is imported with
    ``TRITON_INTERPRET=1`` set; changing the variable later has no effect.
    """
    return triton_available() and not isinstance(_involution_fwd_kernel, triton.runtime.JITFunction)


def _triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if not triton_available():
        return "Triton cannot be imported"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return None
    return (
        f"tensors are on {device.type}; Triton runs on CUDA, or on CPU through its "
        f"interpreter when TRITON_INTERPRET=1 is set before {__name__} is imported"
    )


def _choice(backend: str | None) -> tuple[str, str]:
    """The requested backend name and where it came from (argument or environment)."""
    source = "argument" if backend is not None else BACKEND_ENV
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(
            f"involution backend ({source}) must be one of {', '.join(map(repr, BACKENDS))}, "
            f"got {choice!r}"
        )
    return choice, source


def _resolve(device: torch.device | str, choice: str, source: str) -> tuple[str, str]:
    """The backend to run on ``device`` and the reason, for the log."""
    device = torch.device(device)
    if choice == "reference":
        return "reference", f"requested by the {source}"
    problem = _triton_problem(device)
    if choice == "triton":
        if problem is not None:
            raise RuntimeError(f"involution backend 'triton' requested but {problem}")
        return "triton", f"requested by the {source}"
    if problem is not None:
        return "reference", f"auto: {problem}"
    where = "through the interpreter" if triton_interpreted() else "compiled"
    return "triton", f"auto: Triton on {device.type}, {where}"


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """``"triton"`` or ``"reference"``: the involution backend that runs on ``device``.

    Parameters
    ----------
    device
        Device of the tensors.
    backend
        ``"auto"``, ``"triton"`` or ``"reference"``; None reads :data:`BACKEND_ENV`
        (default ``"auto"``). ``"auto"`` picks Triton on CUDA, and on CPU when the kernels
        run interpreted (:func:`triton_interpreted`), else the reference.

    Raises
    ------
    ValueError
        On an unknown backend name.
    RuntimeError
        When ``"triton"`` is forced where it cannot run.
    """
    return _resolve(device, *_choice(backend))[0]


def involution3d(
    x: torch.Tensor, kernel: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Per-frame 3D involution of ``x`` (``(B, C, T, H, W)``) with ``kernel``
    (``(B, T, κ², H, W)``), run by the backend :func:`resolve_backend` picks.

    ``"auto"`` also falls back to the reference for a κ the Triton kernels are not built for.
    The first call of the process logs the backend and why it was picked.
    """
    global _backend_logged
    choice, source = _choice(backend)
    name, reason = _resolve(x.device, choice, source)
    if name == "triton" and choice == "auto":
        kappa = kernel_size_of(kernel)
        if kappa not in TRITON_KERNEL_SIZES:
            name, reason = "reference", f"auto: no Triton kernel for κ={kappa}"
    if not _backend_logged:
        log.info("involution3d backend: %s (%s)", name, reason)
        _backend_logged = True
    if name == "triton":
        return involution3d_triton(x, kernel)
    return involution3d_reference(x, kernel)
