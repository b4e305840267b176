"""Triton kernel of the selective bandpass scan's backward, with its fused epilogue.

One program owns one batch row, one tile of channels (one norm group when the norm is fused) and one
segment of the sequence. Its ``(state, channels)`` state is held as ``(E_HI, SPW, WARPS, E_LO)``: the
channels' low part over a warp's lanes, the states split over the warps (``SPW`` each), every thread
holding whole channels of its warp's states. The warps are a dimension of the tensors, so per-channel
values are ``(E_HI, 1, WARPS, E_LO)`` (each warp loads and keeps its copy) and per-state ones
``(1, SPW, WARPS, E_LO)`` (each lane its copy): every operand already sits where the state's
arithmetic needs it, with no layout conversion through shared memory in the token loops. The
gradients that sum over channels (``B``, ``C``) and the group norm's sums stay inside a warp
(shuffles; at the production tile ``dB`` and ``dC`` are reduce-scattered over the lanes, see
``_store_scattered``: 4 exchanges, each a warp-local gather, and a butterfly step instead of 16
butterfly sums; the norm's two sums share one pass, ``_channel_sums``); only the sums over the state
cross warps: the read-out, and the gradients of ``u`` and ``delta`` (one shared-memory exchange for the
two), each after a chain of FMAs over the thread's states (``_state_dot``).

States in reverse order without storing them all: the forward keeps the state at the end of every
``CHUNK`` tokens. The backward walks its segment's chunks last to first. For a chunk it (1) recomputes
the states from the one entering the chunk up to the one entering its last group of ``GROUP`` tokens,
which stays in registers (the ones entering the middle groups, at more than two groups a chunk, go to a
small scratch), then (2) walks the groups last to first: recomputes the group's ``GROUP`` states into
registers (unrolled), then runs the adjoint recurrence ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}``
back through them, with the epilogue's backward (group RMS norm, ``D u``, ``silu(z)``) fused; each
group's iteration ends with the load of the state entering the group before it (the scratch's, or, for
the chunk's first group, the chunk's entering state read again). At the default two groups a chunk a
token is recomputed 1.5 times and nothing round-trips a scratch. In sm_90's schedule the adjoint takes
the decays the group's recomputation computed (all but its first token's: four held spill) and the state
before each token from the group's registers, so that ``d loss / d(delta_t A)`` is the carry
``exp(delta_t A) g_t`` times ``s_{t-1}``: one multiply (a group's first token, whose state before is not
held, takes ``g_t (s_t - delta_t u_t B_t)``, as every token does in sm_80's schedule).

Segments (``SPLITS`` programs per row and tile). The adjoint is linear in the carry that enters a
segment from the right: the segment's carry out is ``L + P * carry_in``, with ``L`` its carry out from a
zero carry and ``P = exp(A sum_t delta_t)``. Small batches split the sequence so that the grid fills the
GPU: a first launch (``CARRY_PASS``) writes every segment's ``L`` and ``P``; the second combines those of
the segments to its right into its incoming carry and computes the gradients. Large grids whose last
wave would be mostly empty split in two by look-back (``LOOKBACK``) instead: programs take their work by
ticket (an atomic counter: the order they start in), every row's last segment first; a segment waits for
the flag of the one to its right, reads the carry that one ended with, and at its end publishes its own
(store, barrier, flag with release semantics). No carry pass; each row's segments run one after the
other, the first ones while other rows' last ones run, which evens out the waves. No atomic sums:
gradients that reduce over channels (``B``, ``C``) or over tokens (``A``, ``D``) are per-program partial
sums that the caller reduces, so results do not depend on timing (the counter and flags only order work).

Tokens past the end of the sequence have ``delta = dout = 0`` (their loads read the last token, or, in
sm_80's low-register schedule, are masked to zeros): a step is then the identity and contributes
nothing, so chunks need no tail handling. Everything is computed in fp32; ``A`` arrives as
``A log2(e)``, ``(state, channels)``, so a decay is one ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS: tl.constexpr = tl.constexpr(1e-6)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _per_thread(base, thread_part, register_part):
    """``base + thread_part + register_part``, where ``thread_part`` is one value per thread and
    ``register_part`` a compile-time constant per register: one address register per thread and
    immediates. Marked not contiguous: vectorised, the access would come in a layout of its own,
    converted through shared memory at every use."""
    return tl.max_contiguous((base + thread_part) + register_part, [1, 1, 1, 1])


@triton.jit
def _load(ptr, mask, live, FULL: tl.constexpr, MASKED: tl.constexpr):
    """A token's load: masked by ``live`` (zeros past the end) when ``MASKED``, else of a token in the
    sequence (clamped by the caller), and then masked only where the block is not full (a masked load
    zeroes its register first)."""
    if MASKED:
        return tl.load(ptr, mask=mask & live, other=0.0)
    elif FULL:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _past_the_end_zero(x, live, MASKED: tl.constexpr):
    """``x``, or 0 past the end (where a masked load already read 0)."""
    if MASKED:
        return x
    else:
        return tl.where(live, x, 0.0)


@triton.jit
def _token_inputs(u_seq, delta_seq, B_seq, tok, live, offs_e, mask_e, offs_n, mask_n, channels,
                  STATE: tl.constexpr, FULL_E: tl.constexpr, FULL_N: tl.constexpr,
                  MASKED: tl.constexpr):  # fmt: skip
    """A token's ``u`` and ``delta`` (per channel, fp32) and ``B`` (per state). Past the end ``delta``
    is 0, which makes the step the identity (``u`` and ``B`` enter only through products with it); the
    loads there are either masked (``MASKED``) or of the last token (``tok`` clamped by the caller)."""
    u = _load(_per_thread(u_seq + tok * channels, *offs_e), mask_e, live, FULL_E, MASKED).to(tl.float32)
    delta = _load(_per_thread(delta_seq + tok * channels, *offs_e), mask_e, live, FULL_E, MASKED)
    delta = _past_the_end_zero(delta.to(tl.float32), live, MASKED)
    b = _load(_per_thread(B_seq + tok * STATE, *offs_n), mask_n, live, FULL_N, MASKED)
    return u, delta, b


@triton.jit
def _channel_sum(x):
    """Sum over the channels (axes 0 and 3: registers, then lanes), per state and warp."""
    return tl.sum(tl.sum(x, axis=0, keep_dims=True), axis=3, keep_dims=True)


@triton.jit
def _channel_sums(a, b):
    """``(_channel_sum(a), _channel_sum(b))`` in one pass over the lanes: the pair is reduce-scattered
    over lane bit 0 (one exchange), summed over the other lane bits (a butterfly of one value), then
    swapped back (one shuffle): 1 + log2(lanes) shuffles where two butterflies take 2 log2(lanes)."""
    E_LO: tl.constexpr = a.shape[3]
    a = tl.sum(a, axis=0, keep_dims=True)
    b = tl.sum(b, axis=0, keep_dims=True)
    if E_LO == 1:  # (if / else: see _state_dot)
        return a, b
    else:
        lane = tl.arange(0, E_LO)[None, None, None, :]
        x = _exchange(a, b, lane, 0)  # lanes with bit 0 clear: a's pair sums, the others b's
        halves: tl.constexpr = (1, 1, a.shape[2], E_LO // 2, 2)
        pair_sums = tl.sum(tl.reshape(x, halves), axis=3, keep_dims=True)
        x = tl.reshape(tl.broadcast_to(pair_sums, halves), x.shape)
        other = tl.gather(x, tl.broadcast_to(lane ^ 1, x.shape), 3)
        even = (lane & 1) == 0
        return tl.where(even, x, other), tl.where(even, other, x)


@triton.jit
def _state_dot(x, y, CHAIN: tl.constexpr):
    """``sum(x * y, axis=1)`` (over the thread's states, kept as a dimension of 1) as one chain of FMAs
    (``CHAIN``): a sum's tree costs a multiply per pair of leaves on top. (sm_100 pairs a tree's
    independent multiplies and adds into two-wide instructions: there the tree is shorter.)"""
    SPW: tl.constexpr = x.shape[1]
    # (if / else: Triton compiles the statements after a return inside a compile-time if)
    if (SPW != 8) | (not CHAIN):
        return tl.sum(x * y, axis=1, keep_dims=True)
    else:
        shape: tl.constexpr = (x.shape[0], x.shape[2], x.shape[3], 2, 2, 2)
        x = tl.reshape(tl.permute(tl.broadcast_to(x, x.shape), (0, 2, 3, 1)), shape)
        y = tl.reshape(tl.permute(tl.broadcast_to(y, x.shape[:1] + (8,) + x.shape[1:3]), (0, 2, 3, 1)), shape)
        x0, x1 = tl.split(x)
        y0, y1 = tl.split(y)
        x00, x01 = tl.split(x0)
        x10, x11 = tl.split(x1)
        y00, y01 = tl.split(y0)
        y10, y11 = tl.split(y1)
        a, b = tl.split(x00)
        c, d = tl.split(y00)
        acc = a * c
        acc = tl.fma(b, d, acc)
        a, b = tl.split(x01)
        c, d = tl.split(y01)
        acc = tl.fma(a, c, acc)
        acc = tl.fma(b, d, acc)
        a, b = tl.split(x10)
        c, d = tl.split(y10)
        acc = tl.fma(a, c, acc)
        acc = tl.fma(b, d, acc)
        a, b = tl.split(x11)
        c, d = tl.split(y11)
        acc = tl.fma(a, c, acc)
        acc = tl.fma(b, d, acc)
        return tl.expand_dims(acc, 1)


@triton.jit
def _pair_sum(w, PAIRS_SHAPE: tl.constexpr, AXIS: tl.constexpr):
    """``w`` plus its partner lane's: the lane dimension viewed as ``PAIRS_SHAPE``, summed over ``AXIS``
    (the lane bit that tells the partners apart)."""
    split = tl.reshape(w, PAIRS_SHAPE)
    return tl.reshape(tl.broadcast_to(tl.sum(split, axis=AXIS, keep_dims=True), PAIRS_SHAPE), w.shape)


@triton.jit
def _exchange(v0, v1, lane, BIT: tl.constexpr):
    """One level of a reduce-scatter over the lanes (the last axis): a lane whose bit ``BIT`` is 0 gets
    its ``v0`` plus its partner's (the lane differing in that bit), the other its ``v1`` plus the
    partner's: one shuffle (a gather within the warp) for two values, where all-reducing both takes two."""
    bit = (lane >> BIT) & 1
    send = tl.where(bit == 0, v1, v0)
    partner = tl.broadcast_to(lane ^ (1 << BIT), send.shape)
    return tl.where(bit == 0, v0, v1) + tl.gather(send, partner, len(send.shape) - 1)


@triton.jit
def _store_scattered(db, dc, dB_ptr, dC_ptr, live, STATE: tl.constexpr, WARPS: tl.constexpr):
    """Stores ``db`` and ``dc`` ``(1, 8, WARPS, 32)``, summed over the 32 lanes: a reduce-scatter (4
    exchanges of pairs, 16 values to 1 a lane, then 1 butterfly step) instead of 16 butterfly sums of
    5 steps each. Lane bit 4 picks B or C, bits 3..1 the warp's state; both lanes of a pair store their
    (bitwise equal) sum: a duplicate store costs less than the predicate that would skip it."""
    lane = tl.arange(0, 32)[None, None, None, :]
    x = _exchange(db, dc, lane, 4)  # (1, 8, WARPS, 32)
    lane = tl.arange(0, 32)[None, None, :]
    h0, h1 = tl.split(tl.permute(tl.reshape(x, (2, 4, WARPS, 32)), (1, 2, 3, 0)))
    x = _exchange(h0, h1, lane, 3)  # (4, WARPS, 32)
    h0, h1 = tl.split(tl.permute(tl.reshape(x, (2, 2, WARPS, 32)), (1, 2, 3, 0)))
    x = _exchange(h0, h1, lane, 2)  # (2, WARPS, 32)
    lane = tl.arange(0, 32)[None, :]
    h0, h1 = tl.split(tl.permute(x, (1, 2, 0)))
    x = _exchange(h0, h1, lane, 1)  # (WARPS, 32)
    x = _pair_sum(x, (WARPS, 16, 2), 2)
    state = (
        tl.arange(0, WARPS)[:, None] * 8 + ((lane >> 3) & 1) * 4 + ((lane >> 2) & 1) * 2 + ((lane >> 1) & 1)
    )
    ptr = tl.where(((lane >> 4) & 1) == 0, dB_ptr, dC_ptr) + state
    tl.store(ptr, x, mask=live & (state < STATE))


@triton.jit
def _token_step(s, A, t, first, length, u_seq, delta_seq, B_seq, offs_e, mask_e, offs_n, mask_n, channels,
                STATE: tl.constexpr, FULL_E: tl.constexpr, FULL_N: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """The state after token ``t`` from the one before it (the identity past the end),
    ``s_t = exp(delta_t A) s_{t-1} + delta_t u_t B_t`` on ``(E_HI, SPW, WARPS, E_LO)``, and the decay
    ``exp(delta_t A)``. The inputs' pointers are ``first`` tokens before the sequence's start."""
    tok = first + (t if MASKED else tl.minimum(t, length - 1))
    u, delta, b = _token_inputs(u_seq, delta_seq, B_seq, tok, t < length, offs_e, mask_e, offs_n, mask_n,
                                channels, STATE, FULL_E, FULL_N, MASKED)  # fmt: skip
    decay = tl.exp2(delta * A)
    return decay * s + b * (delta * u), decay


@triton.jit
def _adjoint_step(
    s, s_prev, decay, grad_carry, dA, dD, A, D, row, tok, live, tile, num_tiles, channels, offs_e, mask_e,
    offs_n, mask_n, first_warp, first_lane, u_seq, delta_seq, B_seq, C_seq, z_seq, dout_seq, du_ptr,
    ddelta_ptr, dz_ptr, dB_ptr, dC_ptr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr, CARRY_PASS: tl.constexpr,
    STATE: tl.constexpr, SCATTER: tl.constexpr, WARPS: tl.constexpr, FULL_E: tl.constexpr,
    FULL_N: tl.constexpr, MASKED: tl.constexpr, FMA_CHAINS: tl.constexpr, HAS_DECAY: tl.constexpr,
):  # fmt: skip
    """One token of the adjoint, given its state ``s_t``, the one before, ``s_{t-1}``, its decay
    ``exp(delta_t A)`` (``HAS_DECAY``, else computed here) and the carry ``exp(delta_{t+1} A) g_{t+1}``:
    stores the token's gradients, returns the carry for the token before and the running ``dA``, ``dD``."""
    if MASKED:  # (see the kernel's TOKEN_BARRIER)
        tl.debug_barrier()
    mask_te = mask_e & live
    # loads read token ``tok`` (clamped to the sequence); past the end ``delta`` and ``dout`` are 0, so
    # the token's step is the identity and each of its gradients 0 (and its stores are masked)
    u, delta, b = _token_inputs(u_seq, delta_seq, B_seq, tok, live, offs_e, mask_e, offs_n, mask_n, channels,
                                STATE, FULL_E, FULL_N, MASKED)  # fmt: skip
    delta_u = delta * u
    dout = _load(_per_thread(dout_seq + tok * channels, *offs_e), mask_e, live, FULL_E, MASKED)
    dout = _past_the_end_zero(dout.to(tl.float32), live, MASKED)
    c = _load(_per_thread(C_seq + tok * STATE, *offs_n), mask_n, live, FULL_N, MASKED)

    # epilogue backward: out = (norm(y) + D u) * silu(z). The read-out sums the thread's states, then
    # the warps' (one exchange); per-channel values are then held by every warp (broadcast over WARPS),
    # bitwise equal (the same operations on the same values): every warp stores the per-token ones, a
    # duplicate store costing less than the predicate that would skip it
    y = tl.sum(_state_dot(s, c, FMA_CHAINS), axis=2, keep_dims=True)
    y = tl.broadcast_to(y, u.shape)
    grad_pre_gate = dout
    if HAS_Z:
        z = _load(_per_thread(z_seq + tok * channels, *offs_e), mask_e, live, FULL_E, MASKED).to(tl.float32)
        # sigmoid as the square of a reciprocal square root (MUFU.RSQ, a few ulp): a division, even the
        # approximate one, adds a range check and two scalings; the IEEE one calls a slow-path subroutine
        root = tl.rsqrt(1.0 + tl.exp2(-1.4426950408889634 * z))
        gate = root * root
        grad_pre_gate = dout * z * gate
    y_normed = y
    dy = grad_pre_gate
    if GROUP_SIZE > 0:
        # each warp sums its own copy of the group (lanes only); both sums in one pass:
        # mean(grad_pre_gate * y_normed) = rstd * mean(grad_pre_gate * y)
        sum_squares, sum_grad = _channel_sums(y * y, grad_pre_gate * y)
        rstd = tl.rsqrt(sum_squares / GROUP_SIZE + NORM_EPS)
        y_normed = y * rstd
        mean = sum_grad * rstd / GROUP_SIZE
        dy = rstd * (grad_pre_gate - y_normed * mean)
    if HAS_Z and not CARRY_PASS:
        pre_gate = y_normed
        if HAS_D:
            pre_gate += u * D
        dz = dout * pre_gate * gate * (1.0 + z * (1.0 - gate))
        dz_at = _per_thread(dz_ptr + row * channels, *offs_e)
        tl.store(dz_at, dz.to(dz_ptr.dtype.element_ty), mask=mask_te)

    # the scan's backward
    g = grad_carry + c * dy
    if not HAS_DECAY:
        decay = tl.exp2(delta * A)
    carry = decay * g
    if not CARRY_PASS:
        # d loss / d(delta_t A) = g_t exp(delta_t A) s_{t-1}: the carry times the state before (one
        # multiply) where the group's registers hold it, else (a group's first token, and every token of
        # the low-register schedule) g_t (s_t - delta_t u_t B_t): no state before held or read back
        if HAS_DECAY:
            grad_log_decay = carry * s_prev
        else:
            grad_log_decay = g * (s - b * delta_u)
        # sums over the states: the thread's, then the warps' (both in one exchange)
        grad_x = _state_dot(g, b, FMA_CHAINS)
        grad_decay = _state_dot(grad_log_decay, A, FMA_CHAINS)
        grad_x, grad_decay = tl.split(tl.sum(tl.join(grad_x, grad_decay), axis=2, keep_dims=True))
        du = grad_x * delta
        if HAS_D:
            dD += grad_pre_gate * u
            du += grad_pre_gate * D
        ddelta = grad_x * u + LN2 * grad_decay  # A holds A log2(e)
        dA += grad_log_decay * delta
        tl.store(
            _per_thread(du_ptr + row * channels, *offs_e),
            du.to(du_ptr.dtype.element_ty),
            mask=mask_te,
        )
        tl.store(
            _per_thread(ddelta_ptr + row * channels, *offs_e),
            ddelta.to(ddelta_ptr.dtype.element_ty),
            mask=mask_te,
        )
        # this tile's share of d loss / d B_t and d C_t (channels: in-thread first, then the lanes)
        partial = (row * num_tiles + tile) * STATE
        if SCATTER:
            db = tl.sum(g * delta_u, axis=0, keep_dims=True)
            dc = tl.sum(s * dy, axis=0, keep_dims=True)
            _store_scattered(db, dc, dB_ptr + partial, dC_ptr + partial, live, STATE, WARPS)
        else:
            db = tl.broadcast_to(_channel_sum(g * delta_u), b.shape)
            dc = tl.broadcast_to(_channel_sum(s * dy), b.shape)
            tl.store(_per_thread(dB_ptr + partial, *offs_n), db, mask=mask_n & (live & first_lane))
            tl.store(_per_thread(dC_ptr + partial, *offs_n), dc, mask=mask_n & (live & first_lane))
    else:  # the segment's decay is exp(A sum_t delta_t): the carry pass sums delta in dD's place
        dD += delta
    return carry, dA, dD


@triton.jit
def _group_backward(
    entering, t0, grad_carry, dA, dD, A, D, first, length, tile, num_tiles, channels, offs_e, mask_e, offs_n,
    mask_n, first_warp, first_lane, u_seq, delta_seq, B_seq, C_seq, z_seq, dout_seq, du_ptr, ddelta_ptr,
    dz_ptr, dB_ptr, dC_ptr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr, CARRY_PASS: tl.constexpr,
    STATE: tl.constexpr, SCATTER: tl.constexpr, WARPS: tl.constexpr, FULL_E: tl.constexpr,
    FULL_N: tl.constexpr, TOKEN_BARRIER: tl.constexpr, FMA_CHAINS: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """One group of ``GROUP`` tokens from ``t0``, given the state entering it: its states recomputed into
    registers (unrolled), then the adjoint back through them. Returns the carry and the running ``dA``,
    ``dD``."""
    s1, decay1 = _token_step(entering, A, t0, first, length, u_seq, delta_seq, B_seq, offs_e, mask_e, offs_n,
                             mask_n, channels, STATE, FULL_E, FULL_N, TOKEN_BARRIER)  # fmt: skip
    s2, s3, s4 = s1, s1, s1
    decay2, decay3, decay4 = decay1, decay1, decay1
    if GROUP >= 2:
        s2, decay2 = _token_step(s1, A, t0 + 1, first, length, u_seq, delta_seq, B_seq, offs_e, mask_e,
                                 offs_n, mask_n, channels, STATE, FULL_E, FULL_N, TOKEN_BARRIER)  # fmt: skip
    if GROUP >= 4:
        s3, decay3 = _token_step(s2, A, t0 + 2, first, length, u_seq, delta_seq, B_seq, offs_e, mask_e,
                                 offs_n, mask_n, channels, STATE, FULL_E, FULL_N, TOKEN_BARRIER)  # fmt: skip
        s4, decay4 = _token_step(s3, A, t0 + 3, first, length, u_seq, delta_seq, B_seq, offs_e, mask_e,
                                 offs_n, mask_n, channels, STATE, FULL_E, FULL_N, TOKEN_BARRIER)  # fmt: skip
    for back in tl.static_range(GROUP):  # the group's tokens last to first
        step = GROUP - 1 - back
        s = s4 if step == 3 else (s3 if step == 2 else (s2 if step == 1 else s1))
        # the decays of the recomputation, held for the adjoint but the group's first token's (all four
        # held spill at the production tile; any, in the low-register schedule), and the state before
        # (the first token's is not held: see _adjoint_step)
        decay = decay4 if step == 3 else (decay3 if step == 2 else decay2)
        s_prev = s3 if step == 3 else (s2 if step == 2 else s1)
        t = t0 + step
        grad_carry, dA, dD = _adjoint_step(
            s, s_prev, decay, grad_carry, dA, dD, A, D, first + t,
            first + (t if TOKEN_BARRIER else tl.minimum(t, length - 1)), t < length, tile, num_tiles,
            channels, offs_e, mask_e, offs_n, mask_n, first_warp, first_lane, u_seq, delta_seq, B_seq,
            C_seq, z_seq, dout_seq, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, HAS_D, HAS_Z,
            GROUP_SIZE, CARRY_PASS, STATE, SCATTER, WARPS, FULL_E, FULL_N, TOKEN_BARRIER, FMA_CHAINS,
            (step > 0) & (not TOKEN_BARRIER),
        )  # fmt: skip
    return grad_carry, dA, dD


@triton.jit
def _ticket_work(ticket, rows, num_tiles, SPLITS: tl.constexpr):
    """``(batch index, tile, segment)`` of the program that started ``ticket``-th: every row's last
    segment first, then every row's one before, and so on (the look-back's order)."""
    return (ticket % rows) // num_tiles, ticket % num_tiles, SPLITS - 1 - ticket // rows


# Addresses: a thread's entries are one register (its lane and warp) and immediates (its registers),
# marked not contiguous (``_per_thread``): vectorised, Triton would pick a layout of its own for the
# access and convert it in every token step. ``channel_stride`` (always 1) stays a runtime value where
# the state's offsets use it (``A``, the chunk states, ``dA``: outside the token loops). ``channels``
# is a compile-time constant: ``state * channels + channel`` is then one register and immediates.
@triton.jit(do_not_specialize=["channel_stride"])
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr, boundary_ptr, scratch_ptr, carry_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr, ticket_ptr,
    length, num_chunks, chunks_per_split, channel_stride, channels: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GROUP_SIZE: tl.constexpr, CARRY_PASS: tl.constexpr,
    LOOKBACK: tl.constexpr,
    CHANNELS_PER_PROGRAM: tl.constexpr, STATE: tl.constexpr, E_HI: tl.constexpr, E_LO: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, SPLITS: tl.constexpr,
    WARPS: tl.constexpr, TOKEN_BARRIER: tl.constexpr, FMA_CHAINS: tl.constexpr,
):  # fmt: skip
    # The schedule per GPU (the launcher's choice, by the report's counts). TOKEN_BARRIER (sm_80, sm_100):
    # a barrier a token, which keeps the compiler from holding a group's later tokens' loads in
    # registers across the group, and loads masked past the end (zeros); else (sm_90) loads of the last
    # token there, unmasked, with ``delta`` and ``dout`` zeroed, and the recomputation's decays and
    # states reused by the adjoint (see the module's docstring), the scratch's entry and the outputs'
    # rows held as pointers: fewer instructions, more registers held (sm_80 spills). FMA_CHAINS: the
    # sums over a thread's states as chains (see _state_dot).
    tl.static_assert(CHUNK % GROUP == 0)
    tl.static_assert((GROUP == 1) | (GROUP == 2) | (GROUP == 4))
    GROUPS: tl.constexpr = CHUNK // GROUP
    SCRATCH_ENTRIES: tl.constexpr = GROUPS - 2 if GROUPS > 2 else 1  # (one unused at two groups or fewer)
    batch_index = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    num_tiles = tl.num_programs(1)
    rows = tl.num_programs(0) * num_tiles
    if LOOKBACK:  # the program's work by the order programs start in: every row's last segment first
        ticket = tl.atomic_add(ticket_ptr, 1)
        # (kept in memory, by the program's id: held through the loops, it would spill)
        tl.store(ticket_ptr + 1 + rows * SPLITS + (batch_index * num_tiles + tile) * SPLITS + split, ticket)
        batch_index, tile, split = _ticket_work(ticket, rows, num_tiles, SPLITS)
    # the tile as (E_HI, SPW, WARPS, E_LO): state ``w * SPW + i`` of channel ``h * E_LO + l`` at (h, i, w, l).
    # Triton's default layout puts E_LO on the lanes and WARPS on the warps (the fastest dimensions
    # with room), E_HI x SPW in each thread. Per-channel values are (E_HI, 1, WARPS, E_LO) (every
    # warp holds its copy: no layout conversion against the state), per-state ones (1, SPW, WARPS, E_LO)
    # (every lane holds its copy).
    SPW: tl.constexpr = BLOCK_N // WARPS  # states per warp
    # the production tile (64 channels: 2 x 32 lanes, 8 states a warp): dB, dC reduce-scattered
    SCATTER: tl.constexpr = (E_LO == 32) & (SPW == 8)
    h4 = tl.arange(0, E_HI)[:, None, None, None]
    i4 = tl.arange(0, SPW)[None, :, None, None]
    w4 = tl.arange(0, WARPS)[None, None, :, None]
    l4 = tl.arange(0, E_LO)[None, None, None, :]
    CH: tl.constexpr = (E_HI, 1, WARPS, E_LO)
    PER_STATE: tl.constexpr = (1, SPW, WARPS, E_LO)
    local_e = tl.broadcast_to(h4 * E_LO + l4, CH)
    n4 = tl.broadcast_to(w4 * SPW + i4, PER_STATE)
    first_warp = tl.broadcast_to(w4 == 0, CH)  # per-channel sums over tokens: stored by one warp
    first_lane = tl.broadcast_to(l4 == 0, PER_STATE)  # per-state results: by one lane
    # a state's offset as (per thread: its warp's first state, per register: the state in the warp)
    offs_n = (tl.broadcast_to(w4 * SPW, (1, 1, WARPS, E_LO)), i4)
    channel = tile * CHANNELS_PER_PROGRAM + local_e
    # tiles that fill their blocks (the production shapes) need no masks: fewer registers held
    EVEN: tl.constexpr = (CHANNELS_PER_PROGRAM == E_HI * E_LO) & (channels % CHANNELS_PER_PROGRAM == 0)
    mask_e = (local_e < CHANNELS_PER_PROGRAM) & (channel < channels)
    if EVEN:
        mask_e = local_e >= 0
    # a channel's offset as (per thread: its lane's channel, per register: the channel's E_HI part)
    offs_e = (tl.broadcast_to(tile * CHANNELS_PER_PROGRAM + l4, (1, 1, WARPS, E_LO)), h4 * E_LO)
    mask_n = n4 < STATE
    e4 = h4 * E_LO + l4
    mask_s = ((e4 < CHANNELS_PER_PROGRAM) & (tile * CHANNELS_PER_PROGRAM + e4 < channels)) & (n4 < STATE)
    if EVEN & (STATE == BLOCK_N):
        mask_s = (e4 + n4) >= 0
    state_offsets = n4 * channels + (tile * CHANNELS_PER_PROGRAM + e4) * channel_stride  # as in memory
    A = tl.load(A_ptr + state_offsets, mask=mask_s, other=0.0)  # A log2(e)
    D = tl.zeros(CH, tl.float32)
    if HAS_D:
        D = tl.load(_per_thread(D_ptr, *offs_e), mask=mask_e, other=0.0)
    sequence = batch_index.to(tl.int64) * length  # 64-bit: batch * length * channels is large
    # the row's inputs: a token's loads are then its 32-bit offset from these
    u_seq = u_ptr + sequence * channels
    delta_seq = delta_ptr + sequence * channels
    z_seq = z_ptr + sequence * channels
    dout_seq = dout_ptr + sequence * channels
    B_seq = B_ptr + sequence * STATE
    C_seq = C_ptr + sequence * STATE
    first = 0
    if TOKEN_BARRIER:  # a 64-bit row per token instead: no pointers held
        u_seq, delta_seq, z_seq, dout_seq, B_seq, C_seq = u_ptr, delta_ptr, z_ptr, dout_ptr, B_ptr, C_ptr
        first = sequence
    else:  # and the outputs' likewise (a 64-bit row a token costs a wide multiply and add a store)
        du_ptr += sequence * channels
        ddelta_ptr += sequence * channels
        dz_ptr += sequence * channels
        dB_ptr += sequence * num_tiles * STATE
        dC_ptr += sequence * num_tiles * STATE
    FULL_N: tl.constexpr = STATE == BLOCK_N
    TILE: tl.constexpr = BLOCK_N * E_HI * E_LO
    # The segments' carries: private to the program, and laid out so that a thread's entries are
    # contiguous: its addresses are one register and immediates.
    local_thread = (w4 * E_LO + l4) * (E_HI * SPW)  # the same for all of a thread's entries
    local_reg = h4 * SPW + i4  # a compile-time constant per register
    # The states entering a chunk's middle groups: laid out as the forward's boundary states, (batch,
    # splits, entries, state, channels), so that one thread's offsets (per thread, per register) address
    # either and a pointer select picks the source. Each program reads back only what it wrote.
    scratch_entry: tl.constexpr = STATE * channels
    scratch = scratch_ptr + (batch_index * SPLITS + split).to(tl.int64) * (SCRATCH_ENTRIES * scratch_entry)
    state_thread = (w4 * SPW) * channels + tile * CHANNELS_PER_PROGRAM + l4
    state_reg = i4 * channels + h4 * E_LO
    first_chunk = split * chunks_per_split
    last_chunk = tl.minimum(first_chunk + chunks_per_split, num_chunks) - 1
    # the segments' carries, (batch, tiles, splits, 2, tile), each tile in the scratch's order: L then P
    carries = carry_ptr + (batch_index * num_tiles + tile).to(tl.int64) * (SPLITS * 2 * TILE)
    carries = _per_thread(carries, local_thread, local_reg)

    # exp(delta_{t+1} A) g_{t+1}: zero past the end, else what the segments to the right send
    grad_carry = tl.zeros((E_HI, SPW, WARPS, E_LO), tl.float32)
    flags = ticket_ptr + 1 + (batch_index * num_tiles + tile) * SPLITS
    if LOOKBACK:  # the carry the segment to the right ended with, once it has (see the module's docstring)
        if split < SPLITS - 1:
            done = tl.atomic_add(flags + split + 1, 0, sem="acquire")
            while done == 0:
                done = tl.atomic_add(flags + split + 1, 0, sem="acquire")
            grad_carry = tl.load(carries + (split + 1) * (2 * TILE), cache_modifier=".cg")
    elif not CARRY_PASS:
        for index in range(SPLITS - 1 - split):  # the segments to the right, last to first
            later = carries + (SPLITS - 1 - index) * (2 * TILE)
            grad_carry = tl.load(later) + tl.load(later + TILE) * grad_carry
    dA = tl.zeros((E_HI, SPW, WARPS, E_LO), tl.float32)
    dD = tl.zeros(CH, tl.float32)
    for reverse_chunk in range(last_chunk - first_chunk + 1):
        chunk = last_chunk - reverse_chunk
        start = chunk * CHUNK
        # 1. the states entering the groups, recomputed from the one entering the chunk: the first
        # group's is that one (read again in step 2), the last group's stays in registers, the others go
        # to the scratch (at two groups a chunk, the default, there are none)
        boundary = boundary_ptr + (batch_index * num_chunks + tl.maximum(chunk - 1, 0)).to(tl.int64) * (
            STATE * channels
        )
        # one address register and immediates (see _per_thread): the state's offsets as pointers would
        # be 16 address pairs held, and spill
        s = tl.load(_per_thread(boundary, state_thread, state_reg), mask=mask_s & (chunk > 0), other=0.0)
        if GROUPS > 1:
            for step in tl.static_range(GROUP):
                s, _ = _token_step(s, A, start + step, first, length, u_seq, delta_seq, B_seq, offs_e, mask_e,
                                   offs_n, mask_n, channels, STATE, EVEN, FULL_N, TOKEN_BARRIER)  # fmt: skip
        if GROUPS > 2:
            tl.debug_barrier()  # the previous chunk's reads of the scratch are done (see below)
            for group in range(1, GROUPS - 1):
                tl.store(_per_thread(scratch + (group - 1) * scratch_entry, state_thread, state_reg), s)
                for step in tl.static_range(GROUP):
                    s, _ = _token_step(s, A, start + group * GROUP + step, first, length, u_seq, delta_seq,
                                       B_seq, offs_e, mask_e, offs_n, mask_n, channels, STATE, EVEN, FULL_N,
                                       TOKEN_BARRIER)  # fmt: skip
            # (each thread reads back the scratch entries it wrote, as long as Triton gives the store and
            # the load one layout, which it does; the two barriers make that an optimisation, not a premise)
            tl.debug_barrier()
        # 2. the groups last to first, each from the state entering it, each iteration ending with the
        # load of the next one's: the scratch's, or the chunk's read again (none after the first group)
        for reverse_group in range(GROUPS):
            group = GROUPS - 1 - reverse_group
            grad_carry, dA, dD = _group_backward(
                s, start + group * GROUP, grad_carry, dA, dD, A, D, first, length, tile, num_tiles, channels,
                offs_e, mask_e, offs_n, mask_n, first_warp, first_lane, u_seq, delta_seq, B_seq, C_seq, z_seq,
                dout_seq, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, HAS_D, HAS_Z, GROUP_SIZE, CARRY_PASS,
                STATE, SCATTER, WARPS, EVEN, FULL_N, TOKEN_BARRIER, FMA_CHAINS, GROUP,
            )  # fmt: skip
            before = group - 1
            row = tl.where(before > 0, scratch + (before - 1) * scratch_entry, boundary)
            wanted = (before > 0) | ((before == 0) & (chunk > 0))
            s = tl.load(_per_thread(row, state_thread, state_reg), mask=mask_s & wanted, other=0.0)

    if LOOKBACK:  # the carry for the segment to the left, then its flag (after every thread's store)
        # (the work made anew from the ticket read back, in unsigned arithmetic: the same values, which
        # the compiler would otherwise keep from the start, held through the loops, and spill)
        pid = tl.program_id(0).to(tl.uint32) * num_tiles.to(tl.uint32) + tl.program_id(1).to(tl.uint32)
        slot = ticket_ptr + 1 + rows * SPLITS + pid * SPLITS + tl.program_id(2)
        unsigned = tl.load(slot, volatile=True).to(tl.uint32)
        split = SPLITS - 1 - (unsigned // rows.to(tl.uint32)).to(tl.int32)
        row = (unsigned % rows.to(tl.uint32)).to(tl.int32)
        batch_index = (row.to(tl.uint32) // num_tiles.to(tl.uint32)).to(tl.int32)
        tile = (row.to(tl.uint32) % num_tiles.to(tl.uint32)).to(tl.int32)
        offs_e = (tl.broadcast_to(tile * CHANNELS_PER_PROGRAM + l4, (1, 1, WARPS, E_LO)), h4 * E_LO)
        if split > 0:
            row_carries = carry_ptr + row.to(tl.int64) * (SPLITS * 2 * TILE)
            tl.store(_per_thread(row_carries, local_thread, local_reg) + split * (2 * TILE), grad_carry)
            tl.debug_barrier()
            tl.atomic_xchg(ticket_ptr + 1 + row * SPLITS + split, 1, sem="release")
    if CARRY_PASS:  # this segment's carry out from a zero carry, and its decay over the segment
        segment = carries + split * (2 * TILE)
        tl.store(segment, grad_carry)
        tl.store(segment + TILE, tl.exp2(dD * A))  # dD: the carry pass sums delta there
    else:  # partial sums over this segment's tokens: (batch, splits, state, channels) and (.., channels)
        partial = (batch_index * SPLITS + split).to(tl.int64) * channels
        # (offsets formed anew, ``channel_stride - 1`` is 0: shared with the start's, they were held)
        dA_ptr += partial * STATE + (channel_stride - 1)
        tl.store(
            dA_ptr + n4 * channels + (tile * CHANNELS_PER_PROGRAM + e4) * channel_stride, dA, mask=mask_s
        )
        if HAS_D:
            tl.store(_per_thread(dD_ptr + partial, *offs_e), dD, mask=mask_e & first_warp)
