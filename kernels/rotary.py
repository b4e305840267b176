"""Rotary phases shared by the bandpass operators.

Two forms exist and both are needed:

* ``rotate_pairs`` is the exact rotation used by De-focus RetNet and De-focus ViT: neighbouring
  dimensions ``(2j, 2j+1)`` form the complex number ``x[2j] + i x[2j+1]`` which is multiplied by
  ``exp(i * angle[j])``.
* ``published_rotary`` is the rotary of the released De-focus Mamba code, applied to ``B`` and ``C``.
  It keeps the release's quirk: every dimension uses its own angle ``t * freq[n]``, even inside a
  pair, so it is only a true rotation when ``freq[2j] == freq[2j+1]``. Checkpoints were trained
  with it, so we reproduce it exactly.
"""

from __future__ import annotations

import torch


def token_positions(length: int, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Positions ``0..length-1`` (divided by ``scale``) in ``like``'s float dtype and device."""
    positions = torch.arange(length, device=like.device, dtype=like.dtype)
    return positions / scale if scale != 1.0 else positions


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]`` over the last dimension."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def published_rotary(v: torch.Tensor, freq: torch.Tensor, rope_scale: float = 1.0) -> torch.Tensor:
    """Released De-focus Mamba rotary on ``v: (batch, length, state)`` with ``freq: (state,)``.

    ``out = v * cos(t f) + swap_pairs(v) * sin(t f)`` with ``t = position / rope_scale`` and a
    separate angle for every state dimension (the release's quirk, kept on purpose).
    """
    angles = token_positions(v.shape[1], v, rope_scale)[:, None] * freq.to(v.dtype)
    return v * torch.cos(angles) + swap_pairs(v) * torch.sin(angles)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Exact rotation of neighbouring pairs of ``x: (..., d)`` by ``angles: (..., d // 2)``."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def rotate_by_position(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """RoPE with learnable frequencies: ``x: (batch, length, heads, d)``, ``theta: (heads, d // 2)``.

    Token ``t`` is rotated by ``t * theta``, so the product of a rotated query at ``t`` and a rotated
    key at ``s`` carries the phase ``(t - s) * theta``.
    """
    positions = token_positions(x.shape[1], x)
    angles = positions[:, None, None] * theta.to(x.dtype)[None]
    return rotate_pairs(x, angles)
