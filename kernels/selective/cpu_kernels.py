"""Numba kernels of the selective scan on CPU: the recurrence and its adjoint, compiled by LLVM.

Why numba: the recurrence is sequential in time, so neither a whole-tensor PyTorch form nor an
Inductor-compiled one can keep the state in cache between tokens without a Python loop (Inductor would
unroll the loop per token and recompile per length); a C++ extension would need a compiler or prebuilt
wheels per platform. numba installs from wheels (numba + llvmlite), compiles these loops to vectorised
machine code on first call (cached on disk, ``cache=True``), runs ``prange`` loops on all cores, and the
same functions run as plain Python/NumPy under ``NUMBA_DISABLE_JIT=1`` for debugging.

Work split: one task per (batch row, tile of ``tile`` consecutive channels, chosen by the caller from
the shapes alone: ``tile_width``); every task is computed entirely by one thread, which writes only its
own slice of every output, and the cross-task sums (``grad A`` over the batch, ``grad B``/``grad C`` over
channel tiles) are left as partials that the caller sums in a fixed order: results are bitwise
reproducible whatever the thread count or schedule. Inside a task the state ``(state, tile)`` lives in a
local array (L1/L2) and every inner loop runs over the tile's channels, contiguous in memory, so LLVM
vectorises it (AVX2 or AVX-512 lanes). Wide tiles pay: per (token, state) the loop has scalar work (the
``B``/``C`` loads, the ``grad B``/``grad C`` lane sums) that a wider tile spreads over more lanes; measured
at the base shapes on one thread, tiles of 256 channels took about 0.7x the time of tiles of 64.

Backward without a full-length scratch: the forward saves the state at the start of every ``CHUNK``
tokens (``bounds``, 1/CHUNK of the states); the backward recomputes one chunk's states and decays from
its bound, ``GROUP`` states at a time, into a scratch of ``GROUP x 2 x 17 x tile`` floats (L1), then runs
those states' adjoint over that chunk. Both directions take ``GROUP`` (2) states per pass of their inner
loops, so that what a pass shares between states (``delta``, ``delta u``, ``dy``, the sums over states)
is loaded and stored once for both; a task's strided rows are prefetched ahead (``_prefetch_row``).

Channel indices: a task's rows are taken as slices (``x[b, t, e0 : e0 + width]``) and indexed from 0.
Indexed as ``x[b, t, e0 + i]``, numba cannot prove the index non-negative, keeps its wraparound select,
and LLVM turns every such copy into gathers/scatters: measured on one thread, the forward took 15.0 ms
that way and 7.3 ms with slices, the backward 31 ms and 19 ms (at the base shapes).

Decays: float32 computes ``exp(delta A)`` as ``2^(delta A log2 e)`` with an inlined polynomial
(``_decay``: one rounding, a degree-5 polynomial, the exponent bits; relative error ~2e-7), which LLVM
vectorises; LLVM has no vector ``exp`` without SVML (not in the llvmlite wheels), and the scalar libm
call blocks vectorisation. float64 keeps ``math.exp`` (exactness in the float64 tests matters more than
speed there). ``_FASTMATH`` allows no reassociation, so the floating-point order is the one written
here, except in the backward's ``grad B``/``grad C`` channel sums and ``_group_sum``, where reassociation
lets LLVM sum in vector lanes: their order is fixed by the compiled code, so results stay deterministic.

Layouts (all C-contiguous): ``u, delta, dy, y: (batch, length, channels)``, ``AT: (state, channels)``
(``A`` transposed, so a tile of channels is contiguous), ``B, C: (batch, length, state)``,
``bounds: (batch, chunks, state, channels)``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# fastmath without "reassoc": contraction to FMA and no NaN/inf/signed-zero care, but no reordering of
# sums (so that the written order, and with it the result, is what runs).
_FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
_JIT = dict(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", boundscheck=False)


def _exp(x):
    """``exp(x)``. As plain Python (``NUMBA_DISABLE_JIT=1``) this is NumPy's; compiled, see ``_exp_impl``."""
    return np.exp(x)


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (a no-op in registers, so it vectorises)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@overload(_exp, jit_options=dict(fastmath=_FASTMATH, inline="always"))
def _exp_impl(x):
    if x == types.float32:

        def exp_float32(x):
            # exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 with ln 2 in two parts (Cody-Waite,
            # as Cephes' expf) so that r is accurate even at |x| ~ 87; clamped so that 2^k is a normal
            # float (exp(-87) = 1.6e-38: decays below that are 0 to the scan).
            # selects, not min()/max(): numba's min/max branch on NaN, which stops vectorisation
            x = x if x > np.float32(-87.0) else np.float32(-87.0)
            x = x if x < np.float32(88.0) else np.float32(88.0)
            # k + 127 as an int32 (x log2(e) + 127.5 > 0, so truncation is floor(. + 1/2)), then back in
            # float32: every conversion stays 32-bit (numba's int arithmetic widens to int64, which AVX2
            # cannot convert to float in vectors; that alone kept this loop scalar)
            biased = np.float32(np.int32(x * np.float32(1.4426950408889634) + np.float32(127.5)))
            k = biased - np.float32(127.0)
            r = x - k * np.float32(0.693359375)
            r = r - k * np.float32(-2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * (r * r) + r + np.float32(1.0)
            return p * _int32_bits_as_float32(np.int32(biased * np.float32(8388608.0)))  # (k + 127) << 23

        return exp_float32
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


MAX_TILE = 256  # channels per task at most (see the module docstring)
LANES = 16  # tiles are whole multiples of this many channels (one AVX-512 or two AVX2 fp32 vectors)
MIN_TASKS = 8  # narrower tiles until a call has this many tasks (for the cores), shapes permitting
CHUNK = 16  # tokens per backward chunk: the forward saves the state at every chunk start
GROUP = 2  # states per pass of the inner loops (the code below is written for 2)
AHEAD = 4  # tokens the forward prefetches its rows ahead


def tile_width(batch: int, channels: int) -> int:
    """Channels per task for these shapes: ``MAX_TILE`` (or the channels rounded up to ``LANES``), halved
    while the call would have fewer than ``MIN_TASKS`` tasks. Shapes only, never the thread count, so
    that the partial sums, and with them the results, do not depend on the machine."""
    tile = min(MAX_TILE, -(-channels // LANES) * LANES)
    while tile > LANES and batch * -(-channels // tile) < MIN_TASKS:
        tile = max(LANES, tile // 2 // LANES * LANES)
    return tile


_JIT_SUM = dict(_JIT, fastmath=_FASTMATH | {"reassoc"})


LOG2E = 1.4426950408889634


def _decay(dt, a, a2):
    """``exp(dt * a)``; ``a2 = a log2(e)``. Plain Python: NumPy's. Compiled: see ``_decay_impl``."""
    return np.exp(dt * a)


@intrinsic
def _rint_float32(typingctx, x):
    """Round to the nearest integer (one ``vroundps`` in vectors)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.rint.f32")
        return builder.call(fn, [args[0]])

    return sig, codegen


@intrinsic
def _clamp_float32(typingctx, x, lo, hi):
    """``min(max(x, lo), hi)`` as LLVM's maxnum/minnum: one ``vmaxps`` and one ``vminps`` in vectors
    (a ``x if x > lo else lo`` select compiles to compares, mask logic and two blends)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
        fmax = cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.f32")
        fmin = cgutils.get_or_insert_function(builder.module, fnty, "llvm.minnum.f32")
        return builder.call(fmin, [builder.call(fmax, [args[0], args[1]]), args[2]])

    return sig, codegen


@intrinsic
def _pow2_float32(typingctx, k):
    """``2^k`` for an integral float32 ``k`` in [-126, 127]: ``(k + 127) << 23`` as float32 bits."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return sig, codegen


@overload(_decay, jit_options=dict(fastmath=_FASTMATH, inline="always"))
def _decay_impl(dt, a, a2):
    if dt == types.float32:

        def decay_float32(dt, a, a2):
            # 2^x, x = dt a log2(e): x = k + f with k = rint(x), |f| <= 1/2, 2^f by a degree-5 polynomial
            # (relative error 1.9e-7 over [-1/2, 1/2], fitted for this with 2^0 = 1), 2^k from the
            # exponent bits; clamped so that 2^k stays a normal float (2^-126: smaller decays are 0 here)
            x = _clamp_float32(dt * a2, np.float32(-126.0), np.float32(126.0))
            k = _rint_float32(x)
            f = x - k
            p = np.float32(1.3218672247603536e-3)
            p = p * f + np.float32(9.671698324382305e-3)
            p = p * f + np.float32(5.550893023610115e-2)
            p = p * f + np.float32(2.4022237956523895e-1)
            p = p * f + np.float32(6.931468844413757e-1)
            p = p * f + np.float32(1.0)  # exactly 1 at 0: no growth where delta is 0 (padded lanes)
            return p * _pow2_float32(k)

        return decay_float32
    return lambda dt, a, a2: math.exp(dt * a)


def _prefetch(row, i, write):
    """Ask for the cache line of ``row[i]`` (into L2; ``write``: to be written), without waiting for it.
    Plain Python: nothing."""


@intrinsic
def _prefetch_line(typingctx, row, i, write):
    sig = types.void(row, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        array = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, array, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read or write (an operand LLVM needs constant: a branch, folded once ``write`` is known),
        # locality 2 (prefetcht1 / prefetchw: L2, the rows are used a while later), data
        with builder.if_else(args[2]) as (then, otherwise):
            for block, rw in ((then, 1), (otherwise, 0)):
                with block:
                    builder.call(fn, [builder.bitcast(ptr, i8p), *(ir.Constant(i32, v) for v in (rw, 2, 1))])
        return context.get_dummy_value()

    return sig, codegen


@overload(_prefetch, jit_options=dict(inline="always"))
def _prefetch_impl(row, i, write):
    return lambda row, i, write: _prefetch_line(row, i, write)


@numba.njit(inline="always", **_JIT)
def _prefetch_row(src, b, t, e0, width, write):
    """Prefetch ``src[b, t, e0:e0 + width]`` line by line (``write``: for a row to be written). A task's
    rows are 1 KB pieces 6 KB apart (at the base shapes): the hardware prefetchers do not run ahead of
    them, and the copies to and from them waited on memory (prefetching took ~10% off the forward and
    the backward on one thread)."""
    row = src[b, t, e0 : e0 + width]
    for i in range(0, width, 64 // row.itemsize):
        _prefetch(row, i, write)


@numba.njit(inline="always", **_JIT)
def _load_tile(src, b, t, e0, width, dst, tile):
    """``dst[:width] = src[b, t, e0:e0 + width]``, zeros up to ``tile``: padded lanes carry no signal
    (zero delta and input give decay 1 and state 0), so the loops always run over the full tile."""
    row = src[b, t, e0 : e0 + width]
    for i in range(width):
        dst[i] = row[i]
    for i in range(width, tile):
        dst[i] = 0


@numba.njit(inline="always", **_JIT)
def _load_rates(AT, e0, width, a, a2):
    """A task's decay rates: ``a[n, :width] = A^T[n, e0:e0 + width]`` and ``a2 = a log2(e)`` (the lanes
    past ``width`` keep the zeros they were allocated with: decay 1 on padded lanes)."""
    for n in range(AT.shape[0]):
        for i in range(width):
            a[n, i] = AT[n, e0 + i]
            a2[n, i] = a[n, i] * LOG2E


@numba.njit(parallel=True, **_JIT)
def scan_fwd(u, delta, AT, B, C, y, bounds, threads, tile):
    """``y[b, t, e] = sum_n C[b, t, n] s_t[n, e]``, ``s_t = exp(delta_t A) s_{t-1} + delta_t u_t B_t``;
    ``bounds[b, c, n, e] = s_{c CHUNK - 1}[n, e]`` (the state before chunk ``c``) for the backward.
    ``tile``: channels per task (``tile_width``); ``threads``: how many threads to plan the tasks for."""
    batch, length, channels = u.shape
    n_state = AT.shape[0]
    n_pad = -(-n_state // GROUP) * GROUP  # padded states: rate 0, B = C = 0, so state 0
    tiles = (channels + tile - 1) // tile
    tasks = batch * tiles
    chunks = min(tasks, 4 * threads)
    for chunk in numba.prange(chunks):
        s = np.empty((n_pad, tile), dtype=u.dtype)
        a = np.zeros((n_pad, tile), dtype=u.dtype)
        a2 = np.zeros((n_pad, tile), dtype=u.dtype)
        dt = np.empty(tile, dtype=u.dtype)
        xt = np.empty(tile, dtype=u.dtype)
        acc = np.empty(tile, dtype=u.dtype)
        bt = np.zeros(n_pad, dtype=u.dtype)  # B_t and C_t (0 for padded states)
        ct = np.zeros(n_pad, dtype=u.dtype)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            b, e0 = task // tiles, (task % tiles) * tile
            width = min(tile, channels - e0)
            _load_rates(AT, e0, width, a, a2)
            for n in range(n_pad):
                for i in range(tile):
                    s[n, i] = 0
            for t in range(length):
                if t % CHUNK == 0:
                    for n in range(n_state):
                        bound = bounds[b, t // CHUNK, n, e0 : e0 + width]
                        for i in range(width):
                            bound[i] = s[n, i]
                if t + AHEAD < length:
                    _prefetch_row(delta, b, t + AHEAD, e0, width, False)
                    _prefetch_row(u, b, t + AHEAD, e0, width, False)
                    _prefetch_row(y, b, t + AHEAD, e0, width, True)
                    if (t + AHEAD) % CHUNK == 0:
                        for n in range(n_state):
                            _prefetch_row(bounds[b], (t + AHEAD) // CHUNK, n, e0, width, True)
                _load_tile(delta, b, t, e0, width, dt, tile)
                _load_tile(u, b, t, e0, width, xt, tile)
                for n in range(n_state):
                    bt[n], ct[n] = B[b, t, n], C[b, t, n]
                for i in range(tile):
                    xt[i] = dt[i] * xt[i]  # the input delta_t u_t
                    acc[i] = 0
                for n0 in range(0, n_pad, GROUP):  # two states per pass: dt, xt and acc once for both
                    n1 = n0 + 1
                    b0, b1, c0, c1 = bt[n0], bt[n1], ct[n0], ct[n1]
                    for i in range(tile):
                        s0 = _decay(dt[i], a[n0, i], a2[n0, i]) * s[n0, i] + xt[i] * b0
                        s1 = _decay(dt[i], a[n1, i], a2[n1, i]) * s[n1, i] + xt[i] * b1
                        s[n0, i] = s0
                        s[n1, i] = s1
                        acc[i] += c0 * s0 + c1 * s1
                yt = y[b, t, e0 : e0 + width]
                for i in range(width):
                    yt[i] = acc[i]


@numba.njit(inline="always", **_JIT)
def _load_bound(bounds, b, c, n, n_state, e0, width, dst, tile):
    """``dst[:width] = bounds[b, c, n, e0:e0 + width]``, zeros past ``width`` and for padded states."""
    for i in range(tile):
        dst[i] = 0
    if n < n_state:
        bound = bounds[b, c, n, e0 : e0 + width]
        for i in range(width):
            dst[i] = bound[i]


@numba.njit(parallel=True, **_JIT_SUM)
def scan_bwd(dy, u, delta, AT, B, C, bounds, du, ddelta, dAT_part, dB_part, dC_part, threads, tile):
    """Gradients of ``scan_fwd`` from ``dy`` and its ``bounds``: ``du, ddelta`` in full; ``dAT_part:
    (batch, state, channels)`` (sum over dim 0 for ``dA^T``), ``dB_part, dC_part: (tiles, batch, length,
    state)`` (sum over dim 0). Chunk by chunk from the end; within a chunk, ``GROUP`` states at a time:
    recompute the group's states and decays over the chunk from its bound, then run the group's adjoint
    backwards with ``carry_t = a_t g_t`` (``g_t = C_t dy_t + carry_{t+1}`` = d loss / d s_t), adding its
    terms of ``grad(delta u)`` and ``grad delta`` into per-chunk sums. Group by group keeps what a token
    step touches in L1 (a group's scratch is ``GROUP / state`` of all states') and shares the per-token
    loads and the two sums between the group's states. The states are padded to whole groups (rate 0,
    ``B = C = 0``: state and gradients 0). Compiled with reassociation for the lane sums of
    ``grad B``/``grad C`` (one vector sum each per token and state)."""
    batch, length, channels = u.shape
    n_state = AT.shape[0]
    n_pad = -(-n_state // GROUP) * GROUP
    tiles = (channels + tile - 1) // tile
    tasks = batch * tiles
    chunks = min(tasks, 4 * threads)
    for chunk in numba.prange(chunks):
        # one group's states and decays over a chunk: states[j + 1, k] = s_{t0 + j}[n0 + k]
        # (separate arrays per state: with one array, LLVM's overlap checks failed and the scalar loop ran)
        states0 = np.empty((CHUNK + 1, tile), dtype=u.dtype)
        states1 = np.empty((CHUNK + 1, tile), dtype=u.dtype)
        decays0 = np.empty((CHUNK, tile), dtype=u.dtype)
        decays1 = np.empty((CHUNK, tile), dtype=u.dtype)
        a = np.zeros((n_pad, tile), dtype=u.dtype)
        a2 = np.zeros((n_pad, tile), dtype=u.dtype)
        carry = np.empty((n_pad, tile), dtype=u.dtype)
        grad_a = np.empty((n_pad, tile), dtype=u.dtype)
        dtc = np.empty((CHUNK, tile), dtype=u.dtype)  # the chunk's delta, delta u and dy
        xc = np.empty((CHUNK, tile), dtype=u.dtype)
        dyc = np.empty((CHUNK, tile), dtype=u.dtype)
        gx = np.empty((CHUNK, tile), dtype=u.dtype)  # d loss / d(delta_t u_t), summed over the states
        glog = np.empty((CHUNK, tile), dtype=u.dtype)  # d loss / d delta_t through the decays
        bc = np.zeros((CHUNK, n_pad), dtype=u.dtype)  # the chunk's B and C (0 for padded states)
        cc = np.zeros((CHUNK, n_pad), dtype=u.dtype)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            b, tix = task // tiles, task % tiles
            e0 = tix * tile
            width = min(tile, channels - e0)
            _load_rates(AT, e0, width, a, a2)
            for n in range(n_pad):
                for i in range(tile):
                    carry[n, i] = 0
                    grad_a[n, i] = 0
            for c in range((length + CHUNK - 1) // CHUNK - 1, -1, -1):
                t0 = c * CHUNK
                steps = min(CHUNK, length - t0)
                for j in range(steps):
                    _load_tile(delta, b, t0 + j, e0, width, dtc[j], tile)
                    _load_tile(u, b, t0 + j, e0, width, xc[j], tile)
                    _load_tile(dy, b, t0 + j, e0, width, dyc[j], tile)
                    for i in range(tile):
                        xc[j, i] = dtc[j, i] * xc[j, i]
                        gx[j, i] = 0
                        glog[j, i] = 0
                    for n in range(n_state):
                        bc[j, n] = B[b, t0 + j, n]
                        cc[j, n] = C[b, t0 + j, n]
                for n0 in range(0, n_pad, GROUP):
                    n1 = n0 + 1
                    # a share per group of: this chunk's rows of du and ddelta (written at its end), the
                    # previous chunk's rows and bounds (see _prefetch_row)
                    for j in range(n0 * steps // n_pad, (n0 + GROUP) * steps // n_pad):
                        _prefetch_row(du, b, t0 + j, e0, width, True)
                        _prefetch_row(ddelta, b, t0 + j, e0, width, True)
                    if c > 0:
                        for j in range(n0 * CHUNK // n_pad, (n0 + GROUP) * CHUNK // n_pad):
                            for src in (delta, u, dy):
                                _prefetch_row(src, b, t0 - CHUNK + j, e0, width, False)
                        for n in range(n0, min(n0 + GROUP, n_state)):
                            _prefetch_row(bounds[b], c - 1, n, e0, width, False)
                    _load_bound(bounds, b, c, n0, n_state, e0, width, states0[0], tile)
                    _load_bound(bounds, b, c, n1, n_state, e0, width, states1[0], tile)
                    for j in range(steps):
                        b0, b1 = bc[j, n0], bc[j, n1]
                        for i in range(tile):
                            d0 = _decay(dtc[j, i], a[n0, i], a2[n0, i])
                            d1 = _decay(dtc[j, i], a[n1, i], a2[n1, i])
                            decays0[j, i] = d0
                            decays1[j, i] = d1
                            states0[j + 1, i] = d0 * states0[j, i] + xc[j, i] * b0
                            states1[j + 1, i] = d1 * states1[j, i] + xc[j, i] * b1
                    for j in range(steps - 1, -1, -1):
                        b0, b1, c0, c1 = bc[j, n0], bc[j, n1], cc[j, n0], cc[j, n1]
                        db0 = b0 - b0  # grad B, C of (t, n): lane sums (in float32: b0 * 0 is float64)
                        db1, dc0, dc1 = db0, db0, db0
                        for i in range(tile):
                            g0 = dyc[j, i] * c0 + carry[n0, i]
                            g1 = dyc[j, i] * c1 + carry[n1, i]
                            db0 += g0 * xc[j, i]
                            db1 += g1 * xc[j, i]
                            dc0 += states0[j + 1, i] * dyc[j, i]
                            dc1 += states1[j + 1, i] * dyc[j, i]
                            gx[j, i] += g0 * b0 + g1 * b1
                            ag0 = decays0[j, i] * g0
                            ag1 = decays1[j, i] * g1
                            carry[n0, i] = ag0
                            carry[n1, i] = ag1
                            # d loss / d(delta_t A) = g_t a_t s_{t-1} (zero at t = 0: s_{-1} = 0)
                            gl0 = ag0 * states0[j, i]
                            gl1 = ag1 * states1[j, i]
                            glog[j, i] += gl0 * a[n0, i] + gl1 * a[n1, i]
                            grad_a[n0, i] += gl0 * dtc[j, i]
                            grad_a[n1, i] += gl1 * dtc[j, i]
                        dB_part[tix, b, t0 + j, n0] = db0
                        dC_part[tix, b, t0 + j, n0] = dc0
                        if n1 < n_state:
                            dB_part[tix, b, t0 + j, n1] = db1
                            dC_part[tix, b, t0 + j, n1] = dc1
                for j in range(steps):
                    dut = du[b, t0 + j, e0 : e0 + width]
                    ddt = ddelta[b, t0 + j, e0 : e0 + width]
                    ut = u[b, t0 + j, e0 : e0 + width]
                    for i in range(width):
                        dut[i] = gx[j, i] * dtc[j, i]
                        ddt[i] = glog[j, i] + gx[j, i] * ut[i]
            for n in range(n_state):
                dat = dAT_part[b, n, e0 : e0 + width]
                for i in range(width):
                    dat[i] = grad_a[n, i]
