"""Rotary phases shared by the bandpass operators.

Two forms exist and both are needed:

* ``rotate_pairs`` is the exact rotation used by De-focus RetNet and De-focus ViT: neighbouring
  dimensions ``(2j, 2j+1)`` form the complex number ``x[2j] + i x[2j+1]`` which is multiplied by
  ``exp(i * angle[j])``.
* ``published_rotary`` is the rotary of the released De-focus Mamba code, applied to ``B`` and ``C``.
  It keeps the release's quirk: every dimension uses its own angle ``t * freq[n]``, even inside a
  pair, so it is only a true rotation when ``freq[2j] == freq[2j+1]``. Checkpoints were trained
  with it, so we reproduce it exactly.

Precision: positions, angles, their cos/sin and the rotation itself are computed in at least float32
(``rotary_dtype``), whatever the activations' dtype, and only the result is cast back to it. In bf16
``arange(577)`` has only 401 distinct values (spacing 4 above 512), so bf16 positions would put angle
errors of whole radians into long sequences.
"""

from __future__ import annotations

import torch


def rotary_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The precision rotary phases are computed in: the promotion of ``dtypes`` and float32."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def token_positions(length: int, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Positions ``0..length-1`` (divided by ``scale``) on ``like``'s device, in at least float32
    (``rotary_dtype(like.dtype)``: float64 for float64 ``like``, float32 for float32/bf16/fp16)."""
    positions = torch.arange(length, device=like.device, dtype=rotary_dtype(like.dtype))
    return positions / scale if scale != 1.0 else positions


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]`` over the last dimension."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def published_rotary(v: torch.Tensor, freq: torch.Tensor, rope_scale: float = 1.0) -> torch.Tensor:
    """Released De-focus Mamba rotary on ``v: (batch, length, state)`` with ``freq: (state,)``.

    ``out = v * cos(t f) + swap_pairs(v) * sin(t f)`` with ``t = position / rope_scale`` and a
    separate angle for every state dimension (the release's quirk, kept on purpose). Computed in
    ``rotary_dtype(v.dtype, freq.dtype)``; the result has ``v``'s dtype.
    """
    compute = rotary_dtype(v.dtype, freq.dtype)
    angles = token_positions(v.shape[1], v, rope_scale).to(compute)[:, None] * freq.to(compute)
    wide = v.to(compute)
    return (wide * torch.cos(angles) + swap_pairs(wide) * torch.sin(angles)).to(v.dtype)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Exact rotation of neighbouring pairs of ``x: (..., d)`` by ``angles: (..., d // 2)``.

    Computed in ``rotary_dtype(x.dtype, angles.dtype)``; the result has ``x``'s dtype. Callers should
    build ``angles`` in at least float32 (as ``rotate_by_position`` does)."""
    compute = rotary_dtype(x.dtype, angles.dtype)
    angles = angles.to(compute)
    cos, sin = torch.cos(angles), torch.sin(angles)
    wide = x.to(compute)
    even, odd = wide[..., 0::2], wide[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)


def rotate_by_position(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """RoPE with learnable frequencies: ``x: (batch, length, heads, d)``, ``theta: (heads, d // 2)``.

    Token ``t`` is rotated by ``t * theta``, so the product of a rotated query at ``t`` and a rotated
    key at ``s`` carries the phase ``(t - s) * theta``. Positions, angles and the rotation are computed
    in ``rotary_dtype(x.dtype, theta.dtype)``; the result has ``x``'s dtype.
    """
    compute = rotary_dtype(x.dtype, theta.dtype)
    positions = token_positions(x.shape[1], x).to(compute)
    angles = positions[:, None, None] * theta.to(compute)[None]
    return rotate_pairs(x, angles)
