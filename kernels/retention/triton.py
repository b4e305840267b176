"""The retention bandpass scan on Triton: ``torch.library`` custom ops (``defocus::retention_scan_triton_fwd``
and ``_bwd``) around ``triton_kernels.py``.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the Triton interpreter; slow, for tests). Nothing but the inputs is kept for backward.
fp32 inputs multiply in full fp32 (``input_precision="ieee"``, matching the reference); bf16/fp16
inputs multiply on tensor cores in their own dtype with fp32 accumulation and an fp32 state.
``log_decay`` and ``theta`` are handed to the kernels in fp32; positions, angles and decay exponents are
computed in fp32 inside them.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ..launch import KernelLaunch, LaunchWork
from ..selective.triton import check_triton_device, device_guard
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
        if q.dtype == torch.float32:
            # full-fp32 products run on the FMA units with their operands in registers: a smaller value
            # block keeps the backward's tiles within the A100's shared memory
            self.block_v = min(self.block_v, 32)
        self.num_v = -(-dv // self.block_v)
        self.num_chunks = -(-length // self.block_t)
        self.dot_dtype = _DOT_DTYPES[q.dtype]
        if q.dtype == torch.float32:
            self.precision = "ieee"
        else:  # tensor cores; the interpreter (CPU) cannot multiply 16-bit floats (see _mm)
            # (meta tensors: the kernel report, compiling for a GPU)
            self.precision = "emulate" if q.device.type == "cpu" else "tf32"
        self.num_warps = 4 if self.block_p * self.block_v <= 64 * 64 else 8

    def meta(self, has_theta: bool) -> dict:
        return dict(
            HAS_THETA=has_theta, BLOCK_T=self.block_t, BLOCK_P=self.block_p, BLOCK_V=self.block_v,
            DOT_DTYPE=self.dot_dtype, PRECISION=self.precision, num_warps=self.num_warps,
        )  # fmt: skip


def forward_launch(
    q, k, v, log_decay, theta, chunk_size: int, block_v: int
) -> tuple[KernelLaunch, torch.Tensor]:
    """The forward kernel's launch for these contiguous inputs and the output it writes; also what
    ``benchmarks/kernel_report.py`` compiles."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    tiling = _Tiling(length, dk, dv, chunk_size, block_v, q)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    meta = tiling.meta(theta is not None)
    num_warps = meta.pop("num_warps")
    io = sum(t.numel() * t.element_size() for t in (q, k, v, out))
    launch = KernelLaunch(
        _retention_fwd_kernel, (batch * heads, tiling.num_v),
        dict(q_ptr=q, k_ptr=k, v_ptr=v, log_decay_ptr=log_decay,
             theta_ptr=theta if theta is not None else log_decay, o_ptr=out,
             length=length, heads=heads, dk=dk, dv=dv, num_chunks=tiling.num_chunks),
        meta, num_warps=num_warps,
        # q and k are read once per value block
        work=LaunchWork(token_steps=tiling.num_chunks, exp=0, bytes_min=io,
                        bytes_moved=io + (tiling.num_v - 1) * (q.numel() + k.numel()) * q.element_size()),
        notes={"tokens_per_iteration": tiling.block_t},
    )  # fmt: skip
    return launch, out


def backward_launch(dout, q, k, v, log_decay, theta, chunk_size: int, block_v: int):
    """The backward kernel's launch and the tensors it writes (gradients or per-value-block shares)."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    # Chunks of at most 32 tokens and 8 warps: the backward holds two states and twice the forward's
    # tiles; at 64 tokens and 4 warps it spilled 1.5 KB a thread (bf16, sm_90; fp32 3 KB) in the report.
    # The chunk size is a tiling choice only: the result is the same.
    tiling = _Tiling(length, dk, dv, min(chunk_size, 32), block_v, q)
    tiling.num_warps = 8
    f32 = dict(dtype=torch.float32, device=q.device)
    if tiling.num_v == 1:  # the kernel writes the final gradients directly
        dq, dk_ = torch.empty_like(q), torch.empty_like(k)
    else:  # one fp32 share per value block, summed by the caller
        dq = torch.empty(tiling.num_v, *q.shape, **f32)
        dk_ = torch.empty(tiling.num_v, *k.shape, **f32)
    dtheta = torch.empty(tiling.num_v, batch, heads, dk // 2, **f32) if theta is not None else None
    grads = dict(dq=dq, dk=dk_, dv=torch.empty_like(v),
                 dlog_decay=torch.empty(tiling.num_v, batch, heads, **f32), dtheta=dtheta)  # fmt: skip
    meta = tiling.meta(theta is not None)
    num_warps = meta.pop("num_warps")
    io = sum(t.numel() * t.element_size() for t in (dout, q, k, v, dq, dk_, grads["dv"]))
    launch = KernelLaunch(
        _retention_bwd_kernel, (batch * heads, tiling.num_v),
        dict(q_ptr=q, k_ptr=k, v_ptr=v, log_decay_ptr=log_decay,
             theta_ptr=theta if theta is not None else log_decay, do_ptr=dout, dq_ptr=dq, dk_ptr=dk_,
             dv_ptr=grads["dv"], dlog_decay_ptr=grads["dlog_decay"],
             dtheta_ptr=dtheta if dtheta is not None else grads["dlog_decay"],
             batch=batch, length=length, heads=heads, dk=dk, dv=dv, num_chunks=tiling.num_chunks),
        meta, num_warps=num_warps,
        # two passes over the chunks (forward for dq, reverse for dk and dv): the inputs are read twice
        work=LaunchWork(token_steps=tiling.num_chunks, exp=0, bytes_min=io, bytes_moved=2 * io),
        notes={"tokens_per_iteration": tiling.block_t},
    )  # fmt: skip
    return launch, grads


# --- torch.library custom ops (``custom_op`` rather than ``triton_op``: see ``selective/triton.py``) ------
# The forward keeps nothing but its inputs; the backward is a second op. ``log_decay`` and ``theta``
# arrive in fp32; ``dtheta`` is an empty tensor without ``theta``.


@torch.library.custom_op("defocus::retention_scan_triton_fwd", mutates_args=())
def retention_scan_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    chunk_size: int,
    block_v: int,
) -> torch.Tensor:
    """``(batch, length, heads, dv)`` in ``v``'s dtype from contiguous inputs."""
    launch, out = forward_launch(q, k, v, log_decay, theta, chunk_size, block_v)
    with device_guard(q):
        launch.run()
    return out


@retention_scan_triton_fwd.register_fake
def _(q, k, v, log_decay, theta, chunk_size, block_v):
    return v.new_empty(v.shape)


@torch.library.custom_op("defocus::retention_scan_triton_bwd", mutates_args=())
def retention_scan_triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    chunk_size: int,
    block_v: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dlog_decay, dtheta)``, each in its input's dtype (``dtheta`` empty without theta)."""
    launch, grads = backward_launch(dout.contiguous(), q, k, v, log_decay, theta, chunk_size, block_v)
    with device_guard(q):
        launch.run()
    dq, dk_, dtheta = grads["dq"], grads["dk"], grads["dtheta"]
    if dq.dim() == 5:  # one fp32 share per value block
        dq, dk_ = dq.sum(0).to(q.dtype), dk_.sum(0).to(k.dtype)
    grad_theta = dtheta.sum((0, 1)).to(theta.dtype) if theta is not None else q.new_empty(0)
    return dq, dk_, grads["dv"], grads["dlog_decay"].sum((0, 1)).to(log_decay.dtype), grad_theta


@retention_scan_triton_bwd.register_fake
def _(dout, q, k, v, log_decay, theta, chunk_size, block_v):
    grad_theta = theta.new_empty(theta.shape) if theta is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), \
        log_decay.new_empty(log_decay.shape), grad_theta  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_decay, theta, chunk_size, block_v = inputs
    ctx.save_for_backward(q, k, v, log_decay, theta)
    ctx.config = (chunk_size, block_v)
    ctx.has_theta = theta is not None


def _backward(ctx, dout):
    q, k, v, log_decay, theta = ctx.saved_tensors
    dq, dk, dv, dlog_decay, dtheta = retention_scan_triton_bwd(dout, q, k, v, log_decay, theta, *ctx.config)
    return dq, dk, dv, dlog_decay, dtheta if ctx.has_theta else None, None, None


retention_scan_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    # the decay and the angles enter the kernels in fp32 whatever their dtype; converted here, outside the
    # op, so autograd hands their gradients back in the caller's dtype
    q, k, v, log_decay = (t.contiguous() for t in (q, k, v, log_decay.float()))
    theta = theta.float().contiguous() if theta is not None else None
    return retention_scan_triton_fwd(q, k, v, log_decay, theta, _next_power_of_2(chunk_size), block_v)
