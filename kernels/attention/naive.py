"""De-focus causal softmax attention as one explicit masked score matrix (tests only)."""

from __future__ import annotations

import math

import torch

from ..rotary import rotate_by_position


def defocus_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_hat: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    causal: bool = True,
    decay_mode: str = "multiplicative",
) -> torch.Tensor:
    """``q, k, v: (batch, length, heads, d)``; ``lambda_hat: (heads,)`` with ``lambda = -exp(lambda_hat)``;
    ``theta: (heads, d // 2)``.

    ``multiplicative`` (the paper's equation): ``score_ts = (q~_t . k~_s / sqrt(d)) * exp(lambda (t - s))``.
    ``additive`` (ALiBi-like ablation): ``score_ts = q~_t . k~_s / sqrt(d) + lambda (t - s)``.
    ``q~, k~`` carry the learnable rotary phase. Future keys are masked when ``causal``.
    """
    if theta is not None:
        q, k = rotate_by_position(q, theta), rotate_by_position(k, theta)
    length, dim = q.shape[1], q.shape[-1]
    compute = torch.promote_types(q.dtype, torch.float32)  # scores, distances, decays: at least fp32
    scores = torch.einsum("bthd,bshd->bhts", q.to(compute), k.to(compute)) / math.sqrt(dim)
    positions = torch.arange(length, device=q.device)
    distance = (positions[:, None] - positions[None, :]).to(compute)
    if lambda_hat is not None:
        lam = -torch.exp(lambda_hat.to(compute))[:, None, None]
        # only past keys (distance >= 0) are decayed; future ones are masked or left alone
        decay_exponent = lam * distance.clamp(min=0)
        if decay_mode == "multiplicative":
            scores = scores * torch.exp(decay_exponent)
        elif decay_mode == "additive":
            scores = scores + decay_exponent
        else:
            raise ValueError(f"decay_mode must be 'multiplicative' or 'additive', got {decay_mode!r}")
    if causal:
        scores = scores.masked_fill(distance < 0, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.to(compute)).to(v.dtype)
