"""Fast forms of De-focus causal softmax attention.

The decay enters the score in one of two ways (``decay_mode``):

* ``multiplicative`` - the paper's equation: ``score_ts = (q~_t . k~_s / sqrt(d)) * exp(lambda (t-s))``
  with ``lambda = -exp(lambda_hat) < 0``. The factor is computed directly from the distance
  ``t - s >= 0`` (never as ``lambda^t * lambda^(-s)``, which overflows for long sequences), so it lies
  in (0, 1] at any length.
* ``additive`` - the per-head logit bias ``lambda (t - s)`` (ALiBi-like), the ablation the paper leaves
  open. On CPU it runs through ``scaled_dot_product_attention`` with a float mask, so PyTorch's fused
  attention kernels do the softmax.

``q~, k~`` carry the learnable rotary phase (``rotate_by_position``). On CUDA both modes are a
FlexAttention ``score_mod`` compiled into one fused kernel; FlexAttention has no CPU backward, so CPU
uses the SDPA form (additive) or one explicit score matrix (multiplicative).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..rotary import rotate_by_position

DECAY_MODES = ("multiplicative", "additive")


def _check_mode(decay_mode: str) -> None:
    if decay_mode not in DECAY_MODES:
        raise ValueError(f"decay_mode must be one of {DECAY_MODES}, got {decay_mode!r}")


def _distance(length: int, like: torch.Tensor) -> torch.Tensor:
    position = torch.arange(length, device=like.device)
    return (position[:, None] - position[None, :]).to(like.dtype)


def defocus_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_hat: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    causal: bool = True,
    decay_mode: str = "multiplicative",
) -> torch.Tensor:
    """``q, k, v: (batch, length, heads, d)`` -> ``(batch, length, heads, d)`` on any device."""
    _check_mode(decay_mode)
    if theta is not None:
        q, k = rotate_by_position(q, theta), rotate_by_position(k, theta)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (b, H, L, d)
    if lambda_hat is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2)
    length = q.shape[2]
    distance = _distance(length, q)
    decay_exponent = -torch.exp(lambda_hat.to(q.dtype))[:, None, None] * distance.clamp(min=0)  # (H, L, L)
    future = distance < 0
    if decay_mode == "additive":
        bias = decay_exponent.masked_fill(future, float("-inf")) if causal else decay_exponent
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return out.transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (torch.exp(decay_exponent) / math.sqrt(q.shape[-1]))
    if causal:
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).transpose(1, 2)


@functools.cache
def _compiled_flex_attention():  # compiled once per process; eager FlexAttention is a slow reference
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def defocus_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lambda_hat: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    causal: bool = True,
    decay_mode: str = "multiplicative",
    compile: bool = True,
) -> torch.Tensor:
    """FlexAttention form (CUDA; CPU forward only, for tests): the decay is a ``score_mod``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _check_mode(decay_mode)
    if theta is not None:
        q, k = rotate_by_position(q, theta), rotate_by_position(k, theta)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    length = q.shape[2]
    rate = torch.exp(lambda_hat.to(q.dtype)) if lambda_hat is not None else None
    multiplicative = decay_mode == "multiplicative"

    def score_mod(score, batch, head, q_index, kv_index):
        if rate is not None:
            distance = (q_index - kv_index).clamp(min=0).to(score.dtype)
            if multiplicative:
                score = score * torch.exp(-rate[head] * distance)
            else:
                score = score - rate[head] * distance
        if causal:
            score = torch.where(q_index >= kv_index, score, -float("inf"))
        return score

    block_mask = None
    if causal and q.is_cuda:  # lets the kernel skip fully masked blocks
        block_mask = create_block_mask(
            lambda b, h, q_index, kv_index: q_index >= kv_index, None, None, length, length, device=q.device
        )
    attend = _compiled_flex_attention() if compile else flex_attention
    out = attend(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return out.transpose(1, 2)
