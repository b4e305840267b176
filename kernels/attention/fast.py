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

Precision with bf16/fp16 activations: the rotary angles, the distances ``t - s``, the decay
exponents and the decay factors are computed in at least float32 (``score_dtype``), as are the
multiplicative form's scores, softmax and probability-weighted sum; only the output is cast back to
``v``'s dtype. The additive form hands SDPA a float32 mask where the backend accepts one (CPU adds it
to its fp32 scores); elsewhere the mask is cast to the query's dtype, as the fused CUDA kernels
require.
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


def score_dtype(q: torch.Tensor) -> torch.dtype:
    """Distances, decays and (multiplicative form) scores: at least float32, float64 for float64."""
    return torch.promote_types(q.dtype, torch.float32)


def _distance(length: int, like: torch.Tensor) -> torch.Tensor:
    """``t - s`` as a ``(length, length)`` matrix in ``score_dtype(like)`` (exact: integers < 2^24)."""
    position = torch.arange(length, device=like.device)
    return (position[:, None] - position[None, :]).to(score_dtype(like))


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
    length, compute = q.shape[2], score_dtype(q)
    distance = _distance(length, q)
    rate = torch.exp(lambda_hat.to(compute))[:, None, None]
    decay_exponent = -rate * distance.clamp(min=0)  # (H, L, L), in `compute`
    future = distance < 0
    if decay_mode == "additive":
        bias = decay_exponent.masked_fill(future, float("-inf")) if causal else decay_exponent
        if q.device.type != "cpu":  # the fused CUDA kernels want the mask in the query's dtype
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2)
    # scores from the (rounded) rotated q, k multiplied exactly in `compute`; decay, softmax and the
    # weighted sum in `compute` too, the output cast back to v's dtype
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2))
    scores = scores * (torch.exp(decay_exponent) / math.sqrt(q.shape[-1]))
    if causal:
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.to(compute)).to(v.dtype).transpose(1, 2)


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
    length, compute = q.shape[2], score_dtype(q)
    rate = torch.exp(lambda_hat.to(compute)) if lambda_hat is not None else None
    multiplicative = decay_mode == "multiplicative"

    def score_mod(score, batch, head, q_index, kv_index):
        # FlexAttention's scores are float32 for bf16/fp16 inputs (float64 for float64); the distance
        # and the decay are float32 (or float64) too, and the result keeps the score's dtype
        if rate is not None:
            distance = (q_index - kv_index).clamp(min=0).to(compute)
            if multiplicative:
                score = (score * torch.exp(-rate[head] * distance)).to(score.dtype)
            else:
                score = (score - rate[head] * distance).to(score.dtype)
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
