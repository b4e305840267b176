"""Public bandpass operators: one function each, the implementation picked by ``backend``.

Backends:

* ``"auto"`` - Triton for CUDA tensors (FlexAttention for attention); on CPU the numba-compiled
  selective scan (``"cpu"``; the PyTorch form where numba is missing) and the fast PyTorch forms of the
  other operators;
* ``"torch"`` - the fast PyTorch forms (any device; the selective scan's is its readable reference);
* ``"cpu"`` - selective scan only: the numba-compiled scan (``selective/cpu.py``, CPU tensors);
* ``"triton"`` - the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
* ``"naive"`` - the token-by-token / explicit-matrix definitions (tests and benchmarks);
* attention only: ``"flex"`` (FlexAttention) and ``"sdpa"`` (SDPA / explicit score matrix).

Kernels know nothing of models: these take tensors and return tensors.

Precision: bf16 training hands these bf16 activations (``u, B, C, z``; ``q, k, v``) and fp32 scalars
(``delta, A, freq, D``; ``log_decay, theta``; ``lambda_hat, theta``). Positions, rotary angles and decay
exponents are computed in at least float32 on every path; outputs have the activations' dtype and every
gradient its input's dtype.

``torch.compile``: the token loops run inside ``torch.library`` custom ops (``defocus::selective_scan_fwd``
/ ``_bwd`` for the PyTorch scan, ``defocus::selective_scan_triton_fwd`` / ``_bwd`` and
``defocus::retention_scan_triton_fwd`` / ``_bwd`` for the kernels), so each operator traces into one
graph without breaks; the retention matrix form and the attention forms are plain traceable ATen code.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

SCAN_BACKENDS = ("auto", "torch", "cpu", "triton", "naive")
ATTENTION_BACKENDS = ("auto", "torch", "sdpa", "flex", "naive")


def _triton_usable(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _resolve_scan_backend(backend: str, x: torch.Tensor, cpu_scan: bool = False) -> str:
    """``cpu_scan``: the operator has a ``"cpu"`` backend (the selective scan), which ``"auto"`` picks
    for CPU tensors; the retention scan has none, so ``"cpu"`` is refused there."""
    if backend not in SCAN_BACKENDS or (backend == "cpu" and not cpu_scan):
        allowed = SCAN_BACKENDS if cpu_scan else tuple(b for b in SCAN_BACKENDS if b != "cpu")
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        if x.is_cuda:
            return "triton"
        return "cpu" if cpu_scan and x.device.type == "cpu" and _numba_installed() else "torch"
    if backend == "cpu" and not _numba_installed():
        raise ValueError("backend='cpu' needs numba (pip install numba)")
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {x.device}")
    if backend == "triton" and not _triton_usable(x):
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            "to run the kernels on CPU"
        )
    return backend


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The PyTorch forms accumulate in at least float32 (bf16 inputs give bf16 outputs)."""
    return torch.promote_types(x.dtype, torch.float32)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    freq: torch.Tensor | None = None,
    rope_scale: float = 1.0,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    group_size: int = 0,
    backend: str = "auto",
    state_every: int = 0,
) -> torch.Tensor:
    """Selective bandpass scan of De-focus Mamba, with the released mixer's epilogue fused on request.

    ``s_t = exp(delta_t A) s_{t-1} + delta_t B'_t u_t`` and ``y_t = C'_t . s_t`` per channel, where
    ``B'``, ``C'`` carry the released rotary (``published_rotary``, its quirk included). Then, when
    given: group RMS norm over ``group_size`` channels, ``+ D * u``, ``* silu(z)``.

    Shapes: ``u, delta, z: (batch, length, channels)``, ``A: (channels, state)``,
    ``B, C: (batch, length, state)``, ``freq: (state,)``, ``D: (channels,)`` -> ``(batch, length, channels)``.
    Differentiable in every tensor argument. ``state_every``: tokens between the states the Triton
    backend keeps for the backward (0: its default, 8; more keeps less memory and recomputes more); the
    other backends ignore it.
    """
    if state_every < 0:
        raise ValueError(f"state_every must be >= 0 (0: the backend's default), got {state_every}")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must be (batch, length, channels), got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    batch, length, channels = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (channels={channels}, state), got {tuple(A.shape)}")
    for name, value in (("B", B), ("C", C)):
        if value.shape != (batch, length, A.shape[1]):
            raise ValueError(f"{name} must be (batch, length, state={A.shape[1]}), got {tuple(value.shape)}")
    if group_size and channels % group_size:
        raise ValueError(f"group_size={group_size} must divide channels={channels}")
    chosen = _resolve_scan_backend(backend, u, cpu_scan=True)
    kwargs = dict(freq=freq, rope_scale=rope_scale, D=D, z=z, group_size=group_size)
    if chosen == "triton":
        from .selective.triton import selective_scan_triton

        if state_every:
            kwargs["chunk_size"] = state_every
        return selective_scan_triton(u, delta, A, B, C, **kwargs)
    if chosen == "naive":
        from .selective.naive import selective_scan_naive

        return selective_scan_naive(u, delta, A, B, C, **kwargs)
    dtype = _compute_dtype(u)
    up = [t.to(dtype) if t is not None else None for t in (u, delta, A, B, C, freq, D, z)]
    if chosen == "cpu":
        from .selective.cpu import selective_scan_cpu as scan
    else:
        from .selective.reference import selective_scan_torch as scan
    y = scan(*up[:5], freq=up[5], rope_scale=rope_scale, D=up[6], z=up[7], group_size=group_size)
    return y.to(u.dtype)


def retention_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    backend: str = "auto",
) -> torch.Tensor:
    """Retention bandpass scan of De-focus RetNet.

    ``o_t = sum_{s<=t} gamma^(t-s) Re[(q_t e^{i t theta}) conj(k_s e^{i s theta})] v_s`` per head with
    ``gamma = exp(log_decay)`` (one decay per head, as in RetNet and the paper; ``log_decay < 0``),
    rotary on neighbouring pairs ``x[2j] + i x[2j+1]``.

    Shapes: ``q, k: (batch, length, heads, dk)``, ``v: (batch, length, heads, dv)``,
    ``log_decay: (heads,)``, ``theta: (heads, dk // 2)`` or None -> ``(batch, length, heads, dv)``.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be (batch, length, heads, dk) and v (batch, length, heads, dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    heads, dk = q.shape[2], q.shape[3]
    if log_decay.shape != (heads,):
        raise ValueError(f"log_decay must be (heads={heads},), got {tuple(log_decay.shape)}")
    if dk % 2:
        raise ValueError(f"the rotary pairs dimensions: dk must be even, got {dk}")
    if theta is not None and theta.shape != (heads, dk // 2):
        raise ValueError(f"theta must be (heads={heads}, dk/2={dk // 2}), got {tuple(theta.shape)}")
    chosen = _resolve_scan_backend(backend, q)
    if chosen == "triton":
        from .retention.triton import retention_scan_triton

        return retention_scan_triton(q, k, v, log_decay, theta)
    if chosen == "naive":
        from .retention.naive import retention_scan_naive

        return retention_scan_naive(q, k, v, log_decay, theta)
    from .retention.reference import retention_scan_torch

    dtype = _compute_dtype(q)
    theta = theta.to(dtype) if theta is not None else None
    out = retention_scan_torch(q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype), theta)
    return out.to(v.dtype)


def defocus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_hat: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    causal: bool = True,
    decay_mode: str = "multiplicative",
    backend: str = "auto",
) -> torch.Tensor:
    """De-focus softmax attention: learnable rotary ``theta: (heads, d // 2)`` on q and k, and a learnable
    per-head decay ``lambda = -exp(lambda_hat)``, ``lambda_hat: (heads,)``, on the logit of query ``t``
    and key ``s <= t``: multiplied by ``exp(lambda (t - s))`` (the paper) or added as ``lambda (t - s)``.
    ``q, k, v: (batch, length, heads, d)`` -> ``(batch, length, heads, d)``. Without ``lambda_hat`` and
    ``theta`` this is plain (causal) attention.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "sdpa"
    if backend == "naive":
        from .attention.naive import defocus_attention_naive

        return defocus_attention_naive(q, k, v, lambda_hat, theta, causal, decay_mode)
    from .attention.fast import defocus_attention_flex, defocus_attention_sdpa

    if backend == "flex":
        return defocus_attention_flex(q, k, v, lambda_hat, theta, causal, decay_mode)
    return defocus_attention_sdpa(q, k, v, lambda_hat, theta, causal, decay_mode)
