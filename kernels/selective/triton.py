"""The selective bandpass scan on Triton: ``torch.library`` custom ops
(``defocus::selective_scan_triton_fwd`` and ``_bwd``) around the kernels of ``triton_kernels.py``, with
the released mixer's epilogue (group RMS norm, ``+ D u``, ``* silu(z)``) fused into the same pass so the
mixer reads its inputs once and writes one output.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the Triton interpreter; slow, for tests). Memory kept for backward: the inputs and one
fp32 state per ``chunk_size`` tokens; everything else is recomputed. ``A``, ``freq`` and ``D`` are
handed to the kernels in fp32; positions and rotary angles are computed in fp32 inside them.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .naive import mamba_epilogue
from .triton_kernels import _selective_scan_bwd_kernel, _selective_scan_fwd_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Groups up to this many channels are normalised inside the kernel (one group per program, its whole
# state in registers); wider groups get the scan from the kernel and the epilogue from PyTorch.
MAX_FUSED_GROUP = 256


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_triton_device(tensors: dict[str, torch.Tensor | None]) -> None:
    """Kernels need every tensor on one device: CUDA, or CPU under the Triton interpreter."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all inputs must be on one device, got {where}")
    device = devices.pop()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
            "importing triton to run them in the interpreter"
        )
    for name, t in present.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_shapes(u, delta, A, B, C, freq, D, z, group_size) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must be (batch, length, channels), got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    batch, length, channels = u.shape
    if length < 1 or channels < 1 or batch < 1:
        raise ValueError(f"u must have batch, length and channels >= 1, got {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (channels={channels}, state), got {tuple(A.shape)}")
    state = A.shape[1]
    for name, value in (("B", B), ("C", C)):
        if value.shape != (batch, length, state):
            raise ValueError(f"{name} must be (batch, length, state={state}), got {tuple(value.shape)}")
    if freq is not None and (freq.shape != (state,) or state % 2):
        raise ValueError(f"freq must be (state,) with an even state (rotary pairs), got {tuple(freq.shape)}")
    if D is not None and D.shape != (channels,):
        raise ValueError(f"D must be (channels={channels},), got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if group_size < 0 or (group_size and channels % group_size):
        raise ValueError(f"group_size={group_size} must be 0 or divide channels={channels}")


class _Layout:
    """How channels are tiled over programs: one norm group per program when the norm is fused."""

    def __init__(self, channels: int, state: int, group_size: int, block_channels: int) -> None:
        self.channels_per_program = group_size if group_size else min(block_channels, channels)
        self.block_e = _next_power_of_2(self.channels_per_program)
        self.block_n = _next_power_of_2(state)
        self.num_tiles = -(-channels // self.channels_per_program)
        self.num_warps = 4 if self.block_e * self.block_n <= 2048 else 8


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s (no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --- torch.library custom ops ---------------------------------------------------------------------------
#
# Why ``custom_op`` and not ``triton_op`` + ``wrap_triton``: ``triton_op`` lets Inductor trace into the
# launcher and codegen the kernel call, which buys nothing here (the kernel is the whole op; there is
# nothing of ours for Inductor to fuse into it) and costs the tracing of the launcher: its tiling
# objects, ``tl`` dtype constexprs and the kernels' pointer-mutation analysis. An opaque ``custom_op``
# with an explicit fake implementation runs the same Python launcher in eager mode, compiled graphs and
# the Triton interpreter on CPU alike, so the ops can be ``opcheck``ed without a GPU. The backward is a
# second op. ``position_scale = 1 / rope_scale``; absent optional gradients come back as empty tensors.


@torch.library.custom_op("defocus::selective_scan_triton_fwd", mutates_args=())
def selective_scan_triton_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    freq: torch.Tensor | None,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    position_scale: float,
    group_size: int,
    chunk_size: int,
    block_channels: int,
    fp32_out: bool,
    store_boundary: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, boundary)``: the output in ``u``'s dtype (fp32 if ``fp32_out``) and, when
    ``store_boundary``, the fp32 state at the end of every chunk (else an empty tensor)."""
    batch, length, channels = u.shape
    state = A.shape[1]
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    out = torch.empty(u.shape, dtype=torch.float32 if fp32_out else u.dtype, device=u.device)
    boundary_shape = (batch, num_chunks, channels, state) if store_boundary else (0,)
    boundary = torch.empty(boundary_shape, dtype=torch.float32, device=u.device)
    if store_boundary:  # the kernel skips the last chunk's end state (never read back): define it
        boundary[:, -1].zero_()
    with device_guard(u):
        _selective_scan_fwd_kernel[(batch, layout.num_tiles)](
            u, delta, A, B, C,
            freq if freq is not None else u, D if D is not None else u, z if z is not None else u,
            out, boundary if store_boundary else out,
            length, channels, state, position_scale, num_chunks,
            HAS_FREQ=freq is not None, HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size,
            STORE_BOUNDARY=store_boundary, CHANNELS_PER_PROGRAM=layout.channels_per_program,
            BLOCK_E=layout.block_e, BLOCK_N=layout.block_n, CHUNK=chunk_size, num_warps=layout.num_warps,
        )  # fmt: skip
    return out, boundary


@selective_scan_triton_fwd.register_fake
def _(u, delta, A, B, C, freq, D, z, position_scale, group_size, chunk_size, block_channels, fp32_out,
      store_boundary):  # fmt: skip
    batch, length, channels = u.shape
    num_chunks = -(-length // chunk_size)
    out = u.new_empty(u.shape, dtype=torch.float32 if fp32_out else u.dtype)
    boundary_shape = (batch, num_chunks, channels, A.shape[1]) if store_boundary else (0,)
    return out, u.new_empty(boundary_shape, dtype=torch.float32)


@torch.library.custom_op("defocus::selective_scan_triton_bwd", mutates_args=())
def selective_scan_triton_bwd(
    dout: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    freq: torch.Tensor | None,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    boundary: torch.Tensor,
    position_scale: float,
    group_size: int,
    chunk_size: int,
    block_channels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """``(du, ddelta, dA, dB, dC, dfreq, dD, dz)``, each in its input's dtype (empty when absent)."""
    batch, length, channels = u.shape
    state = A.shape[1]
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    if boundary.shape != (batch, num_chunks, channels, state):
        raise RuntimeError("the forward did not keep its chunk states (it ran without gradients)")
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty(u.shape, dtype=u.dtype, device=u.device), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA_partial = torch.empty(batch, channels, state, **f32)
    dD_partial = torch.empty(batch, channels, **f32) if D is not None else None
    dB_partial = torch.empty(batch, length, layout.num_tiles, state, **f32)
    dC_partial = torch.empty(batch, length, layout.num_tiles, state, **f32)
    dfreq_partial = torch.empty(batch, layout.num_tiles, state, **f32) if freq is not None else None
    scratch = torch.empty(batch * layout.num_tiles * chunk_size * layout.block_e * layout.block_n, **f32)
    with device_guard(u):
        _selective_scan_bwd_kernel[(batch, layout.num_tiles)](
            u, delta, A, B, C,
            freq if freq is not None else u, D if D is not None else u, z if z is not None else u,
            dout.contiguous(), boundary, scratch,
            du, ddelta, dz if dz is not None else du, dA_partial,
            dD_partial if dD_partial is not None else dA_partial, dB_partial, dC_partial,
            dfreq_partial if dfreq_partial is not None else dA_partial,
            length, channels, state, position_scale, num_chunks, layout.num_tiles,
            HAS_FREQ=freq is not None, HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size,
            CHANNELS_PER_PROGRAM=layout.channels_per_program,
            BLOCK_E=layout.block_e, BLOCK_N=layout.block_n, CHUNK=chunk_size, num_warps=layout.num_warps,
        )  # fmt: skip
    none = u.new_empty(0)
    return (
        du,
        ddelta,
        dA_partial.sum(0).to(A.dtype),
        dB_partial.sum(2).to(B.dtype),
        dC_partial.sum(2).to(C.dtype),
        dfreq_partial.sum((0, 1)).to(freq.dtype) if freq is not None else none,
        dD_partial.sum(0).to(D.dtype) if D is not None else none.clone(),
        dz if dz is not None else none.clone(),
    )


@selective_scan_triton_bwd.register_fake
def _(dout, u, delta, A, B, C, freq, D, z, boundary, position_scale, group_size, chunk_size, block_channels):
    def like(t):
        return t.new_empty(t.shape) if t is not None else u.new_empty(0)

    return like(u), like(delta), like(A), like(B), like(C), like(freq), like(D), like(z)


def _triton_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, freq, D, z, position_scale, group_size, chunk_size, block_channels, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(u, delta, A, B, C, freq, D, z, output[1])
    ctx.config = (position_scale, group_size, chunk_size, block_channels)
    ctx.present = (freq is not None, D is not None, z is not None)


def _triton_backward(ctx, dout, _dboundary):
    u, delta, A, B, C, freq, D, z, boundary = ctx.saved_tensors
    grads = selective_scan_triton_bwd(dout, u, delta, A, B, C, freq, D, z, boundary, *ctx.config)
    optional = [g if present else None for g, present in zip(grads[5:], ctx.present, strict=True)]
    return (*grads[:5], *optional, None, None, None, None, None, None)


selective_scan_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def selective_scan_triton(
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
    *,
    chunk_size: int = 32,
    block_channels: int = 32,
) -> torch.Tensor:
    """Same contract as ``selective_scan_naive``, on Triton; differentiable in every tensor argument.

    ``chunk_size``: tokens between the states the forward keeps for the backward (the backward
    recomputes the rest). ``block_channels``: channels per program when no group norm is fused.
    The output has ``u``'s dtype; the state and the epilogue are computed in fp32.
    """
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, freq=freq, D=D, z=z)
    check_triton_device(tensors)
    _check_shapes(u, delta, A, B, C, freq, D, z, group_size)
    if chunk_size < 1 or block_channels < 1:
        raise ValueError(f"chunk_size and block_channels must be >= 1, got {chunk_size}, {block_channels}")
    # the SSM scalars enter the kernels in fp32 whatever their dtype; converted here, outside the op, so
    # autograd hands their gradients back in the caller's dtype
    A, freq, D = (t.float() if t is not None else None for t in (A, freq, D))
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, freq=freq, D=D, z=z)
    u, delta, A, B, C, freq, D, z = (t.contiguous() if t is not None else None for t in tensors.values())
    store_boundary = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, freq, D, z)
    )
    config = (1.0 / rope_scale, group_size, chunk_size, block_channels)
    if group_size <= MAX_FUSED_GROUP:
        return selective_scan_triton_fwd(u, delta, A, B, C, freq, D, z, *config, False, store_boundary)[0]
    # wide groups: the kernel's raw scan in fp32, then the epilogue in PyTorch (fp32, autograd)
    config = (1.0 / rope_scale, 0, chunk_size, block_channels)
    y = selective_scan_triton_fwd(u, delta, A, B, C, freq, None, None, *config, True, store_boundary)[0]
    as_f32 = [t.float() if t is not None else None for t in (u, D, z)]
    return mamba_epilogue(y, as_f32[0], as_f32[1], as_f32[2], group_size).to(u.dtype)
