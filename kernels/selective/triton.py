"""The selective bandpass scan on Triton: ``torch.library`` custom ops
(``defocus::selective_scan_triton_fwd`` and ``_bwd``) around the kernels of ``triton_kernels.py``, with
the released mixer's epilogue (group RMS norm, ``+ D u``, ``* silu(z)``) fused into the same pass so the
mixer reads its inputs once and writes one output.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the Triton interpreter; slow, for tests). Memory kept for backward: the inputs and one
fp32 state per ``chunk_size`` tokens; everything else is recomputed. ``A`` and ``D`` are handed to the
kernels in fp32, and ``B``, ``C`` rotated in fp32 by PyTorch (``published_rotary``) before them.
``forward_launch`` / ``backward_launch`` build the launches; ``benchmarks/kernel_report.py`` compiles
the very same ones for GPUs this machine does not have.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..launch import KernelLaunch, LaunchWork
from ..rotary import published_rotary
from .naive import mamba_epilogue
from .triton_bwd_kernels import _selective_scan_bwd_kernel
from .triton_kernels import _selective_scan_fwd_kernel

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
    """How channels are tiled over programs: one norm group per program when the norm is fused. The
    forward gives each thread every state of two channels (1024 state entries a warp, see the kernels)."""

    def __init__(self, channels: int, state: int, group_size: int, block_channels: int) -> None:
        self.channels_per_program = group_size if group_size else min(block_channels, channels)
        self.block_e = _next_power_of_2(self.channels_per_program)
        self.block_n = _next_power_of_2(state)
        self.num_tiles = -(-channels // self.channels_per_program)
        self.fwd_warps = max(1, min(8, self.block_e * self.block_n // 1024))


LOG2E = 1.4426950408889634


def forward_launch(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    group_size: int,
    chunk_size: int,
    block_channels: int,
    fp32_out: bool,
    store_boundary: bool,
) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    """The forward kernel's launch for these (contiguous; ``A``, ``B``, ``C``, ``D`` fp32) inputs, and the
    tensors it writes: ``(launch, out, boundary)``. Also what ``benchmarks/kernel_report.py`` compiles."""
    batch, length, channels = u.shape
    state = A.shape[1]
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    out = torch.empty(u.shape, dtype=torch.float32 if fp32_out else u.dtype, device=u.device)
    boundary_shape = (batch, num_chunks, state, channels) if store_boundary else (0,)
    boundary = torch.empty(boundary_shape, dtype=torch.float32, device=u.device)
    scaled_A = (A * LOG2E).t().contiguous()  # (state, channels): the decay is exp2(delta * A log2 e)
    elements = batch * length * channels
    reads = sum(t.numel() * t.element_size() for t in (u, delta, A, B, C, D, z) if t is not None)
    bytes_min = reads + out.numel() * out.element_size()
    launch = KernelLaunch(
        _selective_scan_fwd_kernel, (batch, layout.num_tiles),
        dict(u_ptr=u, delta_ptr=delta, A_ptr=scaled_A, B_ptr=B, C_ptr=C,
             D_ptr=D if D is not None else u, z_ptr=z if z is not None else u, out_ptr=out,
             boundary_ptr=boundary if store_boundary else out, length=length, channels=channels,
             num_chunks=num_chunks, channel_stride=1),
        dict(HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size, STORE_BOUNDARY=store_boundary,
             CHANNELS_PER_PROGRAM=layout.channels_per_program, STATE=state, BLOCK_E=layout.block_e,
             BLOCK_N=layout.block_n, CHUNK=chunk_size),
        num_warps=layout.fwd_warps,
        work=LaunchWork(token_steps=length, exp=elements * state, bytes_min=bytes_min,
                        bytes_moved=bytes_min + boundary.numel() * 4),
    )  # fmt: skip
    return launch, out, boundary


# The backward splits the sequence of small batches until its grid has this many programs: the most SMs
# of the GPUs the kernels target (B200: 148), so that one choice fills each of them.
MIN_PROGRAMS = 148


def backward_splits(batch: int, num_tiles: int, num_chunks: int) -> int:
    """Default segments per sequence for the backward: 1 when batch x tiles fills the GPU, else enough
    (of whole chunks) to reach ``MIN_PROGRAMS`` programs, at most one per chunk."""
    programs = batch * num_tiles
    return 1 if programs >= MIN_PROGRAMS else min(num_chunks, -(-MIN_PROGRAMS // programs))


def backward_launch(
    dout, u, delta, A, B, C, D, z, boundary, group_size: int, chunk_size: int, block_channels: int,
    splits: int | None = None, group: int | None = None, num_warps: int | None = None,
) -> tuple[KernelLaunch, dict[str, torch.Tensor | None]]:  # fmt: skip
    """The backward kernel's launch and the tensors it writes (gradients and per-program partials).

    Tunables: ``splits`` (segments each sequence is cut into; default :func:`backward_splits`),
    ``group`` (tokens whose states are recomputed into registers at once: 1, 2 or 4 dividing
    ``chunk_size``; default the largest) and ``num_warps`` (they split the state; default one per 512
    state entries of a tile). With ``splits > 1``
    the launch's ``notes["carry_pass"]`` is a launch of the same kernel that must run first (it writes
    every segment's carry, see ``triton_bwd_kernels.py``); :func:`run_backward` runs both."""
    batch, length, channels = u.shape
    state = A.shape[1]
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    splits = backward_splits(batch, layout.num_tiles, num_chunks) if splits is None else splits
    chunks_per_split = -(-num_chunks // max(1, min(splits, num_chunks)))
    splits = -(-num_chunks // chunks_per_split)  # no empty segment
    group = max(g for g in (1, 2, 4) if chunk_size % g == 0) if group is None else group
    if group not in (1, 2, 4) or chunk_size % group:
        raise ValueError(f"group={group} must be 1, 2 or 4 and divide chunk_size={chunk_size}")
    tile_states = layout.block_n * layout.block_e
    num_warps = max(1, min(layout.block_n, tile_states // 512)) if num_warps is None else num_warps
    e_lo = min(layout.block_e, 32)
    f32 = dict(dtype=torch.float32, device=u.device)
    grads = dict(
        du=torch.empty(u.shape, dtype=u.dtype, device=u.device), ddelta=torch.empty_like(delta),
        dz=torch.empty_like(z) if z is not None else None,
        dA=torch.empty(batch, splits, state, channels, **f32),
        dD=torch.empty(batch, splits, channels, **f32) if D is not None else None,
        dB=torch.empty(batch, length, layout.num_tiles, state, **f32),
        dC=torch.empty(batch, length, layout.num_tiles, state, **f32),
    )  # fmt: skip
    programs = batch * layout.num_tiles * splits
    scratch = torch.empty(programs * (chunk_size // group) * tile_states, **f32)
    carries = torch.empty(programs * 2 * tile_states if splits > 1 else 1, **f32)
    scaled_A = (A * LOG2E).t().contiguous()  # (state, channels), as the forward's
    reads = sum(t.numel() * t.element_size() for t in (dout, u, delta, A, B, C, D, z) if t is not None)
    writes = sum(t.numel() * t.element_size() for t in grads.values() if t is not None)
    # the boundary states read back, the scratch (the state entering every group of tokens, written
    # and read once) and the segments' carries (written once, read by the segments to their left)
    extra = boundary.numel() * 4 + 2 * 4 * batch * num_chunks * (chunk_size // group) * channels * state
    extra += carries.numel() * 4 * (1 + splits // 2) if splits > 1 else 0
    args = dict(
        u_ptr=u, delta_ptr=delta, A_ptr=scaled_A, B_ptr=B, C_ptr=C, D_ptr=D if D is not None else u,
        z_ptr=z if z is not None else u, dout_ptr=dout, boundary_ptr=boundary, scratch_ptr=scratch,
        carry_ptr=carries, du_ptr=grads["du"], ddelta_ptr=grads["ddelta"],
        dz_ptr=grads["dz"] if z is not None else grads["du"], dA_ptr=grads["dA"],
        dD_ptr=grads["dD"] if D is not None else grads["dA"], dB_ptr=grads["dB"], dC_ptr=grads["dC"],
        length=length, num_chunks=num_chunks, chunks_per_split=chunks_per_split, channel_stride=1,
    )  # fmt: skip
    constexprs = dict(
        channels=channels, HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size, CARRY_PASS=False,
        CHANNELS_PER_PROGRAM=layout.channels_per_program, STATE=state, E_HI=layout.block_e // e_lo, E_LO=e_lo,
        BLOCK_N=layout.block_n, CHUNK=chunk_size, GROUP=group, SPLITS=splits, WARPS=num_warps,
    )  # fmt: skip
    grid = (batch, layout.num_tiles, splits)
    token_steps = chunks_per_split * chunk_size // group  # iterations of each loop: a group of tokens each
    exp = batch * length * channels * state  # one decay per element (recomputing is the kernel's choice)
    launch = KernelLaunch(
        _selective_scan_bwd_kernel, grid, args, constexprs, num_warps=num_warps,
        work=LaunchWork(token_steps=token_steps, exp=exp, bytes_min=reads + writes,
                        bytes_moved=reads + writes + extra),
        notes={"tokens_per_iteration": group},
    )  # fmt: skip
    if splits > 1:
        launch.notes["carry_pass"] = KernelLaunch(
            _selective_scan_bwd_kernel, grid, args, {**constexprs, "CARRY_PASS": True}, num_warps=num_warps,
            work=LaunchWork(token_steps=token_steps, exp=exp, bytes_min=reads, bytes_moved=reads + extra),
            notes={"tokens_per_iteration": group},
        )  # fmt: skip
    return launch, grads


def run_backward(launch: KernelLaunch) -> None:
    """Run a :func:`backward_launch`: its carry pass first when the sequence is split."""
    if "carry_pass" in launch.notes:
        launch.notes["carry_pass"].run()
    launch.run()


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
# second op. Absent optional gradients come back as empty tensors.


@torch.library.custom_op("defocus::selective_scan_triton_fwd", mutates_args=())
def selective_scan_triton_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    group_size: int,
    chunk_size: int,
    block_channels: int,
    fp32_out: bool,
    store_boundary: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, boundary)``: the output in ``u``'s dtype (fp32 if ``fp32_out``) and, when
    ``store_boundary``, the fp32 state at the end of every chunk (else an empty tensor)."""
    launch, out, boundary = forward_launch(u, delta, A, B, C, D, z, group_size, chunk_size, block_channels,
                                           fp32_out, store_boundary)  # fmt: skip
    if store_boundary:  # the kernel skips the last chunk's end state (never read back): define it
        boundary[:, -1].zero_()
    with device_guard(u):
        launch.run()
    return out, boundary


@selective_scan_triton_fwd.register_fake
def _(u, delta, A, B, C, D, z, group_size, chunk_size, block_channels, fp32_out, store_boundary):
    batch, length, channels = u.shape
    num_chunks = -(-length // chunk_size)
    out = u.new_empty(u.shape, dtype=torch.float32 if fp32_out else u.dtype)
    boundary_shape = (batch, num_chunks, A.shape[1], channels) if store_boundary else (0,)
    return out, u.new_empty(boundary_shape, dtype=torch.float32)


@torch.library.custom_op("defocus::selective_scan_triton_bwd", mutates_args=())
def selective_scan_triton_bwd(
    dout: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    boundary: torch.Tensor,
    group_size: int,
    chunk_size: int,
    block_channels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(du, ddelta, dA, dB, dC, dD, dz)``, each in its input's dtype (empty when absent)."""
    batch, length, channels = u.shape
    num_chunks = -(-length // chunk_size)
    if boundary.shape != (batch, num_chunks, A.shape[1], channels):
        raise RuntimeError("the forward did not keep its chunk states (it ran without gradients)")
    launch, grads = backward_launch(dout.contiguous(), u, delta, A, B, C, D, z, boundary, group_size,
                                    chunk_size, block_channels)  # fmt: skip
    with device_guard(u):
        run_backward(launch)
    none = u.new_empty(0)
    return (
        grads["du"],
        grads["ddelta"],
        grads["dA"].sum((0, 1)).t().to(A.dtype).contiguous(),  # kept (state, channels), coalesced
        grads["dB"].sum(2).to(B.dtype),
        grads["dC"].sum(2).to(C.dtype),
        grads["dD"].sum((0, 1)).to(D.dtype) if D is not None else none.clone(),
        grads["dz"] if z is not None else none.clone(),
    )


@selective_scan_triton_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, boundary, group_size, chunk_size, block_channels):
    def like(t):
        return t.new_empty(t.shape) if t is not None else u.new_empty(0)

    return like(u), like(delta), like(A), like(B), like(C), like(D), like(z)


def _triton_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, group_size, chunk_size, block_channels, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(u, delta, A, B, C, D, z, output[1])
    ctx.config = (group_size, chunk_size, block_channels)
    ctx.present = (D is not None, z is not None)


def _triton_backward(ctx, dout, _dboundary):
    u, delta, A, B, C, D, z, boundary = ctx.saved_tensors
    grads = selective_scan_triton_bwd(dout, u, delta, A, B, C, D, z, boundary, *ctx.config)
    optional = [g if present else None for g, present in zip(grads[5:], ctx.present, strict=True)]
    return (*grads[:5], *optional, None, None, None, None, None)


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
    block_channels: int = 64,
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
    # The SSM scalars enter the kernels in fp32 whatever their dtype, and B, C rotated (the released
    # rotary, in fp32): both done here, outside the op, in autograd, so that the gradients reach freq and
    # come back in the callers' dtypes.
    A, D = (t.float() if t is not None else None for t in (A, D))
    B, C = B.float(), C.float()
    if freq is not None:
        B, C = published_rotary(B, freq, rope_scale), published_rotary(C, freq, rope_scale)
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z)
    u, delta, A, B, C, D, z = (t.contiguous() if t is not None else None for t in tensors.values())
    store_boundary = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z)
    )
    if group_size <= MAX_FUSED_GROUP:
        config = (group_size, chunk_size, block_channels)
        return selective_scan_triton_fwd(u, delta, A, B, C, D, z, *config, False, store_boundary)[0]
    # wide groups: the kernel's raw scan in fp32, then the epilogue in PyTorch (fp32, autograd)
    config = (0, chunk_size, block_channels)
    y = selective_scan_triton_fwd(u, delta, A, B, C, None, None, *config, True, store_boundary)[0]
    as_f32 = [t.float() if t is not None else None for t in (u, D, z)]
    return mamba_epilogue(y, as_f32[0], as_f32[1], as_f32[2], group_size).to(u.dtype)
