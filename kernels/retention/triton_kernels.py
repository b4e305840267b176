"""Triton kernels of the chunked retention bandpass scan (forward and backward).

One program owns one (batch, head) and one block of value dimensions and walks the chunks of
``BLOCK_T`` tokens in order, as ``retention/reference.py`` does with einsums:

* inside a chunk ``(q~ k~^T * M) v`` with ``M[i, j] = gamma^(i-j)`` (``i >= j``), on tensor cores;
* across chunks a state ``S = sum_j gamma^(T-1-j) k~_j^T v_j`` carried in fp32 registers, read by
  query ``i`` with ``gamma^(i+1)``.

Every decay is ``exp(log_decay * n)`` with ``n >= 0`` (log space, nothing can overflow). The rotary is
applied on load: a head dimension ``dk`` is kept as its even and odd halves, ``x~_e = x_e cos - x_o sin``
and ``x~_o = x_e sin + x_o cos`` with angle ``t theta``, and ``q~ . k~ = q~_e . k~_e + q~_o . k~_o``.

Backward: a forward pass over chunks gives ``dq~`` (state ``S``), a reverse pass gives ``dk~`` and
``dv`` (state ``dS = sum_i gamma^(i-T) q~_i^T do_i``). The decay's gradient uses
``sum_{i>=j} (i-j) X_ij = sum_t t (q~_t . dq~_t - k~_t . dk~_t)`` (with ``X_ij`` the terms of the
output), so it needs no extra pass; the angle's gradient is ``t (dx~_o x~_e - dx~_e x~_o)`` per pair.
Both are accumulated in fp32 inside the kernel and written as per-program partial sums.

Precision: token positions (``t.to(float32)``), angles ``t theta``, their cos/sin and the decay exponents
``log_decay * n`` are fp32 whatever the inputs' dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Matrix product on tensor cores in the inputs' dtype, accumulated in fp32.

    ``PRECISION == "emulate"``: the Triton interpreter (3.8) returns garbage for bf16 ``tl.dot``, so
    there the operands are rounded to ``DOT_DTYPE`` and multiplied in fp32, the same numbers."""
    if PRECISION == "emulate":
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def _load_rotated(ptr, rows, offs_p, mask_tp, cos, sin, HAS_THETA: tl.constexpr):
    """Even and odd halves of ``(BLOCK_T, dk)`` rows, rotated by the token's angles, in fp32."""
    even = tl.load(ptr + rows[:, None] + 2 * offs_p[None, :], mask=mask_tp, other=0.0).to(tl.float32)
    odd = tl.load(ptr + rows[:, None] + 2 * offs_p[None, :] + 1, mask=mask_tp, other=0.0).to(tl.float32)
    if HAS_THETA:
        return even * cos - odd * sin, even * sin + odd * cos
    return even, odd


@triton.jit
def _store_unrotated(ptr, rows, offs_p, mask_tp, grad_even, grad_odd, cos, sin, HAS_THETA: tl.constexpr):
    """Store the gradient of the unrotated input: the transposed rotation of the rotated one's."""
    if HAS_THETA:
        grad_even, grad_odd = grad_even * cos + grad_odd * sin, grad_odd * cos - grad_even * sin
    dtype = ptr.dtype.element_ty
    tl.store(ptr + rows[:, None] + 2 * offs_p[None, :], grad_even.to(dtype), mask=mask_tp)
    tl.store(ptr + rows[:, None] + 2 * offs_p[None, :] + 1, grad_odd.to(dtype), mask=mask_tp)


@triton.jit
def _decay_weights(log_decay, BLOCK_T: tl.constexpr):
    """Chunk-local decays: the causal mask ``gamma^(i-j)``, ``gamma^(i+1)`` for queries reading the
    incoming state, ``gamma^(T-1-j)`` for keys entering the outgoing state, ``gamma^T`` per chunk."""
    offs_t = tl.arange(0, BLOCK_T)
    position = offs_t.to(tl.float32)
    distance = position[:, None] - position[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    intra = tl.where(causal, tl.exp(log_decay * tl.maximum(distance, 0.0)), 0.0)
    query_weight = tl.exp(log_decay * (position + 1.0))
    key_weight = tl.exp(log_decay * (BLOCK_T - 1.0 - position))
    chunk_decay = tl.exp(log_decay * BLOCK_T)
    return intra, query_weight, key_weight, chunk_decay


@triton.jit
def _retention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, log_decay_ptr, theta_ptr, o_ptr,
    length, heads, dk, dv, num_chunks,
    HAS_THETA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(0)  # the large grid dimension goes first (the others stop at 65535)
    block_v = tl.program_id(1)
    batch_index, head = (batch_head // heads).to(tl.int64), batch_head % heads  # 64-bit offsets
    half = dk // 2
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_v = block_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_p, mask_v = offs_p < half, offs_v < dv
    log_decay = tl.load(log_decay_ptr + head).to(tl.float32)
    intra, query_weight, key_weight, chunk_decay = _decay_weights(log_decay, BLOCK_T)
    theta = tl.zeros((BLOCK_P,), tl.float32)
    if HAS_THETA:
        theta = tl.load(theta_ptr + head * half + offs_p, mask=mask_p, other=0.0).to(tl.float32)

    state_even = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
    state_odd = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
    for chunk in range(num_chunks):
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        token = (batch_index * length + t) * heads + head
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        angle = t.to(tl.float32)[:, None] * theta[None, :]
        cos, sin = tl.cos(angle), tl.sin(angle)
        q_even, q_odd = _load_rotated(q_ptr, token * dk, offs_p, mask_tp, cos, sin, HAS_THETA)
        k_even, k_odd = _load_rotated(k_ptr, token * dk, offs_p, mask_tp, cos, sin, HAS_THETA)
        v = tl.load(v_ptr + token[:, None] * dv + offs_v[None, :], mask=mask_tv, other=0.0)

        scores = _mm(q_even, tl.trans(k_even), DOT_DTYPE, PRECISION)
        scores += _mm(q_odd, tl.trans(k_odd), DOT_DTYPE, PRECISION)
        out = _mm(scores * intra, v, DOT_DTYPE, PRECISION)
        out += _mm(q_even * query_weight[:, None], state_even, DOT_DTYPE, PRECISION)
        out += _mm(q_odd * query_weight[:, None], state_odd, DOT_DTYPE, PRECISION)
        tl.store(o_ptr + token[:, None] * dv + offs_v[None, :], out.to(o_ptr.dtype.element_ty), mask=mask_tv)

        state_even = chunk_decay * state_even + _mm(tl.trans(k_even * key_weight[:, None]), v, DOT_DTYPE,
                                                    PRECISION)  # fmt: skip
        state_odd = chunk_decay * state_odd + _mm(tl.trans(k_odd * key_weight[:, None]), v, DOT_DTYPE,
                                                  PRECISION)  # fmt: skip


@triton.jit
def _retention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, log_decay_ptr, theta_ptr, do_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlog_decay_ptr, dtheta_ptr,
    batch, length, heads, dk, dv, num_chunks,
    HAS_THETA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``dq_ptr``/``dk_ptr`` hold this value block's share (fp32 partials over value blocks, or the
    final tensors when there is one block); ``dv`` is complete per block."""
    batch_head = tl.program_id(0)  # the large grid dimension goes first (the others stop at 65535)
    block_v = tl.program_id(1)
    batch_index, head = (batch_head // heads).to(tl.int64), batch_head % heads  # 64-bit offsets
    half = dk // 2
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_v = block_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_p, mask_v = offs_p < half, offs_v < dv
    log_decay = tl.load(log_decay_ptr + head).to(tl.float32)
    intra, query_weight, key_weight, chunk_decay = _decay_weights(log_decay, BLOCK_T)
    theta = tl.zeros((BLOCK_P,), tl.float32)
    if HAS_THETA:
        theta = tl.load(theta_ptr + head * half + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    # this block's share of the query/key gradient tensors (value-block partials come first)
    partial_offset = block_v.to(tl.int64) * batch * length * heads * dk
    dq_ptr += partial_offset
    dk_ptr += partial_offset
    grad_log_decay = tl.zeros((BLOCK_T,), tl.float32)  # per chunk-local row, summed at the end
    grad_theta = tl.zeros((BLOCK_P,), tl.float32)

    # queries, first to last chunk: dq~_i = sum_{j<=i} gamma^(i-j) (do_i . v_j) k~_j
    state_even = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
    state_odd = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
    for chunk in range(num_chunks):
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        token = (batch_index * length + t) * heads + head
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        position = t.to(tl.float32)
        angle = position[:, None] * theta[None, :]
        cos, sin = tl.cos(angle), tl.sin(angle)
        q_even, q_odd = _load_rotated(q_ptr, token * dk, offs_p, mask_tp, cos, sin, HAS_THETA)
        k_even, k_odd = _load_rotated(k_ptr, token * dk, offs_p, mask_tp, cos, sin, HAS_THETA)
        v = tl.load(v_ptr + token[:, None] * dv + offs_v[None, :], mask=mask_tv, other=0.0)
        do = tl.load(do_ptr + token[:, None] * dv + offs_v[None, :], mask=mask_tv, other=0.0)

        grad_scores = _mm(do, tl.trans(v), DOT_DTYPE, PRECISION) * intra
        dq_even = _mm(grad_scores, k_even, DOT_DTYPE, PRECISION)
        dq_even += query_weight[:, None] * _mm(do, tl.trans(state_even), DOT_DTYPE, PRECISION)
        dq_odd = _mm(grad_scores, k_odd, DOT_DTYPE, PRECISION)
        dq_odd += query_weight[:, None] * _mm(do, tl.trans(state_odd), DOT_DTYPE, PRECISION)
        grad_log_decay += position * tl.sum(q_even * dq_even + q_odd * dq_odd, axis=1)
        grad_theta += tl.sum(position[:, None] * (dq_odd * q_even - dq_even * q_odd), axis=0)
        _store_unrotated(dq_ptr, token * dk, offs_p, mask_tp, dq_even, dq_odd, cos, sin, HAS_THETA)

        state_even = chunk_decay * state_even + _mm(tl.trans(k_even * key_weight[:, None]), v, DOT_DTYPE,
                                                    PRECISION)  # fmt: skip
        state_odd = chunk_decay * state_odd + _mm(tl.trans(k_odd * key_weight[:, None]), v, DOT_DTYPE,
                                                  PRECISION)  # fmt: skip

    # keys and values, last to first chunk, with dS = sum over later queries of gamma^(i-T) q~_i^T do_i
    state_even = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
    state_odd = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
    for reverse_chunk in range(num_chunks):
        chunk = num_chunks - 1 - reverse_chunk
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        token = (batch_index * length + t) * heads + head
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        position = t.to(tl.float32)
        angle = position[:, None] * theta[None, :]
        cos, sin = tl.cos(angle), tl.sin(angle)
        q_even, q_odd = _load_rotated(q_ptr, token * dk, offs_p, mask_tp, cos, sin, HAS_THETA)
        k_even, k_odd = _load_rotated(k_ptr, token * dk, offs_p, mask_tp, cos, sin, HAS_THETA)
        v = tl.load(v_ptr + token[:, None] * dv + offs_v[None, :], mask=mask_tv, other=0.0)
        do = tl.load(do_ptr + token[:, None] * dv + offs_v[None, :], mask=mask_tv, other=0.0)

        scores = _mm(q_even, tl.trans(k_even), DOT_DTYPE, PRECISION)
        scores += _mm(q_odd, tl.trans(k_odd), DOT_DTYPE, PRECISION)
        dv_block = _mm(tl.trans(scores * intra), do, DOT_DTYPE, PRECISION)
        dv_block += key_weight[:, None] * (
            _mm(k_even, state_even, DOT_DTYPE, PRECISION) + _mm(k_odd, state_odd, DOT_DTYPE, PRECISION)
        )
        tl.store(dv_ptr + token[:, None] * dv + offs_v[None, :], dv_block.to(dv_ptr.dtype.element_ty),
                 mask=mask_tv)  # fmt: skip

        grad_scores = tl.trans(_mm(do, tl.trans(v), DOT_DTYPE, PRECISION) * intra)  # [j, i]
        dk_even = _mm(grad_scores, q_even, DOT_DTYPE, PRECISION)
        dk_even += key_weight[:, None] * _mm(v, tl.trans(state_even), DOT_DTYPE, PRECISION)
        dk_odd = _mm(grad_scores, q_odd, DOT_DTYPE, PRECISION)
        dk_odd += key_weight[:, None] * _mm(v, tl.trans(state_odd), DOT_DTYPE, PRECISION)
        grad_log_decay -= position * tl.sum(k_even * dk_even + k_odd * dk_odd, axis=1)
        grad_theta += tl.sum(position[:, None] * (dk_odd * k_even - dk_even * k_odd), axis=0)
        _store_unrotated(dk_ptr, token * dk, offs_p, mask_tp, dk_even, dk_odd, cos, sin, HAS_THETA)

        state_even = chunk_decay * state_even + _mm(tl.trans(q_even * query_weight[:, None]), do, DOT_DTYPE,
                                                    PRECISION)  # fmt: skip
        state_odd = chunk_decay * state_odd + _mm(tl.trans(q_odd * query_weight[:, None]), do, DOT_DTYPE,
                                                  PRECISION)  # fmt: skip

    partial = block_v * batch * heads + batch_head
    tl.store(dlog_decay_ptr + partial, tl.sum(grad_log_decay, axis=0))
    if HAS_THETA:
        tl.store(dtheta_ptr + partial * half + offs_p, grad_theta, mask=mask_p)
