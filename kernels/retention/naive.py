"""The retention bandpass scan as a token-by-token recurrence with a complex state.

Each head keeps ``S_t = gamma S_{t-1} + conj(k~_s)^T v_s`` over complex rotated keys and reads
``o_t = Re(q~_t S_t)``; unrolled this is
``o_t = sum_{s<=t} gamma^(t-s) Re[(q_t e^{i t theta}) conj(k_s e^{i s theta})] v_s``.
Only tests and benchmarks use this.
"""

from __future__ import annotations

import torch


def as_complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """Pairs of neighbouring dimensions ``x[2j] + i x[2j+1]`` as complex numbers."""
    return torch.complex(x[..., 0::2], x[..., 1::2])


def retention_scan_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
) -> torch.Tensor:
    """``q, k: (batch, length, heads, dk)``, ``v: (batch, length, heads, dv)``, ``log_decay: (heads,)``
    (the paper's RetNet keeps one decay per head), ``theta: (heads, dk // 2)`` or None
    -> ``(batch, length, heads, dv)``."""
    batch, length, heads, dk = q.shape
    decay = torch.exp(log_decay)
    qc, kc = as_complex_pairs(q), as_complex_pairs(k)
    if theta is None:
        theta = q.new_zeros(heads, dk // 2)
    state = torch.zeros(batch, heads, dk // 2, v.shape[-1], dtype=qc.dtype, device=q.device)
    outputs = []
    for t in range(length):
        phase = torch.polar(torch.ones_like(theta), theta * t)  # e^{i t theta}, (heads, dk/2)
        key = torch.conj(kc[:, t] * phase)  # (batch, heads, dk/2)
        state = decay[None, :, None, None] * state + key[..., None] * v[:, t, :, None, :]
        query = qc[:, t] * phase
        outputs.append(torch.einsum("bhp,bhpv->bhv", query, state).real)
    return torch.stack(outputs, dim=1)
