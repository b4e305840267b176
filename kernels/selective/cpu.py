"""The selective scan compiled for CPU: ``torch.library`` custom ops around the numba kernels.

* ``defocus::selective_scan_cpu_fwd`` / ``_bwd``: the raw scan (``cpu_kernels.py``). Besides ``y`` the
  forward returns the state at the start of every ``CHUNK`` tokens (``bounds``, 1/16 of the states),
  from which the backward recomputes one chunk at a time in cache (one extra ``exp`` per update), instead
  of the ``(length, batch, channels, state)`` states (155 MB in fp32 at the base shapes) the PyTorch form
  stores.
* ``defocus::mamba_epilogue_cpu_fwd`` / ``_bwd``: group RMS norm, ``+ D u``, ``* silu(z)``
  (``cpu_epilogue_kernels.py``).

The rotary of ``B`` and ``C`` (small ``(batch, length, state)`` tensors) stays in PyTorch autograd, as in
``reference.py``.

Threads: the kernels use ``torch.get_num_threads()`` numba threads (capped at numba's pool), so a
process that limits PyTorch's threads (a Ray worker, a DataLoader worker) limits these too; torch's
count is put back after each call (``_numba_threads``).
First call per dtype: numba compiles the kernels (tens of seconds on two cores) and caches them on disk
(``__pycache__`` beside the source, or ``NUMBA_CACHE_DIR``); a later process's first call loads them from
there (1-2 s, most of it loading numba and its threads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
import torch

from ..rotary import published_rotary
from . import cpu_epilogue_kernels, cpu_kernels

SUPPORTED_DTYPES = (torch.float32, torch.float64)  # ops.selective_scan casts bf16/fp16 to float32
RMS_EPS = 1e-6  # as naive.group_rms_norm


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of ``t`` (contiguous) through DLPack: ``Tensor.numpy()`` would mark the storage
    non-resizable for good, and FSDP2 frees an unsharded parameter (``D``) by resizing its storage."""
    return np.from_dlpack(t.detach().contiguous())


@contextlib.contextmanager
def _numba_threads() -> Iterator[int]:
    """For one kernel call: numba runs as many threads as torch (capped at numba's pool), and torch's
    thread count is as it was afterwards. numba's OpenMP layer can resolve to torch's OpenMP runtime,
    and its first launch sets that runtime's thread count to all cores (measured: a process limited to
    one torch thread had two after its first scan, and ``torch.compile`` guards on the count)."""
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def _check(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES or any(t.dtype != dtype for t in tensors):
        raise ValueError(f"the CPU scan takes one dtype among {SUPPORTED_DTYPES}, got "
                         f"{[t.dtype for t in tensors]}")  # fmt: skip
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the CPU scan takes CPU tensors")


def _bounds_shape(u: torch.Tensor, A: torch.Tensor) -> tuple[int, int, int, int]:
    batch, length, channels = u.shape
    return batch, -(-length // cpu_kernels.CHUNK), A.shape[1], channels


@torch.library.custom_op("defocus::selective_scan_cpu_fwd", mutates_args=())
def selective_scan_cpu_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, bounds)``: ``y: (batch, length, channels)`` of the raw scan (no rotary, no epilogue) and the
    chunk-start states for the backward. Inputs: ``u, delta: (batch, length, channels)``, ``A: (channels,
    state)``, ``B, C: (batch, length, state)``, one dtype."""
    _check(u, delta, A, B, C)
    y = torch.empty(u.shape, dtype=u.dtype)
    bounds = torch.empty(_bounds_shape(u, A), dtype=u.dtype)
    tile = cpu_kernels.tile_width(u.shape[0], u.shape[2])
    with _numba_threads() as threads:
        cpu_kernels.scan_fwd(
            _numpy(u), _numpy(delta), _numpy(A.t()), _numpy(B), _numpy(C), _numpy(y), _numpy(bounds),
            threads, tile,
        )  # fmt: skip
    return y, bounds


@selective_scan_cpu_fwd.register_fake
def _(u, delta, A, B, C):
    return u.new_empty(u.shape), u.new_empty(_bounds_shape(u, A))


@torch.library.custom_op("defocus::selective_scan_cpu_bwd", mutates_args=())
def selective_scan_cpu_bwd(
    dy: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    bounds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(du, ddelta, dA, dB, dC)`` of ``selective_scan_cpu_fwd``'s ``y`` from ``dy``."""
    dy = dy.to(u.dtype)
    _check(dy, u, delta, A, B, C, bounds)
    batch, length, channels = u.shape
    state = A.shape[1]
    tile = cpu_kernels.tile_width(batch, channels)
    tiles = -(-channels // tile)
    du, ddelta = torch.empty(u.shape, dtype=u.dtype), torch.empty(u.shape, dtype=u.dtype)
    # partial sums owned by one task each, reduced here in a fixed order (deterministic)
    dAT_part = torch.empty(batch, state, channels, dtype=u.dtype)
    dB_part = torch.empty(tiles, batch, length, state, dtype=u.dtype)
    dC_part = torch.empty(tiles, batch, length, state, dtype=u.dtype)
    with _numba_threads() as threads:
        cpu_kernels.scan_bwd(
            _numpy(dy), _numpy(u), _numpy(delta), _numpy(A.t()), _numpy(B), _numpy(C), _numpy(bounds),
            _numpy(du), _numpy(ddelta), _numpy(dAT_part), _numpy(dB_part), _numpy(dC_part), threads, tile,
        )  # fmt: skip
    return du, ddelta, dAT_part.sum(0).t().contiguous(), dB_part.sum(0), dC_part.sum(0)


@selective_scan_cpu_bwd.register_fake
def _(dy, u, delta, A, B, C, bounds):
    return u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), \
        B.new_empty(B.shape), C.new_empty(C.shape)  # fmt: skip


def _scan_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output[1])
    # ``bounds`` is for the backward only: no zero gradient the size of it is made for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dy, _dbounds):
    u = ctx.saved_tensors[0]
    dy = torch.zeros_like(u) if dy is None else dy.contiguous()
    return selective_scan_cpu_bwd(dy, *ctx.saved_tensors)


selective_scan_cpu_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def _rows(t: torch.Tensor):
    """A ``(tokens, channels)`` NumPy view of a contiguous ``(..., channels)`` tensor."""
    return _numpy(t).reshape(-1, t.shape[-1])


def _epilogue_groups(y: torch.Tensor, group_size: int) -> int:
    return y.shape[-1] // group_size if group_size else 1


@torch.library.custom_op("defocus::mamba_epilogue_cpu_fwd", mutates_args=())
def mamba_epilogue_cpu_fwd(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, rstd)``: ``out = (group_rms_norm(y) + D u) * silu(z)`` (terms left out when ``D``/``z`` is
    None, no norm when ``group_size`` is 0) and the groups' ``1 / rms``, ``(tokens, groups)``."""
    _check(y, u, *(t for t in (D, z) if t is not None))
    out = torch.empty(y.shape, dtype=y.dtype)
    # without the norm there is nothing to keep: ones, not uninitialised memory, are returned then
    rstd = (torch.empty if group_size else torch.ones)(
        y.numel() // y.shape[-1], _epilogue_groups(y, group_size), dtype=y.dtype
    )
    with _numba_threads():
        cpu_epilogue_kernels.epilogue_fwd(
            _rows(y), _rows(u), _rows(z if z is not None else u),
            _numpy(D if D is not None else y.new_zeros(1)), group_size, RMS_EPS, D is not None, z is not None,
            _rows(out), _numpy(rstd),
        )  # fmt: skip
    return out, rstd


@mamba_epilogue_cpu_fwd.register_fake
def _(y, u, D, z, group_size):
    return y.new_empty(y.shape), y.new_empty(y.numel() // y.shape[-1], _epilogue_groups(y, group_size))


@torch.library.custom_op("defocus::mamba_epilogue_cpu_bwd", mutates_args=())
def mamba_epilogue_cpu_bwd(
    dout: torch.Tensor,
    y: torch.Tensor,
    u: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    rstd: torch.Tensor,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dy, du, dD, dz)`` of ``mamba_epilogue_cpu_fwd``'s ``out`` (``du``: the ``D u`` term;
    ``dD``/``dz`` zeros when ``D``/``z`` is None)."""
    dout = dout.to(y.dtype)
    dy = torch.empty(y.shape, dtype=y.dtype)
    du, dz = (torch.empty(y.shape, dtype=y.dtype) if given else torch.zeros(y.shape, dtype=y.dtype)
              for given in (D is not None, z is not None))  # fmt: skip
    rows, channels = y.numel() // y.shape[-1], y.shape[-1]
    dD_part = torch.empty(-(-rows // cpu_epilogue_kernels.ROWS_PER_PART), channels, dtype=y.dtype)
    with _numba_threads():
        cpu_epilogue_kernels.epilogue_bwd(
            _rows(dout), _rows(y), _rows(u), _rows(z if z is not None else u),
            _numpy(D if D is not None else y.new_zeros(1)), _numpy(rstd), group_size,
            D is not None, z is not None, _rows(dy), _rows(du), _rows(dz), _numpy(dD_part),
        )  # fmt: skip
    return dy, du, dD_part.sum(0) if D is not None else y.new_zeros(channels), dz


@mamba_epilogue_cpu_bwd.register_fake
def _(dout, y, u, D, z, rstd, group_size):
    return y.new_empty(y.shape), y.new_empty(y.shape), y.new_empty(y.shape[-1]), y.new_empty(y.shape)


def _epilogue_setup_context(ctx, inputs, output) -> None:
    y, u, D, z, group_size = inputs
    ctx.group_size = group_size
    ctx.has_d, ctx.has_z = D is not None, z is not None
    ctx.save_for_backward(y, u, D, z, output[1])
    ctx.mark_non_differentiable(output[1])  # ``rstd``, for the backward only
    ctx.set_materialize_grads(False)


def _epilogue_backward(ctx, dout, _drstd):
    y, u, D, z, rstd = ctx.saved_tensors
    dout = torch.zeros_like(y) if dout is None else dout.contiguous()
    dy, du, dD, dz = mamba_epilogue_cpu_bwd(dout, y, u, D, z, rstd, ctx.group_size)
    return dy, du, dD if ctx.has_d else None, dz if ctx.has_z else None, None


mamba_epilogue_cpu_fwd.register_autograd(_epilogue_backward, setup_context=_epilogue_setup_context)


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
    """Same contract as ``selective_scan_torch``: ``u, delta, A, B, C`` (and ``D``, ``z``) share one dtype
    (float32 or float64); the rotary runs in PyTorch autograd around the compiled scan and epilogue."""
    if freq is not None:
        B = published_rotary(B, freq, rope_scale)
        C = published_rotary(C, freq, rope_scale)
    # contiguous once, here: the ops save their inputs for the backward, which would copy strided
    # views (``z`` is half of the input projection) again
    u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
    y = selective_scan_cpu_fwd(u, delta, A, B, C)[0]
    if D is None and z is None and not group_size:
        return y
    return mamba_epilogue_cpu_fwd(y, u, D, z.contiguous() if z is not None else None, group_size)[0]
