"""Numba kernels of the selective scan on CPU: the recurrence and its adjoint, compiled by LLVM.

Why numba: the recurrence is sequential in time, so neither a whole-tensor PyTorch form nor an
Inductor-compiled one can keep the state in cache between tokens without a Python loop (Inductor would
unroll the loop per token and recompile per length); a C++ extension would need a compiler or prebuilt
wheels per platform. numba installs from wheels (numba + llvmlite), compiles these loops to vectorised
machine code on first call (cached on disk, ``cache=True``), runs ``prange`` loops on all cores, and the
same functions run as plain Python/NumPy under ``NUMBA_DISABLE_JIT=1`` for debugging.

Work split: one task per (batch row, tile of ``TILE`` consecutive channels); every task is computed
entirely by one thread, which writes only its own slice of every output, and the cross-task sums
(``grad A`` over the batch, ``grad B``/``grad C`` over channel tiles) are left as partials that the
caller sums in a fixed order: results are bitwise reproducible whatever the thread count or schedule.
Inside a task the state ``(state, TILE)`` lives in a 1-2 KiB local array (L1) and every inner loop runs
over the tile's channels, contiguous in memory, so LLVM vectorises it (AVX2: 8 fp32 lanes).

``exp``: LLVM has no vector ``exp`` without SVML (not in the llvmlite wheels), and the scalar libm call
blocks vectorisation and measured ~2x slower than this inlined polynomial, so float32 uses ``_exp``'s
compiled form below (Cephes' ``expf``: Cody-Waite reduction, degree-7 polynomial, ``2^k`` built from the
exponent bits; max relative error ~2e-7, 1-2 fp32 ulp). float64 keeps ``math.exp`` (exactness in the
float64 tests matters more than speed there). Neither ``fastmath`` flag set allows reassociation, so
the floating-point order is the one written here; the tile sums are explicit pairwise trees.

Layouts (all C-contiguous): ``u, delta, dy, y: (batch, length, channels)``, ``AT: (state, channels)``
(``A`` transposed, so a tile of channels is contiguous), ``B, C: (batch, length, state)``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

TILE = 16  # channels per task: a power of two (the pairwise tile sums halve it); 2 AVX2 fp32 vectors
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


@numba.njit(**_JIT)
def _tile_sum(values, scratch):
    """Sum of ``values[:TILE]`` as a pairwise tree (fixed order; each level a vectorised add)."""
    half = TILE // 2
    for i in range(half):
        scratch[i] = values[i] + values[i + half]
    half //= 2
    while half >= 1:
        for i in range(half):
            scratch[i] = scratch[i] + scratch[i + half]
        half //= 2
    return scratch[0]


@numba.njit(**_JIT)
def _load_tile(src, b, t, e0, width, dst):
    """``dst[:width] = src[b, t, e0:e0 + width]``, zeros beyond: padded lanes carry no signal (zero
    delta and input give decay 1 and state 0), so the loops always run over the full TILE."""
    for i in range(width):
        dst[i] = src[b, t, e0 + i]
    for i in range(width, TILE):
        dst[i] = 0


@numba.njit(parallel=True, **_JIT)
def scan_fwd(u, delta, AT, B, C, y, threads):
    """``y[b, t, e] = sum_n C[b, t, n] s_t[n, e]``, ``s_t = exp(delta_t A) s_{t-1} + delta_t u_t B_t``.

    ``threads``: the number of numba threads in use (sets the work split, never the result)."""
    batch, length, channels = u.shape
    n_state = AT.shape[0]
    tiles = (channels + TILE - 1) // TILE
    tasks = batch * tiles
    # a static split into ~4 chunks per thread, each allocating its scratch once (a fresh 400 KB
    # scratch per task would be an mmap and page faults each time); ``threads`` comes from the caller
    # (numba.get_num_threads() inside would make the function uncacheable)
    chunks = min(tasks, 4 * threads)
    for chunk in numba.prange(chunks):
        s = np.empty((n_state, TILE), dtype=u.dtype)
        a = np.zeros((n_state, TILE), dtype=u.dtype)
        dt = np.empty(TILE, dtype=u.dtype)
        ut = np.empty(TILE, dtype=u.dtype)
        acc = np.empty(TILE, dtype=u.dtype)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            b, e0 = task // tiles, (task % tiles) * TILE
            width = min(TILE, channels - e0)
            for n in range(n_state):
                for i in range(width):
                    a[n, i] = AT[n, e0 + i]
                for i in range(TILE):
                    s[n, i] = 0
            for t in range(length):
                _load_tile(delta, b, t, e0, width, dt)
                _load_tile(u, b, t, e0, width, ut)
                for i in range(TILE):
                    ut[i] = dt[i] * ut[i]  # the input delta_t u_t
                    acc[i] = 0
                for n in range(n_state):
                    bn, cn = B[b, t, n], C[b, t, n]
                    for i in range(TILE):
                        s[n, i] = _exp(dt[i] * a[n, i]) * s[n, i] + ut[i] * bn
                        acc[i] += cn * s[n, i]
                for i in range(width):
                    y[b, t, e0 + i] = acc[i]


@numba.njit(parallel=True, **_JIT)
def scan_bwd(dy, u, delta, AT, B, C, du, ddelta, dAT_part, dB_part, dC_part, threads):
    """Gradients of ``scan_fwd`` from ``dy``: ``du, ddelta`` in full; ``dAT_part: (batch, state,
    channels)`` (sum over dim 0 for ``dA^T``), ``dB_part, dC_part: (tiles, batch, length, state)`` (sum
    over dim 0). Each task recomputes its states into a ``(length + 1, state, TILE)`` scratch (row 0 the
    zero initial state) with the decays beside them, then runs the adjoint recurrence backwards:
    ``g_t = C_t dy_t + a_{t+1} g_{t+1}``. ``threads``: as in ``scan_fwd``."""
    batch, length, channels = u.shape
    n_state = AT.shape[0]
    tiles = (channels + TILE - 1) // TILE
    tasks = batch * tiles
    # a static split into ~4 chunks per thread, each allocating its scratch once (a fresh 400 KB
    # scratch per task would be an mmap and page faults each time); ``threads`` comes from the caller
    # (numba.get_num_threads() inside would make the function uncacheable)
    chunks = min(tasks, 4 * threads)
    for chunk in numba.prange(chunks):
        states = np.empty((length + 1, n_state, TILE), dtype=u.dtype)  # states[t + 1] = s_t
        decays = np.empty((length + 1, n_state, TILE), dtype=u.dtype)  # decays[t] = a_t, decays[L] = 0
        a = np.zeros((n_state, TILE), dtype=u.dtype)
        g = np.empty((n_state, TILE), dtype=u.dtype)
        grad_a = np.empty((n_state, TILE), dtype=u.dtype)
        dt = np.empty(TILE, dtype=u.dtype)
        ut = np.empty(TILE, dtype=u.dtype)
        xt = np.empty(TILE, dtype=u.dtype)
        dyt = np.empty(TILE, dtype=u.dtype)
        gx = np.empty(TILE, dtype=u.dtype)
        glog = np.empty(TILE, dtype=u.dtype)
        terms = np.empty(TILE, dtype=u.dtype)
        scratch = np.empty(TILE, dtype=u.dtype)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            b, tile = task // tiles, task % tiles
            e0 = tile * TILE
            width = min(TILE, channels - e0)
            for n in range(n_state):
                for i in range(width):
                    a[n, i] = AT[n, e0 + i]
                for i in range(TILE):
                    states[0, n, i] = 0
                    decays[length, n, i] = 0
                    g[n, i] = 0
                    grad_a[n, i] = 0
            # forward again, keeping the tile's states and decays (L2-sized) instead of the whole
            # (length, batch, channels, state) tensor the PyTorch form stores
            for t in range(length):
                _load_tile(delta, b, t, e0, width, dt)
                _load_tile(u, b, t, e0, width, ut)
                for n in range(n_state):
                    bn = B[b, t, n]
                    for i in range(TILE):
                        decay = _exp(dt[i] * a[n, i])
                        decays[t, n, i] = decay
                        states[t + 1, n, i] = decay * states[t, n, i] + dt[i] * ut[i] * bn
            for t in range(length - 1, -1, -1):
                _load_tile(delta, b, t, e0, width, dt)
                _load_tile(u, b, t, e0, width, ut)
                _load_tile(dy, b, t, e0, width, dyt)
                for i in range(TILE):
                    xt[i] = dt[i] * ut[i]
                    gx[i] = 0  # d loss / d(delta_t u_t)
                    glog[i] = 0  # d loss / d delta_t through the decay
                for n in range(n_state):
                    bn, cn = B[b, t, n], C[b, t, n]
                    for i in range(TILE):
                        gn = dyt[i] * cn + decays[t + 1, n, i] * g[n, i]
                        g[n, i] = gn
                        gx[i] += gn * bn
                        # d loss / d(delta_t A) = g_t s_{t-1} a_t (zero at t = 0: s_{-1} = 0)
                        grad_log = gn * states[t, n, i] * decays[t, n, i]
                        glog[i] += grad_log * a[n, i]
                        grad_a[n, i] += grad_log * dt[i]
                        terms[i] = gn * xt[i]
                    dB_part[tile, b, t, n] = _tile_sum(terms, scratch)
                    for i in range(TILE):
                        terms[i] = states[t + 1, n, i] * dyt[i]
                    dC_part[tile, b, t, n] = _tile_sum(terms, scratch)
                for i in range(width):
                    du[b, t, e0 + i] = gx[i] * dt[i]
                    ddelta[b, t, e0 + i] = glog[i] + gx[i] * ut[i]
            for n in range(n_state):
                for i in range(width):
                    dAT_part[b, n, e0 + i] = grad_a[n, i]
