"""Triton kernel of the selective bandpass scan's forward with its fused epilogue.

``B`` and ``C`` arrive already rotated (the launcher applies the released rotary in PyTorch, in fp32: they
are ``(batch, length, state)``, a few MB, and rotating them inside the loop cost every thread a sin and a
cos per token and state).

Forward: one program of one warp owns one batch row and one tile of channels (one group of the group RMS
norm when it is fused) with all ``state`` dimensions, and walks the sequence token by token. The state is
held as ``(state, channels)`` so that each thread keeps every state of its channels in registers: the
read-out ``sum_n s C`` is in-thread arithmetic and the group norm's sum over channels stays inside the
warp (shuffles, no barrier). ``A`` arrives transposed and scaled by ``log2(e)``, so the decay is one
``exp2`` of ``delta * A``.

The backward is in ``triton_bwd_kernels.py``; it recomputes states from the boundary states that the
forward writes every ``CHUNK`` tokens (``STORE_BOUNDARY``).

Precision: every input is loaded and converted to fp32; the state, the epilogue and every gradient are
computed in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS: tl.constexpr = tl.constexpr(1e-6)


# ``channel_stride`` (always 1) stays a runtime value: known to be 1, Triton would lay every tensor out
# for vectorised loads along the channels (several channels a thread, a state split over threads), and
# convert layouts (shuffles, barriers) in every token step.
@triton.jit(do_not_specialize=["channel_stride"])
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, boundary_ptr,
    length, channels, num_chunks, channel_stride,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr, STORE_BOUNDARY: tl.constexpr,
    CHANNELS_PER_PROGRAM: tl.constexpr, STATE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):  # fmt: skip
    batch_index = tl.program_id(0)
    tile = tl.program_id(1)
    local_e = tl.arange(0, BLOCK_E)
    channel = tile * CHANNELS_PER_PROGRAM + local_e
    mask_e = (local_e < CHANNELS_PER_PROGRAM) & (channel < channels)
    offs_e = channel * channel_stride
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < STATE
    mask_ne = mask_n[:, None] & mask_e[None, :]
    A = tl.load(A_ptr + offs_n[:, None] * channels + offs_e[None, :], mask=mask_ne, other=0.0)
    D = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0)
    sequence = batch_index.to(tl.int64) * length  # 64-bit: batch * length * channels is large
    u_row, delta_row = u_ptr + sequence * channels + offs_e, delta_ptr + sequence * channels + offs_e
    z_row, out_row = z_ptr + sequence * channels + offs_e, out_ptr + sequence * channels + offs_e
    B_row, C_row = B_ptr + sequence * STATE + offs_n, C_ptr + sequence * STATE + offs_n
    # chunk states as (state, channels): stored as held, coalesced along the channels
    boundary = boundary_ptr + batch_index.to(tl.int64) * num_chunks * STATE * channels
    # Loads run one token ahead (issued before the step that does not need them), so that a warp's
    # step does not wait a memory latency when too few warps share its scheduler to hide it.
    u = tl.load(u_row, mask=mask_e, other=0.0)
    delta = tl.load(delta_row, mask=mask_e, other=0.0)
    z = tl.load(z_row, mask=mask_e & HAS_Z, other=0.0)
    b = tl.load(B_row, mask=mask_n, other=0.0)
    c = tl.load(C_row, mask=mask_n, other=0.0)
    s = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    for chunk in range(num_chunks):
        for token in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, length)):
            ahead = token + 1 < length
            u_row += channels
            delta_row += channels
            z_row += channels
            B_row += STATE
            C_row += STATE
            u_next = tl.load(u_row, mask=mask_e & ahead, other=0.0)
            delta_next = tl.load(delta_row, mask=mask_e & ahead, other=0.0)
            z_next = tl.load(z_row, mask=mask_e & ahead & HAS_Z, other=0.0)
            b_next = tl.load(B_row, mask=mask_n & ahead, other=0.0)
            c_next = tl.load(C_row, mask=mask_n & ahead, other=0.0)

            u32, delta32 = u.to(tl.float32), delta.to(tl.float32)
            s = tl.exp2(delta32[None, :] * A) * s + b[:, None] * (delta32 * u32)[None, :]
            y = tl.sum(s * c[:, None], axis=0)
            if GROUP_SIZE > 0:
                y = y * tl.rsqrt(tl.sum(y * y, axis=0) / GROUP_SIZE + NORM_EPS)
            if HAS_D:
                y += u32 * D
            if HAS_Z:
                z32 = z.to(tl.float32)
                y = y * z32 * tl.sigmoid(z32)
            tl.store(out_row, y.to(out_ptr.dtype.element_ty), mask=mask_e)
            out_row += channels
            u, delta, z, b, c = u_next, delta_next, z_next, b_next, c_next
        if STORE_BOUNDARY:  # the state at the end of the chunk; the last one is never read back
            offsets = chunk * STATE * channels + offs_n[:, None] * channels + offs_e[None, :]
            tl.store(boundary + offsets, s, mask=mask_ne & (chunk < num_chunks - 1))
