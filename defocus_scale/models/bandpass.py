"""Learnable bandpass parameters shared by De-focus ViT and De-focus RetNet: one decay per head
(``lambda = -exp(lambda_hat)``, the low-pass part) and one rotary frequency per head and rotary pair
(``theta``, the band's centre). Fixed variants keep the same tensors as buffers (the baselines)."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Standard RoPE frequencies ``base^(-2j/d)`` for the ``d/2`` rotary pairs."""
    return base ** (-torch.arange(0, head_dim // 2, dtype=torch.float64) * 2 / head_dim)


class BandpassParams(nn.Module):
    """Per-head decay and per-(head, pair) rotary frequency.

    ``decay_init`` gives the initial decay rates ``|lambda_h|``: ``"retnet"`` is RetNet's
    ``gamma_h = 1 - 2^(-5-h)`` (``|lambda_h| = -log gamma_h``); ``"loguniform"`` spreads ``|lambda_h|``
    log-uniformly over ``decay_range`` so that heads cover different pass-band widths.
    ``theta`` starts at the standard RoPE frequencies in every head.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        decay: bool = True,
        rotary: bool = True,
        learnable: bool = True,
        decay_init: str = "loguniform",
        decay_range: tuple[float, float] = (2.0**-8, 2.0**-1),
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary pairs, got {head_dim}")
        if decay_init not in ("loguniform", "retnet"):
            raise ValueError(f"decay_init must be 'loguniform' or 'retnet', got {decay_init!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.decay_init, self.decay_range, self.rope_base = decay_init, tuple(decay_range), rope_base
        self.learnable = learnable

        for name, enabled, shape in (
            ("lambda_hat", decay, (num_heads,)),
            ("theta", rotary, (num_heads, head_dim // 2)),
        ):
            if not enabled:
                self.register_parameter(name, None)
            elif learnable:
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            else:  # fixed baseline values, still saved with the model
                self.register_buffer(name, torch.empty(shape))

    def initial_decay_rates(self) -> torch.Tensor:
        heads = torch.arange(self.num_heads, dtype=torch.float64)
        if self.decay_init == "retnet":
            return -torch.log1p(-(2.0 ** (-5.0 - heads)))
        lo, hi = self.decay_range
        if self.num_heads == 1:
            return torch.tensor([math.sqrt(lo * hi)], dtype=torch.float64)
        return torch.exp(torch.linspace(math.log(hi), math.log(lo), self.num_heads, dtype=torch.float64))

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.lambda_hat is not None:
            self.lambda_hat.copy_(torch.log(self.initial_decay_rates()).float())
        if self.theta is not None:
            freqs = rope_frequencies(self.head_dim, self.rope_base).float()
            self.theta.copy_(freqs.expand(self.num_heads, -1))

    def forward(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(lambda_hat, theta)`` (each None when disabled)."""
        return self.lambda_hat, self.theta

    def log_decay(self) -> torch.Tensor | None:
        """``lambda_h = -exp(lambda_hat_h)`` (always < 0, so the decay ``exp(lambda)`` stays below 1)."""
        return None if self.lambda_hat is None else -torch.exp(self.lambda_hat)
