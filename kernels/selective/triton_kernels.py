"""Triton backward kernel of the selective bandpass scan and its fused epilogue (the forward is in
``triton_fwd_kernels.py``).

``B`` and ``C`` arrive already rotated (the launcher applies the released rotary in PyTorch, in fp32: they
are ``(batch, length, state)``, a few MB, and rotating them inside the loop cost every thread a sin and a
cos per token and state).

Backward without stored states: the forward writes the state at the end of every ``CHUNK`` tokens;
the backward walks the chunks last to first, recomputes a chunk's states from its boundary into a
per-program scratch and runs the adjoint recurrence ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}``
back through the chunk. Gradients that reduce over channels (``B``, ``C``) or over tokens (``A``,
``D``) are written as per-program partial sums and reduced by the caller, which keeps the kernels
deterministic (no atomics). Tokens past the end of the sequence load as ``u = delta = 0``, which makes
a step the identity (decay 1, no input), so chunks need no special tail handling.

Precision: every input is loaded and converted to fp32; the state, the epilogue and every gradient are
computed in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS: tl.constexpr = tl.constexpr(1e-6)


# ``channel_stride`` (always 1): see the forward (``triton_fwd_kernels.py``); here it keeps the
# (state, channels) boundary load from imposing its layout on the (channels, state) state.
@triton.jit(do_not_specialize=["channel_stride"])
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr, boundary_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr,
    length, channels, state, num_chunks, num_tiles, channel_stride,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr,
    CHANNELS_PER_PROGRAM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    batch_index = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch * length * channels is large
    tile = tl.program_id(1)
    local_e = tl.arange(0, BLOCK_E)
    offs_e = tile * CHANNELS_PER_PROGRAM + local_e
    mask_e = (local_e < CHANNELS_PER_PROGRAM) & (offs_e < channels)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < state
    mask_en = mask_e[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_e[:, None] * state + offs_n[None, :], mask=mask_en, other=0.0).to(tl.float32)
    D = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    scratch = scratch_ptr + (batch_index * num_tiles + tile) * (CHUNK * BLOCK_E * BLOCK_N)
    scratch_offsets = local_e[:, None] * BLOCK_N + offs_n[None, :]

    grad_carry = tl.zeros((BLOCK_E, BLOCK_N), tl.float32)  # exp(delta_{t+1} A) g_{t+1}
    dA = tl.zeros((BLOCK_E, BLOCK_N), tl.float32)
    dD = tl.zeros((BLOCK_E,), tl.float32)
    for reverse_chunk in range(num_chunks):
        chunk = num_chunks - 1 - reverse_chunk
        # 1. recompute the chunk's states from the state that entered it
        boundary = boundary_ptr + ((batch_index * num_chunks + tl.maximum(chunk - 1, 0)) * channels) * state
        s = tl.load(
            boundary + offs_n[None, :] * channels + offs_e[:, None] * channel_stride,
            mask=mask_en & (chunk > 0), other=0.0,
        )
        for step in range(CHUNK):
            t = chunk * CHUNK + step
            live = t < length
            row = batch_index * length + t
            mask_te = mask_e & live
            u = tl.load(u_ptr + row * channels + offs_e, mask=mask_te, other=0.0).to(tl.float32)
            delta = tl.load(delta_ptr + row * channels + offs_e, mask=mask_te, other=0.0).to(tl.float32)
            b = tl.load(B_ptr + row * state + offs_n, mask=mask_n & live, other=0.0)
            s = tl.exp(delta[:, None] * A) * s + (delta * u)[:, None] * b[None, :]
            tl.store(scratch + step * (BLOCK_E * BLOCK_N) + scratch_offsets, s)
        tl.debug_barrier()
        # 2. the adjoint recurrence back through the chunk
        for reverse_step in range(CHUNK):
            step = CHUNK - 1 - reverse_step
            t = chunk * CHUNK + step
            live = t < length
            row = batch_index * length + t
            mask_te = mask_e & live
            s = tl.load(scratch + step * (BLOCK_E * BLOCK_N) + scratch_offsets)
            u = tl.load(u_ptr + row * channels + offs_e, mask=mask_te, other=0.0).to(tl.float32)
            delta = tl.load(delta_ptr + row * channels + offs_e, mask=mask_te, other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + row * channels + offs_e, mask=mask_te, other=0.0).to(tl.float32)
            b = tl.load(B_ptr + row * state + offs_n, mask=mask_n & live, other=0.0)
            c = tl.load(C_ptr + row * state + offs_n, mask=mask_n & live, other=0.0)

            # epilogue backward: out = (norm(y) + D u) * silu(z)
            y = tl.sum(s * c[None, :], axis=1)
            rstd = 1.0
            if GROUP_SIZE > 0:
                rstd = tl.rsqrt(tl.sum(y * y, axis=0) / GROUP_SIZE + NORM_EPS)
            y_normed = y * rstd
            grad_pre_gate = dout
            if HAS_Z:
                z = tl.load(z_ptr + row * channels + offs_e, mask=mask_te, other=0.0).to(tl.float32)
                gate = tl.sigmoid(z)
                pre_gate = y_normed
                if HAS_D:
                    pre_gate += u * D
                dz = dout * pre_gate * gate * (1.0 + z * (1.0 - gate))
                tl.store(dz_ptr + row * channels + offs_e, dz.to(dz_ptr.dtype.element_ty), mask=mask_te)
                grad_pre_gate = dout * z * gate
            du = tl.zeros((BLOCK_E,), tl.float32)
            if HAS_D:
                dD += grad_pre_gate * u
                du = grad_pre_gate * D
            dy = grad_pre_gate
            if GROUP_SIZE > 0:
                dy = rstd * (
                    grad_pre_gate - y_normed * (tl.sum(grad_pre_gate * y_normed, axis=0) / GROUP_SIZE)
                )

            # scan backward
            g = grad_carry + dy[:, None] * c[None, :]
            delta_u = delta * u
            grad_x = tl.sum(g * b[None, :], axis=1)
            # d loss / d(delta_t A) = g_t * exp(delta_t A) s_{t-1} = g_t * (s_t - delta_t u_t B'_t)
            grad_log_decay = g * (s - delta_u[:, None] * b[None, :])
            du += grad_x * delta
            ddelta = grad_x * u + tl.sum(grad_log_decay * A, axis=1)
            dA += grad_log_decay * delta[:, None]
            tl.store(du_ptr + row * channels + offs_e, du.to(du_ptr.dtype.element_ty), mask=mask_te)
            tl.store(
                ddelta_ptr + row * channels + offs_e, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_te
            )
            grad_carry = tl.exp(delta[:, None] * A) * g

            # this tile's share of d loss / d B_t and d C_t
            db = tl.sum(g * delta_u[:, None], axis=0)
            dc = tl.sum(dy[:, None] * s, axis=0)
            partial_row = (row * num_tiles + tile) * state
            tl.store(dB_ptr + partial_row + offs_n, db, mask=mask_n & live)
            tl.store(dC_ptr + partial_row + offs_n, dc, mask=mask_n & live)
        tl.debug_barrier()  # the next chunk overwrites the scratch

    partial = batch_index * channels
    tl.store(dA_ptr + (partial + offs_e[:, None]) * state + offs_n[None, :], dA, mask=mask_en)
    if HAS_D:
        tl.store(dD_ptr + partial + offs_e, dD, mask=mask_e)
