"""The selective scan compiled for CPU: ``torch.library`` custom ops (``defocus::selective_scan_cpu_fwd``
/ ``_bwd``) around the numba kernels of ``cpu_kernels.py``; the rotary and the epilogue stay in PyTorch
(autograd) around them, exactly as in ``reference.py``.

Unlike the PyTorch form, nothing but the inputs is kept for backward: the backward op recomputes the
states tile by tile in cache (one extra ``exp`` per update) instead of storing the
``(length, batch, channels, state)`` states (155 MB in fp32 at the base shapes).

Threads: the kernels use ``torch.get_num_threads()`` numba threads (capped at numba's pool), so a
process that limits PyTorch's threads (a Ray worker, a DataLoader worker) limits these too.
First call per dtype: numba compiles the kernels (measured 22-27 s for forward + backward on the shared,
loaded 2-core machine) and caches them on disk (``__pycache__`` beside the source, or
``NUMBA_CACHE_DIR``); a later process's first call loads them from there (measured 6.9 s under the same
load, most of it loading numba and its threads).
"""

from __future__ import annotations

import numba
import torch

from ..rotary import published_rotary
from . import cpu_kernels
from .naive import mamba_epilogue

SUPPORTED_DTYPES = (torch.float32, torch.float64)  # ops.selective_scan casts bf16/fp16 to float32


def _numpy(t: torch.Tensor):
    return t.detach().contiguous().numpy()


def _set_threads() -> int:
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _check(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES or any(t.dtype != dtype for t in tensors):
        raise ValueError(f"the CPU scan takes one dtype among {SUPPORTED_DTYPES}, got "
                         f"{[t.dtype for t in tensors]}")  # fmt: skip
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the CPU scan takes CPU tensors")


@torch.library.custom_op("defocus::selective_scan_cpu_fwd", mutates_args=())
def selective_scan_cpu_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """``y: (batch, length, channels)`` of the raw scan (no rotary, no epilogue). Inputs: ``u, delta:
    (batch, length, channels)``, ``A: (channels, state)``, ``B, C: (batch, length, state)``, one dtype."""
    _check(u, delta, A, B, C)
    y = torch.empty(u.shape, dtype=u.dtype)
    threads = _set_threads()
    cpu_kernels.scan_fwd(_numpy(u), _numpy(delta), _numpy(A.t()), _numpy(B), _numpy(C), y.numpy(), threads)
    return y


@selective_scan_cpu_fwd.register_fake
def _(u, delta, A, B, C):
    return u.new_empty(u.shape)


@torch.library.custom_op("defocus::selective_scan_cpu_bwd", mutates_args=())
def selective_scan_cpu_bwd(
    dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(du, ddelta, dA, dB, dC)`` of ``selective_scan_cpu_fwd`` from ``dy``."""
    dy = dy.to(u.dtype)
    _check(dy, u, delta, A, B, C)
    batch, length, channels = u.shape
    state = A.shape[1]
    tiles = -(-channels // cpu_kernels.TILE)
    du, ddelta = torch.empty(u.shape, dtype=u.dtype), torch.empty(u.shape, dtype=u.dtype)
    # partial sums owned by one task each, reduced here in a fixed order (deterministic)
    dAT_part = torch.empty(batch, state, channels, dtype=u.dtype)
    dB_part = torch.empty(tiles, batch, length, state, dtype=u.dtype)
    dC_part = torch.empty(tiles, batch, length, state, dtype=u.dtype)
    threads = _set_threads()
    cpu_kernels.scan_bwd(
        _numpy(dy), _numpy(u), _numpy(delta), _numpy(A.t()), _numpy(B), _numpy(C),
        du.numpy(), ddelta.numpy(), dAT_part.numpy(), dB_part.numpy(), dC_part.numpy(), threads,
    )  # fmt: skip
    return du, ddelta, dAT_part.sum(0).t().contiguous(), dB_part.sum(0), dC_part.sum(0)


@selective_scan_cpu_bwd.register_fake
def _(dy, u, delta, A, B, C):
    return u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), \
        B.new_empty(B.shape), C.new_empty(C.shape)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    return selective_scan_cpu_bwd(dy.contiguous(), *ctx.saved_tensors)


selective_scan_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    freq: torch.Tensor | None = None,
    rope_scale: float = 1.0,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """Same contract as ``selective_scan_torch``: ``u, delta, A, B, C`` share one dtype (float32 or
    float64); the rotary and the epilogue run in PyTorch autograd around the compiled scan."""
    if freq is not None:
        B = published_rotary(B, freq, rope_scale)
        C = published_rotary(C, freq, rope_scale)
    y = selective_scan_cpu_fwd(u, delta, A, B, C)
    return mamba_epilogue(y, u, D, z, group_size)
