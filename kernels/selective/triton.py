"""The selective bandpass scan on Triton: ``torch.library`` custom ops
(``defocus::selective_scan_triton_fwd`` and ``_bwd``) around the kernels of ``triton_fwd_kernels.py``
and ``triton_bwd_kernels.py``, with the released mixer's epilogue (group RMS norm, ``+ D u``,
``* silu(z)``) fused into the same pass so the mixer reads its inputs once and writes one output.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the Triton interpreter; slow, for tests). Memory kept for backward: the inputs and one
fp32 state per ``chunk_size`` tokens (``DEFAULT_CHUNK``); everything else is recomputed. ``A`` and ``D``
are handed to the kernels in fp32, and ``B``, ``C`` rotated in fp32 by PyTorch (``published_rotary``)
before them. ``forward_launch`` / ``backward_launch`` build the launches; ``benchmarks/kernel_report.py``
compiles the very same ones for GPUs this machine does not have.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .. import autotune
from ..launch import KernelLaunch, LaunchWork, target_capability, target_sms
from ..rotary import published_rotary
from .naive import mamba_epilogue
from .triton_bwd_kernels import _selective_scan_bwd_kernel
from .triton_fwd_kernels import _selective_scan_fwd_kernel

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
    forward gives each thread every state of two channels (1024 state entries a warp, see the kernels),
    or of one where ``forward_warps`` doubles the warps."""

    def __init__(self, channels: int, state: int, group_size: int, block_channels: int) -> None:
        self.channels_per_program = group_size if group_size else min(block_channels, channels)
        self.block_e = _next_power_of_2(self.channels_per_program)
        self.block_n = _next_power_of_2(state)
        self.num_tiles = -(-channels // self.channels_per_program)
        self.fwd_warps = max(1, min(8, self.block_e * self.block_n // 1024))


LOG2E = 1.4426950408889634
# Programs a grid should have at least (one per SM) before the forward splits the sequence, when the
# device is unknown (the report's meta tensors): the most SMs of the parts the report targets (B200).
# On CPU (the interpreter) the default is never to split; tests force it with ``segments``.
FILL_PROGRAMS = 148


@functools.cache
def _fill_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return FILL_PROGRAMS if device.type == "meta" else 1


def forward_segments(batch: int, num_tiles: int, num_chunks: int, min_programs: int) -> int:
    """Segments of the sequence the forward runs in parallel: 1 (the single pass) when ``batch x tiles``
    programs fill ``min_programs``, else enough whole chunks a segment to fill it (as far as chunks go)."""
    rows = batch * num_tiles
    if rows >= min_programs:
        return 1
    return min(num_chunks, -(-min_programs // rows))


def forward_warps(layout: _Layout, programs: int, fill: int) -> int:
    """The layout's warps (a thread holds every state of two channels), doubled when fewer than 4
    programs share an SM (``fill`` of them fill the GPU once): then a thread holds one channel, which
    halves the instructions between a warp's memory latencies and doubles the warps that hide them."""
    return min(8, layout.fwd_warps * (2 if programs < 4 * fill else 1))


def forward_candidates(u: torch.Tensor, state: int, group_size: int, chunk_size: int,
                       block_channels: int) -> list[dict[str, int | bool]]:  # fmt: skip
    """The forward's autotune space at ``u``'s shape and device: the shape-chosen default first, then one
    tunable changed at a time (the other warp count, one token a stage, and for a split sequence no split
    or twice the segments). Each computes the same function (tested); ``autotune`` times them on CUDA."""
    batch, length, channels = u.shape
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    fill = _fill_programs(u.device)
    segments = forward_segments(batch, layout.num_tiles, num_chunks, fill)
    warps = forward_warps(layout, batch * layout.num_tiles * segments, fill)
    other_warps = layout.fwd_warps if warps != layout.fwd_warps else min(8, 2 * layout.fwd_warps)
    candidates: list[dict[str, int | bool]] = [{}, {"num_warps": other_warps}]
    if chunk_size % 2 == 0:  # the default is two tokens a stage
        candidates.append({"tokens_per_stage": 1})
    if segments > 1:
        candidates += [{"segments": 1}, {"segments": min(num_chunks, 2 * segments)}]
    unique: list[dict[str, int | bool]] = []
    for candidate in candidates:
        if candidate not in unique and candidate.get("num_warps") != warps:
            unique.append(candidate)
    return unique


def _token_tiling(chunk_size: int, tokens: int, stages: int) -> tuple[int, int]:
    """``(tokens a stage, stages an iteration)``: by default two tokens (when they divide the chunk) in
    one stage. More cost registers: four tokens or two stages spill on sm_80 at one warp a 64 x 16 tile."""
    if not tokens:
        tokens = 2 if chunk_size % 2 == 0 else 1
    stages = stages or 1
    if tokens not in (1, 2, 4) or stages not in (1, 2) or chunk_size % (tokens * stages):
        raise ValueError(f"tokens_per_stage={tokens} (1, 2, 4) x stages={stages} (1, 2) must divide "
                         f"chunk_size={chunk_size}")  # fmt: skip
    return tokens, stages


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
    *,
    segments: int = 0,
    num_warps: int = 0,
    tokens_per_stage: int = 0,
    stages: int = 0,
) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    """The forward kernel's launch for these (contiguous; ``A``, ``B``, ``C``, ``D`` fp32) inputs, and the
    tensors it writes: ``(launch, out, boundary)``. Also what ``benchmarks/kernel_report.py`` compiles.

    Tunables (0: chosen from the shapes): ``segments``, the sequence split (more than 1: a local pass,
    ``launch.prelude``, then the output pass; see ``triton_fwd_kernels``); ``num_warps``
    (``forward_warps``); ``tokens_per_stage`` (1, 2 or 4) and ``stages`` (1 or 2): a token loop iteration
    is ``stages`` stages of ``tokens_per_stage`` tokens, which must divide ``chunk_size``.
    ``block_channels`` and ``chunk_size`` are the op's. On CPU (the interpreter) the defaults are fixed:
    no split."""
    batch, length, channels = u.shape
    state = A.shape[1]
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    fill = _fill_programs(u.device)
    if not segments:
        segments = forward_segments(batch, layout.num_tiles, num_chunks, fill)
    chunks_per_segment = -(-num_chunks // max(1, min(segments, num_chunks)))
    segments = -(-num_chunks // chunks_per_segment)  # none empty
    if not num_warps:
        num_warps = forward_warps(layout, batch * layout.num_tiles * segments, fill)
    tokens, stages = _token_tiling(chunk_size, tokens_per_stage, stages)
    out = torch.empty(u.shape, dtype=torch.float32 if fp32_out else u.dtype, device=u.device)
    boundary_shape = (batch, num_chunks, state, channels) if store_boundary else (0,)
    boundary = torch.empty(boundary_shape, dtype=torch.float32, device=u.device)
    scaled_A = (A * LOG2E).t().contiguous()  # (state, channels): the decay is exp2(delta * A log2 e)
    f32 = dict(dtype=torch.float32, device=u.device)
    split = segments > 1  # the local pass's read-outs, end states and delta sums
    local = torch.empty(u.shape if split else (0,), **f32)
    carry = torch.empty((batch, segments, state, channels) if split else (0,), **f32)
    delta_sum = torch.empty((batch, segments, channels) if split else (0,), **f32)
    elements = batch * length * channels
    reads = sum(t.numel() * t.element_size() for t in (u, delta, A, B, C, D, z) if t is not None)
    bytes_min = reads + out.numel() * out.element_size()  # the op's: each pass's record has the op's floor
    size = {name: t.numel() * t.element_size() if t is not None else 0 for name, t in
            dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, local=local, carry=carry, delta_sum=delta_sum,
                 boundary=boundary).items()}  # fmt: skip
    # what each pass moves: the local pass reads u, delta, B, C and writes the read-outs, the end states
    # and (when kept) the local chunk states; the output pass reads those back, and D, z
    moved = {
        0: bytes_min + size["boundary"],
        1: sum(size[k] for k in ("u", "delta", "A", "B", "C", "local", "carry", "delta_sum", "boundary")),
        2: sum(size[k] for k in ("u", "delta", "A", "C", "D", "z", "local", "carry", "delta_sum"))
        + out.numel() * out.element_size()
        + 2 * size["boundary"],
    }
    args = dict(
        u_ptr=u, delta_ptr=delta, A_ptr=scaled_A, B_ptr=B, C_ptr=C, D_ptr=D if D is not None else u,
        z_ptr=z if z is not None else u, out_ptr=out, boundary_ptr=boundary if store_boundary else out,
        local_ptr=local if split else out, carry_ptr=carry if split else out,
        delta_sum_ptr=delta_sum if split else out, length=length, num_chunks=num_chunks,
        chunks_per_segment=chunks_per_segment, num_segments=segments, channel_stride=1,
    )  # fmt: skip
    constexprs = dict(
        channels=channels, HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size,
        STORE_BOUNDARY=store_boundary,
        CHANNELS_PER_PROGRAM=layout.channels_per_program, STATE=state, BLOCK_E=layout.block_e,
        BLOCK_N=layout.block_n, CHUNK=chunk_size, TOKENS=tokens, STAGES=stages,
    )  # fmt: skip
    steps = -(-min(chunks_per_segment * chunk_size, length) // (tokens * stages))  # token loop iterations
    chunk_steps = min(chunks_per_segment, num_chunks)  # the chunk loop around it (its boundary stores)

    def launch(mode: int, prelude: tuple[KernelLaunch, ...] = ()) -> KernelLaunch:
        return KernelLaunch(
            _selective_scan_fwd_kernel, (batch, layout.num_tiles, segments), args,
            {**constexprs, "MODE": mode}, num_warps=num_warps,
            work=LaunchWork(token_steps=steps, exp=elements * state, bytes_min=bytes_min,
                            bytes_moved=moved[mode], chunk_steps=chunk_steps),
            notes={"tokens_per_iteration": tokens * stages, "tokens": steps * tokens * stages},
            prelude=prelude,
        )  # fmt: skip

    return (launch(2, (launch(1),)) if split else launch(0)), out, boundary


# Tokens between the states the forward keeps for the backward. At 8 (two groups of 4) the backward
# recomputes a token 1.5 times, not 2 (at 32), with no scratch: by the kernel report, De-focus Mamba-B's
# backward at 197 x 128 on an H100 costs 0.66 ms against 0.81 ms at 32, for 4x the kept states (fp32:
# 315 MB against 88 MB a layer at that shape; u in bf16 is 78 MB). ``chunk_size=32`` trades back.
DEFAULT_CHUNK = 8
DEFAULT_BLOCK_CHANNELS = 64

# The backward splits the sequence of small batches until its grid has this many programs: the most SMs
# of the GPUs the kernels target (B200: 148), so that one choice fills each of them.
MIN_PROGRAMS = 148


# Backward programs an SM holds at the production tile (64 channels x 16 states on 2 warps, 255
# registers a thread: the register file bounds it at 4, on sm_80 and sm_90): the look-back rule counts
# waves with it.
BACKWARD_CTAS_PER_SM = 4


def backward_splits(batch: int, num_tiles: int, num_chunks: int, sms: int = 0) -> tuple[int, bool]:
    """Default ``(segments per sequence, look-back)`` for the backward on a GPU of ``sms`` SMs.

    Grids smaller than ``MIN_PROGRAMS``: enough segments (of whole chunks, at most one per chunk) to
    reach it, run in parallel after a carry pass. Grids of at least a wave whose last wave would be
    mostly empty (e.g. 768 rows on an H100's 528 slots: 1.45 waves): two segments chained by look-back,
    each row's last segment among the first programs to start and its first among the last, so that the
    waves even out (1.5 waves of half the work) and, at a wave of rows or more, no program waits. Else 1.
    """
    rows = batch * num_tiles
    if rows < MIN_PROGRAMS:
        return min(num_chunks, -(-MIN_PROGRAMS // rows)), False
    slots = sms * BACKWARD_CTAS_PER_SM
    if slots and rows >= slots and num_chunks >= 2:
        whole_waves = -(-rows // slots)
        half_waves = -(-2 * rows // slots) / 2
        if half_waves <= whole_waves - 0.25:
            return 2, True
    return 1, False


def backward_launch(
    dout, u, delta, A, B, C, D, z, boundary, group_size: int, chunk_size: int, block_channels: int,
    splits: int | None = None, group: int | None = None, num_warps: int | None = None,
    lookback: bool | None = None,
) -> tuple[KernelLaunch, dict[str, torch.Tensor | None]]:  # fmt: skip
    """The backward kernel's launch and the tensors it writes (gradients and per-program partials).

    Tunables: ``splits`` (segments each sequence is cut into; default :func:`backward_splits`),
    ``lookback`` (segments chained, each waiting for the carry of the one to its right, instead of a
    carry pass; default :func:`backward_splits`'s, else off),
    ``group`` (tokens whose states are recomputed into registers at once: 1, 2 or 4 dividing
    ``chunk_size``; default the largest) and ``num_warps`` (they split the state; default one per 512
    state entries of a tile). With ``splits > 1`` the launch's ``prelude`` is the carry pass, a launch of
    the same kernel that ``launch.run()`` runs first (it writes every segment's carry, see
    ``triton_bwd_kernels.py``)."""
    batch, length, channels = u.shape
    state = A.shape[1]
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    if splits is None:
        splits, default_lookback = backward_splits(batch, layout.num_tiles, num_chunks, target_sms(u.device))
        lookback = default_lookback if lookback is None else lookback
    chunks_per_split = -(-num_chunks // max(1, min(splits, num_chunks)))
    splits = -(-num_chunks // chunks_per_split)  # no empty segment
    lookback = bool(lookback) and splits > 1
    group = max(g for g in (1, 2, 4) if chunk_size % g == 0) if group is None else group
    if group not in (1, 2, 4) or chunk_size % group:
        raise ValueError(f"group={group} must be 1, 2 or 4 and divide chunk_size={chunk_size}")
    tile_states = layout.block_n * layout.block_e
    num_warps = max(1, min(layout.block_n, tile_states // 512)) if num_warps is None else num_warps
    e_lo = min(layout.block_e, 32)
    capability = target_capability(u.device) or 90
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
    groups = chunk_size // group
    scratch_entries = groups - 2 if groups > 2 else 1  # the middle groups' entering states (see the kernel)
    scratch = torch.empty(batch * splits * scratch_entries * state * channels, **f32)
    carries = torch.empty(programs * 2 * tile_states if splits > 1 else 1, **f32)
    # look-back: the programs' start counter, a flag per segment (its carry is written), each program's
    # ticket
    tickets = torch.zeros(1 + 2 * programs if lookback else 1, dtype=torch.int32, device=u.device)
    scaled_A = (A * LOG2E).t().contiguous()  # (state, channels), as the forward's
    reads = sum(t.numel() * t.element_size() for t in (dout, u, delta, A, B, C, D, z) if t is not None)
    writes = sum(t.numel() * t.element_size() for t in grads.values() if t is not None)
    # the boundary states read back (twice with more than one group a chunk), the scratch (the state
    # entering every middle group of a chunk, written and read once) and the segments' carries (written
    # once, read by the segments to their left)
    extra = boundary.numel() * 4 * (2 if groups > 1 else 1)
    extra += 2 * 4 * batch * num_chunks * max(groups - 2, 0) * channels * state
    if splits > 1:
        extra += carries.numel() * 4 * (1 if lookback else 1 + splits // 2)
    args = dict(
        u_ptr=u, delta_ptr=delta, A_ptr=scaled_A, B_ptr=B, C_ptr=C, D_ptr=D if D is not None else u,
        z_ptr=z if z is not None else u, dout_ptr=dout, boundary_ptr=boundary, scratch_ptr=scratch,
        carry_ptr=carries, du_ptr=grads["du"], ddelta_ptr=grads["ddelta"],
        dz_ptr=grads["dz"] if z is not None else grads["du"], dA_ptr=grads["dA"],
        dD_ptr=grads["dD"] if D is not None else grads["dA"], dB_ptr=grads["dB"], dC_ptr=grads["dC"],
        ticket_ptr=tickets,
        length=length, num_chunks=num_chunks, chunks_per_split=chunks_per_split, channel_stride=1,
    )  # fmt: skip
    constexprs = dict(
        channels=channels, HAS_D=D is not None, HAS_Z=z is not None, GROUP_SIZE=group_size, CARRY_PASS=False,
        LOOKBACK=lookback,
        CHANNELS_PER_PROGRAM=layout.channels_per_program, STATE=state, E_HI=layout.block_e // e_lo, E_LO=e_lo,
        BLOCK_N=layout.block_n, CHUNK=chunk_size, GROUP=group, SPLITS=splits, WARPS=num_warps,
        # the schedule for the GPU (see the kernel); an unknown one (the interpreter) gets sm_90's
        TOKEN_BARRIER=capability != 90, FMA_CHAINS=capability < 100,
    )  # fmt: skip
    grid = (batch, layout.num_tiles, splits)
    # The loops (see the kernel): with one group a chunk, the chunk loop is the token loop; else the
    # groups' loop (and, past two groups, the loop recomputing the middle groups' entering states before
    # it) sits inside the chunk loop, whose own instructions (the first group's recomputation) run once a
    # chunk
    if groups == 1:
        token_steps, chunk_steps = chunks_per_split, 0
    else:
        middle = (chunks_per_split * (groups - 2),) if groups > 2 else ()
        token_steps, chunk_steps = (*middle, chunks_per_split * groups), chunks_per_split
    exp = batch * length * channels * state  # one decay per element (recomputing is the kernel's choice)
    prelude = ()
    if splits > 1 and not lookback:  # the carry pass; its record carries the op's floor, as the forward's
        prelude = (KernelLaunch(
            _selective_scan_bwd_kernel, grid, args, {**constexprs, "CARRY_PASS": True}, num_warps=num_warps,
            work=LaunchWork(token_steps=token_steps, exp=exp, bytes_min=reads + writes,
                            bytes_moved=reads + extra, chunk_steps=chunk_steps, token_marker="LDG"),
            notes={"tokens": chunks_per_split * chunk_size},
        ),)  # fmt: skip
    launch = KernelLaunch(
        _selective_scan_bwd_kernel, grid, args, constexprs, num_warps=num_warps,
        work=LaunchWork(token_steps=token_steps, exp=exp, bytes_min=reads + writes,
                        bytes_moved=reads + writes + extra, chunk_steps=chunk_steps),
        notes={"tokens": chunks_per_split * chunk_size, "lookback": lookback},
        prelude=prelude, zeroed=("ticket_ptr",) if lookback else (),
    )  # fmt: skip
    return launch, grads


def backward_candidates(u: torch.Tensor, state: int, group_size: int, chunk_size: int,
                        block_channels: int) -> list[dict[str, int | bool]]:  # fmt: skip
    """The backward's autotune space: the shape-chosen default first, then one tunable changed at a time
    (twice / half the warps, groups of 2 tokens, and for a split sequence no split or twice the
    segments). Each computes the same function (tested); ``autotune`` times them on CUDA."""
    batch, length, channels = u.shape
    layout = _Layout(channels, state, group_size, block_channels)
    num_chunks = -(-length // chunk_size)
    splits, lookback = backward_splits(batch, layout.num_tiles, num_chunks, target_sms(u.device))
    warps = max(1, min(layout.block_n, layout.block_n * layout.block_e // 512))
    candidates: list[dict[str, int | bool]] = [{}]
    candidates += [{"num_warps": w} for w in (warps // 2, warps * 2) if 1 <= w <= layout.block_n]
    if chunk_size % 4 == 0:  # the default groups 4 tokens
        candidates.append({"group": 2})
    if splits > 1 and not lookback:
        candidates += [{"splits": 1}, {"splits": min(num_chunks, 2 * splits)}]
    elif lookback:
        candidates.append({"splits": 1})
    if not lookback and num_chunks >= 2:  # two segments chained by look-back
        candidates.append({"splits": 2, "lookback": True})
    return candidates


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
    segments: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, boundary)``: the output in ``u``'s dtype (fp32 if ``fp32_out``) and, when
    ``store_boundary``, the fp32 state at the end of every chunk (else an empty tensor). ``segments``:
    the forward's sequence split (0: from the shapes and the device)."""
    config = (group_size, chunk_size, block_channels, fp32_out, store_boundary)
    with device_guard(u):
        if segments:  # the caller's split: not tuned
            tunables = {"segments": segments}
        else:
            key = (tuple(u.shape), A.shape[1], u.dtype, D is not None, z is not None, *config)
            tunables = autotune.choose(
                "selective_scan_fwd", key, {},
                lambda: forward_candidates(u, A.shape[1], group_size, chunk_size, block_channels),
                lambda params: forward_launch(u, delta, A, B, C, D, z, *config, **params)[0].run, u.device,
            )  # fmt: skip
        launch, out, boundary = forward_launch(u, delta, A, B, C, D, z, *config, **tunables)
        if store_boundary:  # the kernel skips the last chunk's end state (never read back): define it
            boundary[:, -1].zero_()
        launch.run()
    return out, boundary


@selective_scan_triton_fwd.register_fake
def _(u, delta, A, B, C, D, z, group_size, chunk_size, block_channels, fp32_out, store_boundary, segments=0):
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
    dout = dout.contiguous()
    config = (group_size, chunk_size, block_channels)
    with device_guard(u):
        key = (tuple(u.shape), A.shape[1], u.dtype, D is not None, z is not None, *config)
        tunables = autotune.choose(
            "selective_scan_bwd", key, {}, lambda: backward_candidates(u, A.shape[1], *config),
            lambda params: backward_launch(dout, u, delta, A, B, C, D, z, boundary, *config, **params)[0].run,
            u.device,
        )  # fmt: skip
        launch, grads = backward_launch(dout, u, delta, A, B, C, D, z, boundary, *config, **tunables)
        launch.run()
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
    u, delta, A, B, C, D, z, group_size, chunk_size, block_channels, *_ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(u, delta, A, B, C, D, z, output[1])
    ctx.config = (group_size, chunk_size, block_channels)
    ctx.present = (D is not None, z is not None)


def _triton_backward(ctx, dout, _dboundary):
    u, delta, A, B, C, D, z, boundary = ctx.saved_tensors
    grads = selective_scan_triton_bwd(dout, u, delta, A, B, C, D, z, boundary, *ctx.config)
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
    chunk_size: int = DEFAULT_CHUNK,
    block_channels: int = DEFAULT_BLOCK_CHANNELS,
    segments: int = 0,
) -> torch.Tensor:
    """Same contract as ``selective_scan_naive``, on Triton; differentiable in every tensor argument.

    ``chunk_size``: tokens between the states the forward keeps for the backward (the backward
    recomputes the rest). ``block_channels``: channels per program when no group norm is fused.
    ``segments``: the forward's sequence split (0: split only when the grid is smaller than the GPU).
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
        return selective_scan_triton_fwd(u, delta, A, B, C, D, z, *config, False, store_boundary, segments)[0]
    # wide groups: the kernel's raw scan in fp32, then the epilogue in PyTorch (fp32, autograd)
    config = (0, chunk_size, block_channels)
    y = selective_scan_triton_fwd(u, delta, A, B, C, None, None, *config, True, store_boundary, segments)[0]
    as_f32 = [t.float() if t is not None else None for t in (u, D, z)]
    return mamba_epilogue(y, as_f32[0], as_f32[1], as_f32[2], group_size).to(u.dtype)
