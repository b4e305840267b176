"""Numba kernels of the released mixer's epilogue on CPU: group RMS norm, ``+ D u``, ``* silu(z)``,
forward and backward, row by row over ``(tokens, channels)`` views (all cores, vectorised over channels).

The PyTorch form of the same epilogue costs ~2x the scan itself at the base shapes (a dozen full-size
temporaries forward and backward); fused here it reads each input once. Loops are split so that each
touches few arrays: at the base shapes on one thread this took 5.1 / 10.6 ms forward / backward, against
8.3 / 20.5 ms for one loop body per group that did everything. ``grad D`` is summed in partials of
``ROWS_PER_PART`` rows, reduced by the caller in a fixed order (deterministic at any thread count).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .cpu_kernels import _JIT, _JIT_SUM, _exp

ROWS_PER_PART = 64  # epilogue rows (tokens) per partial sum of grad D: fixed, so the sum order is too


@numba.njit(inline="always", **_JIT)
def _sigmoid(z):
    return 1 / (1 + _exp(-z))


@numba.njit(inline="always", **_JIT_SUM)
def _sum_squares(x, start, stop):
    """``sum(x[start:stop] ** 2)`` (vector lanes: reassociation allowed in the channel sums only)."""
    # ``x[start] * 0`` is float64 for float32 ``x`` (numba widens float32 * int), so these sums and the
    # norm's scalars are float64: measured side by side, float32 ones were ~15% slower forward (2.8 vs
    # 2.4 ms at the base shapes, 2 threads), and float64 is the more accurate
    acc = x[start] * 0
    for i in range(start, stop):
        acc += x[i] * x[i]
    return acc


@numba.njit(inline="always", **_JIT_SUM)
def _sum_products(x, y, start, stop):
    """``sum(x[start:stop] * y[start:stop])``."""
    acc = x[start] * 0
    for i in range(start, stop):
        acc += x[i] * y[i]
    return acc


@numba.njit(parallel=True, **_JIT)
def epilogue_fwd(y, u, z, D, group, eps, use_d, use_z, out, rstd):
    """``out = (norm(y) + D u) silu(z)`` row by row (rows: ``(tokens, channels)``), where ``norm`` is the
    weightless RMS norm over consecutive groups of ``group`` channels (none when 0); ``rstd: (tokens,
    groups)`` keeps the groups' 1 / rms for the backward. ``use_d`` / ``use_z``: whether ``D`` / ``z`` are
    given (otherwise ignored). Each loop touches few arrays, so LLVM vectorises it without alias checks
    that fail over."""
    rows, channels = y.shape
    width = group if group > 0 else channels
    groups = channels // width
    for row in numba.prange(rows):
        yr, ur, zr, h = y[row], u[row], z[row], out[row]
        for k in range(groups):
            e0, e1 = k * width, (k + 1) * width
            r = yr[e0] * 0 + 1
            if group > 0:
                r = 1 / math.sqrt(_sum_squares(yr, e0, e1) / width + eps)
                rstd[row, k] = r
            for i in range(e0, e1):
                h[i] = yr[i] * r
        if use_d:
            for i in range(channels):
                h[i] += D[i] * ur[i]
        if use_z:
            for i in range(channels):
                zi = zr[i]
                h[i] = h[i] * zi * _sigmoid(zi)


@numba.njit(parallel=True, **_JIT)
def epilogue_bwd(dout, y, u, z, D, rstd, group, use_d, use_z, dy, du, dz, dD_part):
    """Gradients of ``epilogue_fwd``: ``dy``, ``du`` (the ``D u`` term only), ``dz`` in full, ``dD_part:
    (parts, channels)`` partial sums over ``ROWS_PER_PART`` rows each (sum over dim 0 for ``dD``).
    Gate: ``dz = dout sig(z) h (1 + z (1 - sig(z)))``, ``dh = dout z sig(z)``; RMS norm:
    ``dy = r (dh - y_hat mean(dh y_hat))`` per group, ``y_hat = r y``."""
    rows, channels = y.shape
    width = group if group > 0 else channels
    groups = channels // width
    parts = dD_part.shape[0]
    for part in numba.prange(parts):
        dd = dD_part[part]
        for i in range(channels):
            dd[i] = 0
        dh = np.empty(channels, dtype=y.dtype)
        h = np.empty(channels, dtype=y.dtype)
        for row in range(part * ROWS_PER_PART, min(rows, (part + 1) * ROWS_PER_PART)):
            yr, ur, zr, dor = y[row], u[row], z[row], dout[row]
            if use_z:
                for k in range(groups):  # the pre-gate value again
                    r = rstd[row, k] if group > 0 else yr[0] * 0 + 1
                    for i in range(k * width, (k + 1) * width):
                        h[i] = yr[i] * r
                if use_d:
                    for i in range(channels):
                        h[i] += D[i] * ur[i]
                dzr = dz[row]
                for i in range(channels):
                    zi = zr[i]
                    sig = _sigmoid(zi)
                    g = dor[i] * sig
                    dzr[i] = g * h[i] * (1 + zi * (1 - sig))
                    dh[i] = g * zi
            else:
                for i in range(channels):
                    dh[i] = dor[i]
            if use_d:
                dur = du[row]
                for i in range(channels):
                    dd[i] += dh[i] * ur[i]
                    dur[i] = dh[i] * D[i]
            dyr = dy[row]
            if group > 0:
                for k in range(groups):
                    e0, e1 = k * width, (k + 1) * width
                    r = rstd[row, k]
                    mean = _sum_products(dh, yr, e0, e1) * r * r / width
                    for i in range(e0, e1):
                        dyr[i] = r * (dh[i] - yr[i] * mean)
            else:
                for i in range(channels):
                    dyr[i] = dh[i]
