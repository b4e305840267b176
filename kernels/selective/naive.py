"""The selective bandpass scan, written as the recurrence it is: one token at a time.

Only tests and benchmarks use this; it is the definition the fast forms are checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rotary import published_rotary


def group_rms_norm(y: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Weightless RMS norm over consecutive groups of channels, computed in at least float32."""
    compute = torch.promote_types(y.dtype, torch.float32)
    grouped = y.to(compute).unflatten(-1, (-1, group_size))
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return normed.flatten(-2).to(y.dtype)


def mamba_epilogue(
    y: torch.Tensor,
    u: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """What the released mixer does after the scan: group RMS norm, ``+ D * u``, ``* silu(z)``."""
    if group_size:
        y = group_rms_norm(y, group_size)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_naive(
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
) -> torch.Tensor:
    """``s_t = exp(delta_t A) s_{t-1} + delta_t B'_t u_t``, ``y_t = C'_t . s_t``, then the epilogue.

    Shapes: ``u, delta, z: (batch, length, channels)``, ``A: (channels, state)``,
    ``B, C: (batch, length, state)``, ``freq: (state,)``, ``D: (channels,)``.
    """
    if freq is not None:
        B = published_rotary(B, freq, rope_scale)
        C = published_rotary(C, freq, rope_scale)
    batch, length, channels = u.shape
    state = u.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)
        state = decay * state + (delta[:, t, :, None] * u[:, t, :, None]) * B[:, t, None, :]
        outputs.append((state * C[:, t, None, :]).sum(-1))
    y = torch.stack(outputs, dim=1)
    return mamba_epilogue(y, u, D, z, group_size)
