"""The retention bandpass scan on Triton: an autograd ``Function`` around ``triton_kernels.py``.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the Triton interpreter; slow, for tests). Nothing but the inputs is kept for backward.
fp32 inputs multiply in full fp32 (``input_precision="ieee"``, matching the reference); bf16/fp16
inputs multiply on tensor cores in their own dtype with fp32 accumulation and an fp32 state.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ..selective.triton import check_triton_device
from .triton_kernels import _retention_bwd_kernel, _retention_fwd_kernel

_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Tiling:
    def __init__(self, length: int, dk: int, dv: int, chunk_size: int, block_v: int, q: torch.Tensor):
        # tl.dot needs every block dimension >= 16
        self.block_t = max(16, min(chunk_size, _next_power_of_2(length)))
        self.block_p = max(16, _next_power_of_2(dk // 2))
        self.block_v = max(16, min(block_v, _next_power_of_2(dv)))
        self.num_v = -(-dv // self.block_v)
        self.num_chunks = -(-length // self.block_t)
        self.dot_dtype = _DOT_DTYPES[q.dtype]
        if q.dtype == torch.float32:
            self.precision = "ieee"
        else:  # tensor cores; the interpreter (CPU) cannot multiply 16-bit floats (see _mm)
            self.precision = "tf32" if q.is_cuda else "emulate"
        self.num_warps = 4 if self.block_p * self.block_v <= 64 * 64 else 8

    def meta(self, has_theta: bool) -> dict:
        return dict(
            HAS_THETA=has_theta, BLOCK_T=self.block_t, BLOCK_P=self.block_p, BLOCK_V=self.block_v,
            DOT_DTYPE=self.dot_dtype, PRECISION=self.precision, num_warps=self.num_warps,
        )  # fmt: skip


class _RetentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, theta, chunk_size, block_v):  # type: ignore[override]
        batch, length, heads, dk = q.shape
        dv = v.shape[-1]
        tiling = _Tiling(length, dk, dv, chunk_size, block_v, q)
        out = torch.empty_like(v)
        _retention_fwd_kernel[(batch * heads, tiling.num_v)](
            q, k, v, log_decay, theta if theta is not None else log_decay, out,
            length, heads, dk, dv, tiling.num_chunks, **tiling.meta(theta is not None),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, log_decay, theta)
        ctx.tiling = tiling
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, log_decay, theta = ctx.saved_tensors
        tiling = ctx.tiling
        batch, length, heads, dk = q.shape
        dv = v.shape[-1]
        f32 = dict(dtype=torch.float32, device=q.device)
        if tiling.num_v == 1:  # the kernel writes the final gradients directly
            dq, dk_ = torch.empty_like(q), torch.empty_like(k)
        else:  # one fp32 share per value block, summed below
            dq = torch.empty(tiling.num_v, *q.shape, **f32)
            dk_ = torch.empty(tiling.num_v, *k.shape, **f32)
        dv_ = torch.empty_like(v)
        dlog_decay = torch.empty(tiling.num_v, batch, heads, **f32)
        dtheta = torch.empty(tiling.num_v, batch, heads, dk // 2, **f32) if theta is not None else None
        _retention_bwd_kernel[(batch * heads, tiling.num_v)](
            q, k, v, log_decay, theta if theta is not None else log_decay, dout.contiguous(),
            dq, dk_, dv_, dlog_decay, dtheta if dtheta is not None else dlog_decay,
            batch, length, heads, dk, dv, tiling.num_chunks, **tiling.meta(theta is not None),
        )  # fmt: skip
        if tiling.num_v > 1:
            dq, dk_ = dq.sum(0).to(q.dtype), dk_.sum(0).to(k.dtype)
        grad_theta = dtheta.sum((0, 1)).to(theta.dtype) if theta is not None else None
        return dq, dk_, dv_, dlog_decay.sum((0, 1)).to(log_decay.dtype), grad_theta, None, None


def retention_scan_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    *,
    chunk_size: int = 64,
    block_v: int = 64,
) -> torch.Tensor:
    """Same contract as ``retention_scan_naive``, on Triton; differentiable in q, k, v, log_decay, theta.

    ``q, k: (batch, length, heads, dk)``, ``v: (batch, length, heads, dv)``, ``log_decay: (heads,)``
    (``< 0``), ``theta: (heads, dk // 2)`` or None -> ``(batch, length, heads, dv)`` in ``v``'s dtype.
    ``chunk_size`` (tokens per chunk) and ``block_v`` (value dims per program) are rounded to powers
    of two, at least 16.
    """
    check_triton_device(dict(q=q, k=k, v=v, log_decay=log_decay, theta=theta))
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be (batch, length, heads, dk) and v (batch, length, heads, dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, length, heads, dk = q.shape
    if min(batch, length, heads, v.shape[-1]) < 1 or dk < 2 or dk % 2:
        raise ValueError(
            f"need non-empty inputs and an even dk >= 2, got q {tuple(q.shape)}, v {tuple(v.shape)}"
        )
    if log_decay.shape != (heads,):
        raise ValueError(f"log_decay must be (heads={heads},), got {tuple(log_decay.shape)}")
    if theta is not None and theta.shape != (heads, dk // 2):
        raise ValueError(f"theta must be (heads={heads}, dk/2={dk // 2}), got {tuple(theta.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if chunk_size < 1 or block_v < 1:
        raise ValueError(f"chunk_size and block_v must be >= 1, got {chunk_size}, {block_v}")
    q, k, v, log_decay = (t.contiguous() for t in (q, k, v, log_decay))
    theta = theta.contiguous() if theta is not None else None
    return _RetentionTriton.apply(q, k, v, log_decay, theta, _next_power_of_2(chunk_size), block_v)
