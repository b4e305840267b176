"""The selective bandpass scan on Triton: an autograd ``Function`` around the kernels of
``triton_kernels.py``, with the released mixer's epilogue (group RMS norm, ``+ D u``, ``* silu(z)``)
fused into the same pass so the mixer reads its inputs once and writes one output.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the Triton interpreter; slow, for tests). Memory kept for backward: the inputs and one
fp32 state per ``chunk_size`` tokens; everything else is recomputed.
"""

from __future__ import annotations

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


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, freq, D, z, rope_scale, group_size, chunk_size, block_channels,
                out_dtype):  # type: ignore[override]  # fmt: skip
        batch, length, channels = u.shape
        state = A.shape[1]
        layout = _Layout(channels, state, group_size, block_channels)
        num_chunks = -(-length // chunk_size)
        store_boundary = any(ctx.needs_input_grad[:8])
        out = torch.empty(u.shape, dtype=out_dtype, device=u.device)
        boundary = (
            torch.empty(batch, num_chunks, channels, state, dtype=torch.float32, device=u.device)
            if store_boundary
            else out
        )
        _selective_scan_fwd_kernel[(batch, layout.num_tiles)](
            u, delta, A, B, C,
            freq if freq is not None else u, D if D is not None else u, z if z is not None else u,
            out, boundary,
            length, channels, state, 1.0 / rope_scale, num_chunks,
            HAS_FREQ=freq is not None, HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size,
            STORE_BOUNDARY=store_boundary, CHANNELS_PER_PROGRAM=layout.channels_per_program,
            BLOCK_E=layout.block_e, BLOCK_N=layout.block_n, CHUNK=chunk_size, num_warps=layout.num_warps,
        )  # fmt: skip
        if store_boundary:
            ctx.save_for_backward(u, delta, A, B, C, freq, D, z, boundary)
        ctx.config = (rope_scale, group_size, chunk_size, layout, num_chunks)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        u, delta, A, B, C, freq, D, z, boundary = ctx.saved_tensors
        rope_scale, group_size, chunk_size, layout, num_chunks = ctx.config
        batch, length, channels = u.shape
        state = A.shape[1]
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA_partial = torch.empty(batch, channels, state, **f32)
        dD_partial = torch.empty(batch, channels, **f32) if D is not None else None
        dB_partial = torch.empty(batch, length, layout.num_tiles, state, **f32)
        dC_partial = torch.empty(batch, length, layout.num_tiles, state, **f32)
        dfreq_partial = torch.empty(batch, layout.num_tiles, state, **f32) if freq is not None else None
        scratch = torch.empty(batch * layout.num_tiles * chunk_size * layout.block_e * layout.block_n, **f32)
        _selective_scan_bwd_kernel[(batch, layout.num_tiles)](
            u, delta, A, B, C,
            freq if freq is not None else u, D if D is not None else u, z if z is not None else u,
            dout.contiguous(), boundary, scratch,
            du, ddelta, dz if dz is not None else du, dA_partial,
            dD_partial if dD_partial is not None else dA_partial, dB_partial, dC_partial,
            dfreq_partial if dfreq_partial is not None else dA_partial,
            length, channels, state, 1.0 / rope_scale, num_chunks, layout.num_tiles,
            HAS_FREQ=freq is not None, HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size,
            CHANNELS_PER_PROGRAM=layout.channels_per_program,
            BLOCK_E=layout.block_e, BLOCK_N=layout.block_n, CHUNK=chunk_size, num_warps=layout.num_warps,
        )  # fmt: skip
        dA = dA_partial.sum(0).to(A.dtype)
        dB = dB_partial.sum(2).to(B.dtype)
        dC = dC_partial.sum(2).to(C.dtype)
        dfreq = dfreq_partial.sum((0, 1)).to(freq.dtype) if freq is not None else None
        dD = dD_partial.sum(0).to(D.dtype) if D is not None else None
        return du, ddelta, dA, dB, dC, dfreq, dD, dz, None, None, None, None, None


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
    u, delta, A, B, C, freq, D, z = (t.contiguous() if t is not None else None for t in tensors.values())
    tiling = (chunk_size, block_channels)
    if group_size <= MAX_FUSED_GROUP:
        return _SelectiveScanTriton.apply(
            u, delta, A, B, C, freq, D, z, rope_scale, group_size, *tiling, u.dtype
        )
    # wide groups: the kernel's raw scan in fp32, then the epilogue in PyTorch (fp32, autograd)
    y = _SelectiveScanTriton.apply(u, delta, A, B, C, freq, None, None, rope_scale, 0, *tiling, torch.float32)
    as_f32 = [t.float() if t is not None else None for t in (u, D, z)]
    return mamba_epilogue(y, as_f32[0], as_f32[1], as_f32[2], group_size).to(u.dtype)
