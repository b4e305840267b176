"""The numba CPU scan (``kernels/selective/cpu.py``) beyond equality with the naive recurrence (that is
in ``test_ops.py`` / ``test_ops_bf16.py``): bitwise determinism across runs and thread counts, its fp32
``exp``, and the kernels run as plain Python (what ``NUMBA_DISABLE_JIT=1`` debugging executes)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from defocus_scale.kernels.selective import cpu_kernels
from defocus_scale.kernels.selective.cpu import selective_scan_cpu_bwd, selective_scan_cpu_fwd
from defocus_scale.kernels.selective.naive import selective_scan_naive


def _inputs(batch, length, channels, state, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g)
    delta = torch.rand(batch, length, channels, generator=g) * 0.5 + 0.01
    A = -torch.rand(channels, state, generator=g) * 3 - 0.1
    B = torch.randn(batch, length, state, generator=g)
    C = torch.randn(batch, length, state, generator=g)
    return [t.to(dtype) for t in (u, delta, A, B, C)]


def _run(args, dy, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the CPU scan follows torch's thread count
    try:
        return [selective_scan_cpu_fwd(*args), *selective_scan_cpu_bwd(dy, *args)]
    finally:
        torch.set_num_threads(previous)


def test_bitwise_deterministic_across_runs_and_threads():
    """Every (batch, tile) is owned by one thread and the partial sums are reduced in a fixed order,
    so the output and every gradient are bitwise equal whatever the run or thread count."""
    args = _inputs(3, 29, 53, 4)
    dy = torch.randn(3, 29, 53, generator=torch.Generator().manual_seed(1))
    first = _run(args, dy, threads=numba.config.NUMBA_NUM_THREADS)
    again = _run(args, dy, threads=numba.config.NUMBA_NUM_THREADS)
    single = _run(args, dy, threads=1)
    for a, b, c in zip(first, again, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_fp32_scan_close_to_float64_naive_at_length_197():
    """fp32 kernels (polynomial exp) vs the float64 definition on the same values."""
    args = _inputs(2, 197, 40, 16)
    dy = torch.randn(2, 197, 40, generator=torch.Generator().manual_seed(2))
    got = _run(args, dy, threads=torch.get_num_threads())
    high = [t.double().requires_grad_() for t in args]
    ref = selective_scan_naive(*high)
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), high)
    for name, g, r in zip(["y", "u", "delta", "A", "B", "C"], got, [ref, *ref_grads], strict=True):
        error = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert error < 2e-5, (name, error)


def test_fp32_exp_polynomial():
    """The compiled fp32 ``exp`` (no SVML in llvmlite, so a vectorisable polynomial): within 4e-7
    relative over the decays' range, exactly 1 at 0, and no overflow or NaN at the clamps."""

    @numba.njit(fastmath=cpu_kernels._FASTMATH)
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = cpu_kernels._exp(x[i])

    x = np.concatenate([np.linspace(-87, 10, 100_001, dtype=np.float32), np.float32([0, -1e4, 1e4])])
    out = np.empty_like(x)
    apply(x, out)
    want = np.exp(x[:-3].astype(np.float64))
    assert np.max(np.abs(out[:-3] - want) / want) < 4e-7
    assert out[-3] == 1.0 and 0 <= out[-2] < 2e-38 and np.isfinite(out[-1])


@pytest.mark.parametrize("length", [1, 5])
def test_kernels_run_as_plain_python(length):
    """``py_func`` is the kernel's Python source run by the interpreter (``prange`` is ``range``, ``_exp``
    NumPy's), as under ``NUMBA_DISABLE_JIT=1``: same numbers as the compiled kernels."""
    u, delta, A, B, C = (t.numpy() for t in _inputs(2, length, 19, 3))
    AT = np.ascontiguousarray(A.T)
    y_jit, y_py = np.empty_like(u), np.empty_like(u)
    cpu_kernels.scan_fwd(u, delta, AT, B, C, y_jit, 2)
    cpu_kernels.scan_fwd.py_func(u, delta, AT, B, C, y_py, 2)
    np.testing.assert_allclose(y_py, y_jit, rtol=1e-5, atol=1e-6)
    tiles = -(-19 // cpu_kernels.TILE)

    def grads(kernel):
        out = [np.empty_like(u), np.empty_like(u), np.empty((2, 3, 19), np.float32),
               np.empty((tiles, 2, length, 3), np.float32), np.empty((tiles, 2, length, 3), np.float32)]
        kernel(y_jit, u, delta, AT, B, C, *out, 2)
        return out

    for got, want in zip(grads(cpu_kernels.scan_bwd.py_func), grads(cpu_kernels.scan_bwd), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
