"""Triton kernels of the chunked retention bandpass scan (forward and backward).

The rotary reads its angles from tables: ``cos``/``sin`` of ``t theta``, ``(length, heads, dk / 2)``
fp32, computed once per call by the launcher exactly as the reference computes them, so the token loops
evaluate no sin/cos. Rows of ``q``/``k`` are loaded whole and contiguous; their pairs ``(x[2j], x[2j+1])``
are split in registers, rotated, and ``q~ . k~`` is one product over the whole head dimension. The
sequence is cut into chunks of ``BLOCK_T`` tokens, as ``retention/reference.py`` does with einsums:

* inside a chunk ``(q k^T * M) v`` with ``M[i, j] = gamma^(i-j)`` (``i >= j``), on tensor cores;
* across chunks a state ``S = sum_j gamma^(T-1-j) k_j^T v_j`` carried in fp32 registers, read by
  query ``i`` with ``gamma^(i+1)``.

Every decay is ``exp(log_decay * n)`` with ``n >= 0`` (log space, nothing can overflow), computed once
per program outside the token loops.

Grid: (batch x head, value block, split). A program walks the chunks of its split (``chunks_per_split``
consecutive chunks) in order; with several splits (small batches, to fill the GPU) it first rebuilds the
state entering its first chunk from the earlier chunks (a load-and-accumulate loop with no stores). The
splits need nothing from one another: no atomics, no second launch, deterministic.

Backward: a forward walk over the split's chunks gives ``dq~`` (state ``S`` of the earlier chunks), a
reverse walk gives ``dk~`` and ``dv`` (state ``dS = sum_i gamma^(i-T) q~_i^T do_i`` of the later chunks);
``dq``/``dk`` are their inverse rotations. The decay's gradient uses
``sum_{i>=j} (i-j) X_ij = sum_t t (q~_t . dq~_t - k~_t . dk~_t)`` (``X_ij`` the terms of the output), the
angle's ``t (dx~_o x~_e - dx~_e x~_o)`` per pair; both accumulated in fp32 and written per program.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_tf32(x):
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in ``DOT_DTYPE`` operands, fp32 accumulation (``acc`` None: a fresh product).

    ``PRECISION == "emulate"``: the Triton interpreter (3.8) returns garbage for bf16 ``tl.dot``, so
    there the operands are rounded to ``DOT_DTYPE`` and multiplied in fp32, the same numbers; likewise
    ``"emulate_tf32"`` rounds fp32 operands to TF32 (the interpreter multiplies in full fp32)."""
    if PRECISION == "emulate":
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32), acc,
                      input_precision="ieee")  # fmt: skip
    if PRECISION == "emulate_tf32":  # the interpreter: fp32 operands rounded to TF32's 10-bit mantissa
        return tl.dot(_round_tf32(a), _round_tf32(b), acc, input_precision="ieee")
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def _decay_weights(log_decay, BLOCK_T: tl.constexpr):
    """Chunk-local decays: the causal mask ``gamma^(i-j)``, ``gamma^(i+1)`` for queries reading the
    incoming state, ``gamma^(T-1-j)`` for keys entering the outgoing state, ``gamma^T`` per chunk."""
    offs_t = tl.arange(0, BLOCK_T)
    position = offs_t.to(tl.float32)
    distance = position[:, None] - position[None, :]
    intra = tl.where(distance >= 0, tl.exp(log_decay * tl.maximum(distance, 0.0)), 0.0)
    query_weight = tl.exp(log_decay * (position + 1.0))
    key_weight = tl.exp(log_decay * (BLOCK_T - 1.0 - position))
    chunk_decay = tl.exp(log_decay * BLOCK_T)
    return intra, query_weight, key_weight, chunk_decay


@triton.jit
def _pairs(x, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """``(BLOCK_T, 2 BLOCK_P)`` rows as their even and odd dimensions, fp32 (a register split: each
    thread's vector load holds whole pairs)."""
    return tl.split(tl.reshape(x.to(tl.float32), (BLOCK_T, BLOCK_P, 2)))


@triton.jit
def _rotate(x, cos, sin, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pairs ``(x[2j], x[2j+1])`` rotated by the angles whose cos/sin are given, ``(BLOCK_T, BLOCK_P)``;
    the inverse rotation is ``sin -> -sin``."""
    even, odd = _pairs(x, BLOCK_T, BLOCK_P)
    rotated = tl.join(even * cos - odd * sin, even * sin + odd * cos)
    return tl.reshape(rotated, (BLOCK_T, 2 * BLOCK_P))


@triton.jit
def _unrotate_grad(x, dx, t, cos, sin, grad_theta, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """For rotated rows ``x`` (queries or keys) and their gradient ``dx``: ``grad_theta`` plus this
    chunk's ``t (dx_odd x_even - dx_even x_odd)`` per pair, and ``dx`` rotated back (the inputs' grad)."""
    x_even, x_odd = _pairs(x, BLOCK_T, BLOCK_P)
    dx_even, dx_odd = _pairs(dx, BLOCK_T, BLOCK_P)
    grad_theta += t.to(tl.float32)[:, None] * (dx_odd * x_even - dx_even * x_odd)
    return _rotate(dx, cos, -sin, BLOCK_T, BLOCK_P), grad_theta


@triton.jit
def _rows(batch_index, head, length, heads, offs_t, offs_d, D: tl.constexpr):
    """Offsets of chunk 0's rows ``(BLOCK_T, BLOCK_D)`` of one head in a ``(batch, length, heads, D)``
    tensor; later chunks add ``chunk * BLOCK_T * heads * D``."""
    return ((batch_index * length + offs_t[:, None]) * heads + head) * D + offs_d[None, :]


@triton.jit
def _load_chunk(
    q_ptr, k_ptr, v_ptr, do_ptr, cos_ptr, sin_ptr, qk_rows, v_rows, angle_rows, chunk, qk_step, v_step,
    angle_step, length, offs_t, mask_k, mask_v, mask_p,
    HAS_THETA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One chunk's rows for the backward's walks: ``(t, mask_tk, mask_tv, q, k, v, do, cos, sin)`` with
    ``q``, ``k`` rotated (in fp32) when there is a rotary; rows past the end load as zeros."""
    t = chunk * BLOCK_T + offs_t
    mask_tk = (t < length)[:, None] & mask_k[None, :]
    mask_tv = (t < length)[:, None] & mask_v[None, :]
    q = tl.load(q_ptr + qk_rows + chunk * qk_step, mask=mask_tk, other=0.0)
    k = tl.load(k_ptr + qk_rows + chunk * qk_step, mask=mask_tk, other=0.0)
    v = tl.load(v_ptr + v_rows + chunk * v_step, mask=mask_tv, other=0.0)
    do = tl.load(do_ptr + v_rows + chunk * v_step, mask=mask_tv, other=0.0)
    cos = tl.zeros((BLOCK_T, BLOCK_P), tl.float32)  # unused without a rotary
    sin = tl.zeros((BLOCK_T, BLOCK_P), tl.float32)
    if HAS_THETA:
        mask_tp = (t < length)[:, None] & mask_p[None, :]
        cos = tl.load(cos_ptr + angle_rows + chunk * angle_step, mask=mask_tp, other=1.0)
        sin = tl.load(sin_ptr + angle_rows + chunk * angle_step, mask=mask_tp, other=0.0)
        q = _rotate(q, cos, sin, BLOCK_T, BLOCK_P)
        k = _rotate(k, cos, sin, BLOCK_T, BLOCK_P)
    return t, mask_tk, mask_tv, q, k, v, do, cos, sin


@triton.jit
def _state_entering(
    k_ptr, v_ptr, cos_ptr, sin_ptr, qk_rows, v_rows, angle_rows, qk_step, v_step, angle_step, first,
    mask_k, mask_v, mask_p, key_weight, chunk_decay,
    HAS_THETA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_P: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The state ``S: (BLOCK_K, BLOCK_V)`` entering chunk ``first``: the chunks before it (none of them
    masked: a split starts on a whole chunk) folded in from zero."""
    state = tl.zeros((BLOCK_K, BLOCK_V), tl.float32)
    for chunk in range(0, first):
        k = tl.load(k_ptr + qk_rows + chunk * qk_step, mask=mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + v_rows + chunk * v_step, mask=mask_v[None, :], other=0.0)
        if HAS_THETA:
            cos = tl.load(cos_ptr + angle_rows + chunk * angle_step, mask=mask_p[None, :], other=1.0)
            sin = tl.load(sin_ptr + angle_rows + chunk * angle_step, mask=mask_p[None, :], other=0.0)
            k = _rotate(k, cos, sin, BLOCK_T, BLOCK_P)
        state = _mm(tl.trans(k * key_weight[:, None]), v, state * chunk_decay, DOT_DTYPE, PRECISION)
    return state


# ``chunks_per_split`` is not specialised: at 1 (small batches) Triton would unroll the token loop into a
# branch, which the kernel report cannot see as a loop
@triton.jit(do_not_specialize=["chunks_per_split"])
def _retention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, log_decay_ptr, cos_ptr, sin_ptr, o_ptr,
    length, heads, num_chunks, chunks_per_split,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_THETA: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(0)  # the large grid dimension goes first (the others stop at 65535)
    block_v = tl.program_id(1)
    split = tl.program_id(2)
    batch_index, head = (batch_head // heads).to(tl.int64), batch_head % heads  # 64-bit offsets
    BLOCK_P: tl.constexpr = BLOCK_K // 2
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = block_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_p = tl.arange(0, BLOCK_P)
    mask_k, mask_v, mask_p = offs_k < DK, offs_v < DV, offs_p < DK // 2
    log_decay = tl.load(log_decay_ptr + head)
    intra, query_weight, key_weight, chunk_decay = _decay_weights(log_decay, BLOCK_T)
    qk_rows = _rows(batch_index, head, length, heads, offs_t, offs_k, DK)
    v_rows = _rows(batch_index, head, length, heads, offs_t, offs_v, DV)
    angle_rows = _rows(0, head, length, heads, offs_t, offs_p, DK // 2)  # the (length, heads, dk/2) tables
    qk_step = BLOCK_T * heads * DK  # one chunk further (int32: a chunk's stride is small)
    v_step = BLOCK_T * heads * DV
    angle_step = BLOCK_T * heads * (DK // 2)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, num_chunks)

    state = _state_entering(
        k_ptr, v_ptr, cos_ptr, sin_ptr, qk_rows, v_rows, angle_rows, qk_step, v_step, angle_step, first,
        mask_k, mask_v, mask_p, key_weight, chunk_decay, HAS_THETA, BLOCK_T, BLOCK_K, BLOCK_V, BLOCK_P,
        DOT_DTYPE, PRECISION,
    )  # fmt: skip
    for chunk in range(first, last):
        mask_t = chunk * BLOCK_T + offs_t < length
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + qk_rows + chunk * qk_step, mask=mask_tk, other=0.0)
        k = tl.load(k_ptr + qk_rows + chunk * qk_step, mask=mask_tk, other=0.0)
        v = tl.load(v_ptr + v_rows + chunk * v_step, mask=mask_tv, other=0.0)
        if HAS_THETA:
            mask_tp = mask_t[:, None] & mask_p[None, :]
            cos = tl.load(cos_ptr + angle_rows + chunk * angle_step, mask=mask_tp, other=1.0)
            sin = tl.load(sin_ptr + angle_rows + chunk * angle_step, mask=mask_tp, other=0.0)
            q = _rotate(q, cos, sin, BLOCK_T, BLOCK_P)
            k = _rotate(k, cos, sin, BLOCK_T, BLOCK_P)
        scores = _mm(q, tl.trans(k), None, DOT_DTYPE, PRECISION) * intra
        out = _mm(q, state, None, DOT_DTYPE, PRECISION) * query_weight[:, None]
        out = _mm(scores, v, out, DOT_DTYPE, PRECISION)
        tl.store(o_ptr + v_rows + chunk * v_step, out.to(o_ptr.dtype.element_ty), mask=mask_tv)
        state = _mm(tl.trans(k * key_weight[:, None]), v, state * chunk_decay, DOT_DTYPE, PRECISION)


@triton.jit(do_not_specialize=["chunks_per_split"])
def _retention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, log_decay_ptr, cos_ptr, sin_ptr, do_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlog_decay_ptr, dtheta_ptr,
    batch, length, heads, num_chunks, chunks_per_split,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_THETA: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    QUERIES: tl.constexpr, VALUES: tl.constexpr, KEYS: tl.constexpr,
):  # fmt: skip
    """``dq_ptr``/``dk_ptr`` hold this value block's share (fp32 partials over value blocks, or the
    final tensors when there is one block); ``dv`` is complete per block; ``dlog_decay_ptr`` and
    ``dtheta_ptr`` one partial sum per program. ``QUERIES``, ``VALUES``, ``KEYS``: the gradients this
    launch computes (dq in the forward walk, dv and dk in the reverse walk): all, or a share each in two
    or three launches (fewer live registers, for GPUs where one kernel spills)."""
    batch_head = tl.program_id(0)
    block_v = tl.program_id(1)
    split = tl.program_id(2)
    batch_index, head = (batch_head // heads).to(tl.int64), batch_head % heads
    BLOCK_P: tl.constexpr = BLOCK_K // 2
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = block_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_p = tl.arange(0, BLOCK_P)
    mask_k, mask_v, mask_p = offs_k < DK, offs_v < DV, offs_p < DK // 2
    log_decay = tl.load(log_decay_ptr + head)
    intra, query_weight, key_weight, chunk_decay = _decay_weights(log_decay, BLOCK_T)
    intra_t = tl.trans(intra)  # [j, i], for the key-side products
    qk_rows = _rows(batch_index, head, length, heads, offs_t, offs_k, DK)
    v_rows = _rows(batch_index, head, length, heads, offs_t, offs_v, DV)
    angle_rows = _rows(0, head, length, heads, offs_t, offs_p, DK // 2)
    qk_step = BLOCK_T * heads * DK
    v_step = BLOCK_T * heads * DV
    angle_step = BLOCK_T * heads * (DK // 2)
    share = block_v.to(tl.int64) * batch * length * heads * DK  # this value block's dq/dk share
    dq_ptr += share
    dk_ptr += share
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, num_chunks)
    grad_log_decay = tl.zeros((BLOCK_T,), tl.float32)  # per chunk-local row, summed at the end
    # t (dx~_o x~_e - dx~_e x~_o) per pair, summed over rows at the end (the products are on the rotated
    # values the tensor cores multiplied, rounded to DOT_DTYPE: half the bf16 error)
    grad_theta = tl.zeros((BLOCK_T, BLOCK_P), tl.float32)

    if QUERIES:  # the forward walk (this launch computes dq)
        # queries, first to last chunk: dq_i = sum_{j<=i} gamma^(i-j) (do_i . v_j) k_j + gamma^(i+1) do_i S^T
        state = _state_entering(
            k_ptr, v_ptr, cos_ptr, sin_ptr, qk_rows, v_rows, angle_rows, qk_step, v_step, angle_step, first,
            mask_k, mask_v, mask_p, key_weight, chunk_decay, HAS_THETA, BLOCK_T, BLOCK_K, BLOCK_V, BLOCK_P,
            DOT_DTYPE, PRECISION,
        )  # fmt: skip
        for chunk in range(first, last):
            t, mask_tk, mask_tv, q, k, v, do, cos, sin = _load_chunk(
                q_ptr, k_ptr, v_ptr, do_ptr, cos_ptr, sin_ptr, qk_rows, v_rows, angle_rows, chunk, qk_step,
                v_step, angle_step, length, offs_t, mask_k, mask_v, mask_p, HAS_THETA, BLOCK_T, BLOCK_P,
            )  # fmt: skip
            q = q.to(DOT_DTYPE)  # the rotated queries as the tensor cores take them (dtheta uses these)
            grad_scores = _mm(do, tl.trans(v), None, DOT_DTYPE, PRECISION) * intra
            dq = _mm(do, tl.trans(state), None, DOT_DTYPE, PRECISION) * query_weight[:, None]
            dq = _mm(grad_scores, k, dq, DOT_DTYPE, PRECISION)
            grad_log_decay += t.to(tl.float32) * tl.sum(q.to(tl.float32) * dq, axis=1)
            if HAS_THETA:
                dq, grad_theta = _unrotate_grad(q, dq, t, cos, sin, grad_theta, BLOCK_T, BLOCK_P)
            tl.store(dq_ptr + qk_rows + chunk * qk_step, dq.to(dq_ptr.dtype.element_ty), mask=mask_tk)
            state = _mm(tl.trans(k * key_weight[:, None]), v, state * chunk_decay, DOT_DTYPE, PRECISION)

    if VALUES or KEYS:  # the reverse walk
        # keys and values, last to first chunk: dS = sum over later queries of gamma^(i+1) q_i^T do_i
        state = tl.zeros((BLOCK_K, BLOCK_V), tl.float32)
        for reverse in range(0, num_chunks - last):
            chunk = num_chunks - 1 - reverse
            mask_t = chunk * BLOCK_T + offs_t < length
            q = tl.load(q_ptr + qk_rows + chunk * qk_step, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            do = tl.load(do_ptr + v_rows + chunk * v_step, mask=mask_t[:, None] & mask_v[None, :], other=0.0)
            if HAS_THETA:
                mask_tp = mask_t[:, None] & mask_p[None, :]
                cos = tl.load(cos_ptr + angle_rows + chunk * angle_step, mask=mask_tp, other=1.0)
                sin = tl.load(sin_ptr + angle_rows + chunk * angle_step, mask=mask_tp, other=0.0)
                q = _rotate(q, cos, sin, BLOCK_T, BLOCK_P)
            state = _mm(tl.trans(q * query_weight[:, None]), do, state * chunk_decay, DOT_DTYPE, PRECISION)
        for reverse in range(0, last - first):
            chunk = last - 1 - reverse
            t, mask_tk, mask_tv, q, k, v, do, cos, sin = _load_chunk(
                q_ptr, k_ptr, v_ptr, do_ptr, cos_ptr, sin_ptr, qk_rows, v_rows, angle_rows, chunk, qk_step,
                v_step, angle_step, length, offs_t, mask_k, mask_v, mask_p, HAS_THETA, BLOCK_T, BLOCK_P,
            )  # fmt: skip
            k = k.to(DOT_DTYPE)  # the rotated keys as the tensor cores take them (dtheta uses these)
            if VALUES:
                scores_t = _mm(k, tl.trans(q), None, DOT_DTYPE, PRECISION) * intra_t  # [j, i]
                dv = _mm(k, state, None, DOT_DTYPE, PRECISION) * key_weight[:, None]
                dv = _mm(scores_t, do, dv, DOT_DTYPE, PRECISION)
                tl.store(dv_ptr + v_rows + chunk * v_step, dv.to(dv_ptr.dtype.element_ty), mask=mask_tv)
            if KEYS:
                grad_scores_t = _mm(v, tl.trans(do), None, DOT_DTYPE, PRECISION) * intra_t  # [j, i]
                dk = _mm(v, tl.trans(state), None, DOT_DTYPE, PRECISION) * key_weight[:, None]
                dk = _mm(grad_scores_t, q, dk, DOT_DTYPE, PRECISION)
                grad_log_decay -= t.to(tl.float32) * tl.sum(k.to(tl.float32) * dk, axis=1)
                if HAS_THETA:
                    dk, grad_theta = _unrotate_grad(k, dk, t, cos, sin, grad_theta, BLOCK_T, BLOCK_P)
                tl.store(dk_ptr + qk_rows + chunk * qk_step, dk.to(dk_ptr.dtype.element_ty), mask=mask_tk)
            state = _mm(tl.trans(q * query_weight[:, None]), do, state * chunk_decay, DOT_DTYPE, PRECISION)

    program = (split * tl.num_programs(1) + block_v) * tl.num_programs(0) + batch_head
    tl.store(dlog_decay_ptr + program, tl.sum(grad_log_decay, axis=0))
    if HAS_THETA:
        tl.store(dtheta_ptr + program * (DK // 2) + offs_p, tl.sum(grad_theta, axis=0), mask=mask_p)
