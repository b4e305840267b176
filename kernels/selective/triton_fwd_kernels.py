"""The Triton forward of the selective bandpass scan and its fused epilogue (group RMS norm, ``+ D u``,
``* silu(z)``).

``B`` and ``C`` arrive already rotated; ``A`` arrives transposed to ``(state, channels)`` and scaled by
``log2(e)``, so the decay is one ``exp2`` of ``delta * A``.

Layout: one program owns one batch row and one tile of channels (one group of the group RMS norm when
it is fused) with all ``state`` dimensions. The state is held as ``(state, channels)`` so that each
thread keeps every state of its channels in registers: the read-out ``sum_n s C`` is in-thread
arithmetic. At one warp (two channels a thread) the group norm's sum over channels stays inside the
warp (shuffles, no barrier); the launcher gives a group two warps (one channel a thread, the norm's sum
through shared memory) where few programs share an SM, to halve each warp's instructions a token.

Token loop: ``STAGES`` stages of ``TOKENS`` tokens an iteration (by default one stage of two), and the
loads of a stage are issued a stage ahead of its steps. With few resident warps (577 tokens x batch 32:
about three programs an SM) an iteration cannot be shorter than one memory latency; two tokens an
iteration halve the latencies paid per token. (Two stages reload each stage right after its steps,
into the registers they freed; more registers, a tuning option.)

Sequence split (``MODE``), for grids smaller than the GPU (batch 2): the recurrence is linear, so the
state at token ``t`` of a segment is its local state (scanned from zero inside the segment) plus the
segment's start state decayed by ``prod exp2(delta A)`` since the segment began. Two launches over a
``(batch, tiles, segments)`` grid:

* ``MODE = 1`` (local pass): every segment scans from zero; writes the local read-out ``C . s`` per token
  (fp32, before the epilogue), the local state at its chunk ends (into ``boundary``), and its local
  end state and ``sum delta`` (the segment's total decay is ``exp2(A sum delta)``).
* ``MODE = 2`` (output pass): a segment first combines the end states of the segments before it into
  its start state ``h`` (a few steps of ``h = exp2(A sum delta) h + local end``), then walks its tokens
  with the homogeneous recurrence ``h = exp2(delta A) h``: the output is the epilogue of
  ``local read-out + C . h``, and each chunk-end state is ``local + h``.

``MODE = 0`` is the single pass (one segment). Every program writes only its own tokens and chunks and
the passes are separate launches, so the result is deterministic (no atomics, no inter-program waits).
Tokens past the end of a segment load as ``u = delta = 0``, which makes a step the identity.

Precision: every input is loaded and converted to fp32; the state and the epilogue are fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS: tl.constexpr = tl.constexpr(1e-6)


@triton.jit
def _load_token(ptrs, rows, token, MODE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                STATE: tl.constexpr):  # fmt: skip
    """One token's inputs, ``(u, delta, z, b, c, local)``: what ``MODE`` reads, zeros for the rest (the
    compiler drops them); a token at or past ``end`` loads as zeros (an identity step). ``ptrs``: the
    tensors ``(u, delta, z, B, C, local)``; ``rows``: ``(sequence, end, channels, offs_e, mask_e, offs_n,
    mask_n)``."""
    u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, local_ptr = ptrs
    sequence, end, channels, offs_e, mask_e, offs_n, mask_n = rows
    live = token < end
    live_e = mask_e & live
    at = (sequence + token) * channels + offs_e
    delta = tl.load(delta_ptr + at, mask=live_e, other=0.0)
    u = tl.zeros(delta.shape, u_ptr.dtype.element_ty)
    if MODE != 2 or HAS_D:
        u = tl.load(u_ptr + at, mask=live_e, other=0.0)
    z = tl.zeros(delta.shape, z_ptr.dtype.element_ty)
    if MODE != 1 and HAS_Z:
        z = tl.load(z_ptr + at, mask=live_e, other=0.0)
    at_n = (sequence + token) * STATE + offs_n
    b = tl.zeros(mask_n.shape, tl.float32)
    if MODE != 2:
        b = tl.load(B_ptr + at_n, mask=mask_n & live, other=0.0)
    c = tl.load(C_ptr + at_n, mask=mask_n & live, other=0.0)
    local = tl.zeros(delta.shape, tl.float32)
    if MODE == 2:
        local = tl.load(local_ptr + at, mask=live_e, other=0.0)
    return u, delta, z, b, c, local


@triton.jit
def _load_stage(ptrs, rows, token, MODE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                STATE: tl.constexpr, TOKENS: tl.constexpr):  # fmt: skip
    """The inputs of ``TOKENS`` (1, 2 or 4) tokens from ``token`` on, a tuple of ``TOKENS`` (exactly: a
    padded tuple would be carried through the loop, copies and all)."""
    first = _load_token(ptrs, rows, token, MODE, HAS_D, HAS_Z, STATE)
    if TOKENS == 1:
        stage = (first,)
    elif TOKENS == 2:
        stage = (first, _load_token(ptrs, rows, token + 1, MODE, HAS_D, HAS_Z, STATE))
    else:
        stage = (first, _load_token(ptrs, rows, token + 1, MODE, HAS_D, HAS_Z, STATE),
                 _load_token(ptrs, rows, token + 2, MODE, HAS_D, HAS_Z, STATE),
                 _load_token(ptrs, rows, token + 3, MODE, HAS_D, HAS_Z, STATE))  # fmt: skip
    return stage


@triton.jit
def _step(s, A, D, delta_sum, inputs, out_ptr, store_mask, MODE: tl.constexpr, HAS_D: tl.constexpr,
          HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr):  # fmt: skip
    """One token: the state update, the read-out, the epilogue (``MODE`` 0 and 2) and the store (of the
    local read-out in ``MODE`` 1)."""
    u, delta, z, b, c, local = inputs
    u32, delta32 = u.to(tl.float32), delta.to(tl.float32)
    decay = tl.exp2(delta32[None, :] * A)
    if MODE == 2:  # the start state's share: decays, takes no input
        s = decay * s
        y = local + tl.sum(s * c[:, None], axis=0)
    else:
        s = decay * s + b[:, None] * (delta32 * u32)[None, :]
        y = tl.sum(s * c[:, None], axis=0)
    if MODE == 1:
        delta_sum += delta32
    else:
        if GROUP_SIZE > 0:
            y = y * tl.rsqrt(tl.sum(y * y, axis=0) / GROUP_SIZE + NORM_EPS)
        if HAS_D:
            y += u32 * D
        if HAS_Z:
            z32 = z.to(tl.float32)
            y = y * z32 * tl.sigmoid(z32)
    tl.store(out_ptr, y.to(out_ptr.dtype.element_ty), mask=store_mask)
    return s, delta_sum


@triton.jit
def _run_stage(s, A, D, delta_sum, stage, out_ptr, rows, token, MODE: tl.constexpr, HAS_D: tl.constexpr,
               HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr, TOKENS: tl.constexpr):  # fmt: skip
    """The steps of one stage's ``TOKENS`` tokens; ``out_ptr``: the output (or read-out) tensor."""
    sequence, end, channels, offs_e, mask_e, _, _ = rows
    at = out_ptr + (sequence + token) * channels + offs_e
    for i in tl.static_range(TOKENS):
        live = mask_e & (token + i < end)
        s, delta_sum = _step(s, A, D, delta_sum, stage[i], at + i * channels, live, MODE, HAS_D, HAS_Z,
                             GROUP_SIZE)  # fmt: skip
    return s, delta_sum


# ``channel_stride`` (always 1) stays a runtime value: known to be 1, Triton would lay every tensor out
# for vectorised loads along the channels (several channels a thread, a state split over threads), and
# convert layouts (shuffles, barriers) in every token step.
@triton.jit(do_not_specialize=["channel_stride"])
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, boundary_ptr,
    local_ptr, carry_ptr, delta_sum_ptr,
    length, num_chunks, chunks_per_segment, num_segments, channel_stride, channels: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr, STORE_BOUNDARY: tl.constexpr,
    CHANNELS_PER_PROGRAM: tl.constexpr, STATE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, TOKENS: tl.constexpr, STAGES: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    batch_index = tl.program_id(0)
    tile = tl.program_id(1)
    segment = tl.program_id(2)
    local_e = tl.arange(0, BLOCK_E)
    channel = tile * CHANNELS_PER_PROGRAM + local_e
    mask_e = (local_e < CHANNELS_PER_PROGRAM) & (channel < channels)
    offs_e = channel * channel_stride
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < STATE
    mask_ne = mask_n[:, None] & mask_e[None, :]
    state_offsets = offs_n[:, None] * channels + offs_e[None, :]  # (state, channels), along the channels
    A = tl.load(A_ptr + state_offsets, mask=mask_ne, other=0.0)
    D = tl.zeros((BLOCK_E,), tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0)
    first_chunk = segment * chunks_per_segment
    last_chunk = tl.minimum(first_chunk + chunks_per_segment, num_chunks)
    end = tl.minimum(last_chunk * CHUNK, length)
    sequence = batch_index.to(tl.int64) * length  # 64-bit: batch * length * channels is large
    boundary = boundary_ptr + batch_index.to(tl.int64) * num_chunks * STATE * channels
    carry = (batch_index * num_segments).to(tl.int64) * (STATE * channels)
    delta_sums = (batch_index * num_segments).to(tl.int64) * channels
    if MODE == 1:  # the store target: the local read-out, fp32, for the output pass
        target = local_ptr
    else:
        target = out_ptr

    s = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    if MODE == 2:  # the start state: the segments before this one, combined in order
        for earlier in range(segment):
            total = tl.load(delta_sum_ptr + delta_sums + earlier * channels + offs_e, mask=mask_e, other=0.0)
            local_end = tl.load(carry_ptr + carry + earlier * (STATE * channels) + state_offsets,
                                mask=mask_ne, other=0.0)  # fmt: skip
            s = tl.exp2(total[None, :] * A) * s + local_end
    delta_sum = tl.zeros((BLOCK_E,), tl.float32)

    # Loads run ahead of the steps that read them. STAGES = 1: an iteration is one stage of TOKENS tokens
    # and loads the next stage's inputs before its steps. STAGES = 2 (ping-pong): an iteration is two
    # stages, each stage's inputs reloaded (two stages ahead) right after its steps, into the registers
    # the steps freed.
    ptrs = (u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, local_ptr)
    rows = (sequence, end, channels, offs_e, mask_e, offs_n, mask_n)
    step = TOKENS * STAGES
    # (constexprs are passed one by one: unpacked from a tuple they would no longer be constant)
    x = _load_stage(ptrs, rows, first_chunk * CHUNK, MODE, HAS_D, HAS_Z, STATE, TOKENS)
    y = x
    if STAGES == 2:
        y = _load_stage(ptrs, rows, first_chunk * CHUNK + TOKENS, MODE, HAS_D, HAS_Z, STATE, TOKENS)
    for chunk in range(first_chunk, last_chunk):
        for token in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, end), step):
            if STAGES == 1:
                x_next = _load_stage(ptrs, rows, token + step, MODE, HAS_D, HAS_Z, STATE, TOKENS)
                s, delta_sum = _run_stage(s, A, D, delta_sum, x, target, rows, token,
                                          MODE, HAS_D, HAS_Z, GROUP_SIZE, TOKENS)  # fmt: skip
                x = x_next
            else:
                s, delta_sum = _run_stage(s, A, D, delta_sum, x, target, rows, token,
                                          MODE, HAS_D, HAS_Z, GROUP_SIZE, TOKENS)  # fmt: skip
                x = _load_stage(ptrs, rows, token + step, MODE, HAS_D, HAS_Z, STATE, TOKENS)
                s, delta_sum = _run_stage(s, A, D, delta_sum, y, target, rows, token + TOKENS,
                                          MODE, HAS_D, HAS_Z, GROUP_SIZE, TOKENS)  # fmt: skip
                y = _load_stage(ptrs, rows, token + step + TOKENS, MODE, HAS_D, HAS_Z, STATE, TOKENS)
        # the state at the end of the chunk; the sequence's last one is never read back
        if STORE_BOUNDARY:
            # offsets from the chunk on (not the loop-invariant ``state_offsets``: 32 registers a thread
            # held through the token loop)
            # the chunk's row, then per thread one register and per element an immediate (``channels``
            # is a compile-time constant; the boundary, which this kernel lays out, has channel stride
            # 1), marked not contiguous: a vectorised store would convert the state's layout
            row = boundary + chunk * (STATE * channels)
            at = tl.max_contiguous(row + (offs_n[:, None] * channels + channel[None, :]), [1, 1])
            keep = mask_ne & (chunk < num_chunks - 1)
            if MODE == 2:  # the local state (the first pass's) plus the start state's share
                tl.store(at, tl.load(at, mask=keep, other=0.0) + s, mask=keep)
            else:
                tl.store(at, s, mask=keep)
    if MODE == 1:  # what the later segments need: the local end state and the total decay
        tl.store(carry_ptr + carry + segment * (STATE * channels) + state_offsets, s, mask=mask_ne)
        tl.store(delta_sum_ptr + delta_sums + segment * channels + offs_e, delta_sum, mask=mask_e)
