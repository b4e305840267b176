"""The numba CPU scan (``kernels/selective/cpu.py``) beyond equality with the naive recurrence (that is
in ``test_ops.py`` / ``test_ops_bf16.py``): bitwise determinism across runs and thread counts, its fp32
``exp`` and decay, the fused epilogue's ops, and the kernels run as plain Python (what
``NUMBA_DISABLE_JIT=1`` debugging executes)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from defocus_scale.kernels.selective import cpu_epilogue_kernels, cpu_kernels
from defocus_scale.kernels.selective.cpu import (
    mamba_epilogue_cpu_fwd,
    selective_scan_cpu_bwd,
    selective_scan_cpu_fwd,
)
from defocus_scale.kernels.selective.naive import mamba_epilogue, selective_scan_naive


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
        y, bounds = selective_scan_cpu_fwd(*args)
        return [y, bounds, *selective_scan_cpu_bwd(dy, *args, bounds)]
    finally:
        torch.set_num_threads(previous)


def test_bitwise_deterministic_across_runs_and_threads():
    """Every (batch, tile) is owned by one thread and the partial sums are reduced in a fixed order,
    so the output and every gradient are bitwise equal whatever the run or thread count."""
    args = _inputs(3, 41, 133, 4)  # 3 chunks of tokens, 3 tiles of channels (the last one partial)
    dy = torch.randn(3, 41, 133, generator=torch.Generator().manual_seed(1))
    first = _run(args, dy, threads=numba.config.NUMBA_NUM_THREADS)
    again = _run(args, dy, threads=numba.config.NUMBA_NUM_THREADS)
    single = _run(args, dy, threads=1)
    for a, b, c in zip(first, again, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def _assert_fp32_close_to_float64_naive(batch, length, channels, state, seed):
    """fp32 kernels (polynomial exp) vs the float64 definition on the same values: output and every
    gradient within 2e-5 of the largest reference value."""
    args = _inputs(batch, length, channels, state, seed=seed)
    dy = torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(seed + 1))
    got = _run(args, dy, threads=torch.get_num_threads())
    got.pop(1)  # the chunk bounds
    high = [t.double().requires_grad_() for t in args]
    ref = selective_scan_naive(*high)
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), high)
    for name, g, r in zip(["y", "u", "delta", "A", "B", "C"], got, [ref, *ref_grads], strict=True):
        error = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert error < 2e-5, (name, error)


def test_fp32_scan_close_to_float64_naive_at_length_197():
    _assert_fp32_close_to_float64_naive(2, 197, 40, 16, seed=1)


def test_fp32_scan_at_the_widest_tile():
    """Shapes that take ``MAX_TILE``-channel tasks (the base models' case), the last tile partial."""
    batch, channels = 8, cpu_kernels.MAX_TILE + 44
    assert cpu_kernels.tile_width(batch, channels) == cpu_kernels.MAX_TILE
    _assert_fp32_close_to_float64_naive(batch, 37, channels, 4, seed=3)


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


def test_fp32_decay_polynomial():
    """The scan's fp32 decay ``exp(dt a)`` as ``2^(dt a log2 e)``: relative error within 3e-7 (the
    polynomial) plus 2 |dt a| 2^-24 (the roundings of ``a log2 e`` and of the product, as rounding ``dt a``
    costs the reference half of that) of the float64 ``exp`` over the decays' range; exactly 1 at 0,
    tiny at the clamp."""

    @numba.njit(fastmath=cpu_kernels._FASTMATH)
    def apply(dt, a, out):
        for i in range(dt.shape[0]):
            out[i] = cpu_kernels._decay(dt[i], a[i], a[i] * np.float32(cpu_kernels.LOG2E))

    a = np.concatenate([-np.geomspace(1e-6, 87, 100_001).astype(np.float32), np.float32([0, -1e4])])
    dt = np.ones_like(a)
    out = np.empty_like(a)
    apply(dt, a, out)
    want = np.exp(a[:-2].astype(np.float64))
    bound = 3e-7 + 2 * np.abs(a[:-2].astype(np.float64)) * 2.0**-24
    assert np.all(np.abs(out[:-2] - want) / want < bound)
    assert out[-2] == 1.0 and 0 <= out[-1] < 2e-37, out[-2:]


@pytest.mark.parametrize("length", [1, 5, 37])
def test_kernels_run_as_plain_python(length):
    """``py_func`` is the kernel's Python source run by the interpreter (``prange`` is ``range``, ``_exp``
    NumPy's), as under ``NUMBA_DISABLE_JIT=1``: same numbers as the compiled kernels."""
    u, delta, A, B, C = (t.numpy() for t in _inputs(2, length, 19, 3))
    AT = np.ascontiguousarray(A.T)
    y_jit, y_py = np.empty_like(u), np.empty_like(u)
    bounds = np.empty((2, -(-length // cpu_kernels.CHUNK), 3, 19), np.float32)
    bounds_py = np.empty_like(bounds)
    tile = cpu_kernels.LANES  # 19 channels: two tiles, the second one partial (padded lanes)
    cpu_kernels.scan_fwd(u, delta, AT, B, C, y_jit, bounds, 2, tile)
    cpu_kernels.scan_fwd.py_func(u, delta, AT, B, C, y_py, bounds_py, 2, tile)
    np.testing.assert_allclose(y_py, y_jit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bounds_py, bounds, rtol=1e-5, atol=1e-6)
    tiles = -(-19 // tile)

    def grads(kernel):
        out = [np.empty_like(u), np.empty_like(u), np.empty((2, 3, 19), np.float32),
               np.empty((tiles, 2, length, 3), np.float32), np.empty((tiles, 2, length, 3), np.float32)]
        kernel(y_jit, u, delta, AT, B, C, bounds, *out, 2, tile)
        return out

    for got, want in zip(grads(cpu_kernels.scan_bwd.py_func), grads(cpu_kernels.scan_bwd), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _epilogue_inputs(rows: int, channels: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y, u, z = (torch.randn(2, rows, channels, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    return y, u, torch.randn(channels, generator=g, dtype=torch.float64).to(dtype), z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size, use_d, use_z", [(16, True, True), (0, True, True), (8, False, True),
                                                       (16, True, False), (0, False, False)])  # fmt: skip
def test_fused_epilogue_matches_pytorch(dtype, group_size, use_d, use_z):
    """The numba epilogue (norm, ``+ D u``, ``* silu(z)``) and its gradients vs ``mamba_epilogue`` in
    autograd, with every term present or left out, over 197 rows (more than one grad-D partial)."""
    y, u, D, z = _epilogue_inputs(197, 48, dtype)
    D, z = (D if use_d else None), (z if use_z else None)
    inputs = [t.requires_grad_() for t in (y, u, D, z) if t is not None]
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    got = mamba_epilogue_cpu_fwd(y, u, D, z, group_size)[0]
    want = mamba_epilogue(y, u, D, z, group_size)
    got_grads = torch.autograd.grad((got * weight).sum(), inputs, materialize_grads=True)
    want_grads = torch.autograd.grad((want * weight).sum(), inputs, materialize_grads=True)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * 10)


def test_fused_epilogue_deterministic_across_threads_and_as_python():
    """Bitwise equal at any thread count (grad D summed in fixed partials); ``py_func`` gives the same
    numbers as the compiled kernels."""
    y, u, D, z = _epilogue_inputs(150, 32)
    dout = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))

    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            inputs = [t.clone().requires_grad_() for t in (y, u, D, z)]
            out = mamba_epilogue_cpu_fwd(*inputs[:3], inputs[3], 16)[0]
            return [out, *torch.autograd.grad(out, inputs, dout)]
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(run(numba.config.NUMBA_NUM_THREADS), run(1), strict=True):
        assert torch.equal(a, b)
    rows = [t.reshape(-1, 32).numpy() for t in (y, u, z)]
    out_jit, out_py = np.empty_like(rows[0]), np.empty_like(rows[0])
    rstd_jit, rstd_py = (np.empty((rows[0].shape[0], 2), np.float32) for _ in range(2))
    cpu_epilogue_kernels.epilogue_fwd(*rows[:2], rows[2], D.numpy(), 16, 1e-6, True, True, out_jit, rstd_jit)
    cpu_epilogue_kernels.epilogue_fwd.py_func(*rows[:2], rows[2], D.numpy(), 16, 1e-6, True, True, out_py,
                                              rstd_py)  # fmt: skip
    np.testing.assert_allclose(out_py, out_jit, rtol=1e-5, atol=1e-6)
    parts = -(-rows[0].shape[0] // cpu_epilogue_kernels.ROWS_PER_PART)

    def grads(kernel):
        out = [np.empty_like(rows[0]) for _ in range(3)] + [np.empty((parts, 32), np.float32)]
        dout_rows = dout.reshape(-1, 32).numpy()
        kernel(dout_rows, rows[0], rows[1], rows[2], D.numpy(), rstd_jit, 16, True, True, *out)
        return out

    for got, want in zip(grads(cpu_epilogue_kernels.epilogue_bwd.py_func),
                         grads(cpu_epilogue_kernels.epilogue_bwd), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "batch, channels, tile",
    [(8, 1536, 256), (1, 1536, 128), (1, 768, 64), (2, 128, 32), (4, 40, 16), (1, 19, 16), (64, 19, 32)],
)
def test_tile_width_from_shapes(batch, channels, tile):
    """Whole vectors of channels, at most MAX_TILE, narrower only to give the cores MIN_TASKS tasks."""
    assert cpu_kernels.tile_width(batch, channels) == tile
    assert tile % cpu_kernels.LANES == 0 and tile <= cpu_kernels.MAX_TILE


def test_first_scan_leaves_torch_thread_count_alone():
    """numba's first OpenMP launch resets the (shared) OpenMP thread count to all cores; the CPU ops put
    torch's count back, so a process limited to one thread (a Ray worker, ``OMP_NUM_THREADS=1``) stays so
    and ``torch.compile``'s guard on it holds."""
    import os
    import subprocess
    import sys

    probe = (
        "import torch\n"
        "from defocus_scale.kernels import selective_scan\n"
        "u, bc = torch.randn(2, 9, 32), torch.randn(2, 9, 4)\n"
        "selective_scan(u, u.abs(), -torch.rand(32, 4), bc, bc, backend='cpu')\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
