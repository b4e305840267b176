"""The token-mixing matrix of each bandpass operator, computed from a layer's actual inputs.

Every operator here is linear in its values once the rest of its inputs are fixed: output token ``t`` is
``sum_s M[t, s] value_s`` per head (attention, retention) or per channel (selective scan). ``M`` is

* attention: the softmax matrix (rotary phase and decay included);
* retention: ``gamma^(t-s) (q~_t . k~_s)`` for ``s <= t`` (rotated queries and keys);
* selective scan: ``sum_n C'_t[n] exp(sum_{r=s+1..t} delta_r A[n]) B'_s[n] delta_s`` for ``s <= t``
  (the recurrence unrolled; ``B'``, ``C'`` carry the released rotary), one matrix per channel.

These are what the paper means by the attention of the class token and of patch tokens spreading over
earlier tokens; tests check ``M @ values`` against each operator in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from defocus_scale.kernels import published_rotary, rotate_by_position
from defocus_scale.models import DefocusAttention, DefocusMambaMixer, MultiScaleRetention


def _distance(length: int, like: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(length, device=like.device)
    return (positions[:, None] - positions[None, :]).to(like.dtype)


def attention_mixing_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    lambda_hat: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    causal: bool = True,
    decay_mode: str = "multiplicative",
) -> torch.Tensor:
    """Softmax matrix of ``defocus_attention``: ``q, k: (batch, length, heads, d)`` -> ``(batch, heads,
    length, length)``, rows summing to one."""
    if theta is not None:
        q, k = rotate_by_position(q, theta), rotate_by_position(k, theta)
    length = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    distance = _distance(length, q)
    if lambda_hat is not None:
        exponent = -torch.exp(lambda_hat.to(q.dtype))[:, None, None] * distance.clamp(min=0)
        if decay_mode == "multiplicative":
            scores = scores * torch.exp(exponent)
        elif decay_mode == "additive":
            scores = scores + exponent
        else:
            raise ValueError(f"decay_mode must be 'multiplicative' or 'additive', got {decay_mode!r}")
    if causal:
        scores = scores.masked_fill(distance < 0, float("-inf"))
    return scores.softmax(-1)


def retention_mixing_matrix(
    q: torch.Tensor, k: torch.Tensor, log_decay: torch.Tensor, theta: torch.Tensor | None
) -> torch.Tensor:
    """Matrix of ``retention_scan``: ``q, k: (batch, length, heads, dk)`` -> ``(batch, heads, length,
    length)`` with ``M[t, s] = gamma^(t-s) (q~_t . k~_s)`` below the diagonal and zero above it."""
    if theta is not None:
        q, k = rotate_by_position(q, theta), rotate_by_position(k, theta)
    distance = _distance(q.shape[1], q)
    decay = torch.exp(log_decay.to(q.dtype)[:, None, None] * distance.clamp(min=0))
    decay = decay.masked_fill(distance < 0, 0.0)
    return torch.einsum("bthd,bshd->bhts", q, k) * decay


def selective_scan_mixing_matrix(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    freq: torch.Tensor | None = None,
    rope_scale: float = 1.0,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Matrix of ``selective_scan`` without its epilogue: ``delta: (batch, length, channels)``,
    ``A: (channels, state)``, ``B, C: (batch, length, state)`` -> ``(batch, channels, length, length)``.
    With ``D`` the skip ``D * u`` is added on the diagonal (it is only then the scan's full linear map
    when there is no group norm: the released mixer adds ``D * u`` after normalising the scan)."""
    if freq is not None:
        B, C = published_rotary(B, freq, rope_scale), published_rotary(C, freq, rope_scale)
    batch, length, channels = delta.shape
    future = _distance(length, delta) < 0
    # Cumulative log-decay S_t = sum_{r<=t} delta_r A; the decay product over r in (s, t] is
    # exp(S_t - S_s). One state at a time keeps the working set at (batch, channels, length, length).
    log_decay = torch.cumsum(delta[..., None] * A, dim=1).permute(0, 3, 2, 1)  # (b, n, e, L)
    matrix = delta.new_zeros(batch, channels, length, length)
    for n in range(A.shape[1]):
        exponent = (log_decay[:, n, :, :, None] - log_decay[:, n, :, None, :]).masked_fill(future, -torch.inf)
        read_write = C[:, :, n, None] * B[:, None, :, n]  # (b, t, s)
        matrix += exponent.exp_() * read_write[:, None]
    matrix *= delta.transpose(1, 2)[:, :, None, :]
    if D is not None:
        matrix = matrix + torch.diag_embed(D.to(matrix.dtype)[:, None].expand(channels, length))
    return matrix


@dataclass
class LayerMixing:
    """``matrix: (batch, groups, length, length)`` mixes ``values: (batch, groups, length, dim)``; a group
    is a head (attention, retention) or a channel (selective scan, ``dim == 1``)."""

    matrix: torch.Tensor
    values: torch.Tensor

    def mix(self) -> torch.Tensor:
        return self.matrix @ self.values


def mamba_scan_inputs(mixer: DefocusMambaMixer, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ``DefocusMambaMixer.forward`` hands to the selective scan, recomputed from its input."""
    length = hidden.shape[1]
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)
    x = F.silu(mixer.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2))
    dt, B, C = mixer.x_proj(x).split([mixer.dt_rank, mixer.state_size, mixer.state_size], dim=-1)
    delta = F.softplus(mixer.dt_proj(dt)) / mixer.delta_scale
    return dict(u=x, z=z, delta=delta, A=-torch.exp(mixer.A_log), B=B, C=C)


def layer_mixing(mixer: nn.Module, hidden: torch.Tensor) -> LayerMixing:
    """The token-mixing matrix of one of our mixers on its input ``hidden: (batch, length, width)``.

    For the Mamba mixer it is the scan's matrix alone: the group norm, the ``D`` skip and the ``z`` gate
    act on each token separately after the scan, so they do not move information between tokens.
    """
    batch, length, width = hidden.shape
    if isinstance(mixer, DefocusAttention):
        q, k, v = mixer.qkv(hidden).view(batch, length, 3, mixer.num_heads, mixer.head_dim).unbind(2)
        matrix = attention_mixing_matrix(
            q, k, mixer.bandpass.lambda_hat, mixer.bandpass.theta, mixer.causal, mixer.decay_mode
        )
        return LayerMixing(matrix, v.transpose(1, 2))
    if isinstance(mixer, MultiScaleRetention):
        shape = (batch, length, mixer.num_heads, mixer.head_dim)
        q = mixer.q_proj(hidden).view(shape)
        k = mixer.k_proj(hidden).view(shape) * mixer.head_dim**-0.5
        v = mixer.v_proj(hidden).view(shape)
        matrix = retention_mixing_matrix(q, k, mixer.bandpass.log_decay(), mixer.bandpass.theta)
        return LayerMixing(matrix, v.transpose(1, 2))
    if isinstance(mixer, DefocusMambaMixer):
        inputs = mamba_scan_inputs(mixer, hidden)
        matrix = selective_scan_mixing_matrix(
            inputs["delta"], inputs["A"], inputs["B"], inputs["C"], mixer.freq, mixer.rope_scale
        )
        return LayerMixing(matrix, inputs["u"].transpose(1, 2)[..., None])
    raise TypeError(f"no token-mixing matrix is known for {type(mixer).__name__}")
