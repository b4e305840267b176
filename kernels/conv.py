"""Causal depthwise convolution over tokens (the short convolution of Mamba's mixer), channels last.

``out[b, t, e] = bias[e] + sum_k weight[e, k] x[b, t - (K - 1) + k, e]`` (zero before the first token),
``x: (batch, length, channels)``, ``weight: (channels, K)``. Two forms, the same function:

* ``"conv"``: ``F.conv1d`` with ``groups=channels`` on the transposed input, keeping the first ``length``
  outputs of the both-sides padding (the released code's form; cuDNN on GPUs);
* ``"shifted"``: ``K`` shifted multiply-adds in the ``(batch, length, channels)`` layout, the CPU default:
  no transposed copies in or out, and no oneDNN depthwise kernel. Measured at De-focus Mamba-S's shapes
  (8 x 197 x 768, K = 4, one thread) beside the conv form on the same contiguous input: 3.0 / 6.4 ms
  forward / backward vs 2.5 / 8.6 ms, before the conv form's transposes are counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_FORMS = ("auto", "conv", "shifted")


def causal_depthwise_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, form: str = "auto"
) -> torch.Tensor:
    """``x: (batch, length, channels)``, ``weight: (channels, K)`` or ``(channels, 1, K)`` (a depthwise
    ``nn.Conv1d``'s), ``bias: (channels,)`` -> ``(batch, length, channels)``; ``form``: see the module
    (``"auto"``: ``"conv"`` on CUDA and on the meta device, where FLOP counters, which count
    convolutions but not elementwise products, take their shapes-only pass; ``"shifted"`` elsewhere)."""
    if form not in CONV_FORMS:
        raise ValueError(f"form must be one of {CONV_FORMS}, got {form!r}")
    channels = x.shape[-1]
    taps = weight.reshape(channels, -1)
    if form == "conv" or (form == "auto" and x.device.type in ("cuda", "meta")):
        length, kernel = x.shape[1], taps.shape[1]
        out = F.conv1d(x.transpose(1, 2), taps[:, None], bias, padding=kernel - 1, groups=channels)
        return out[..., :length].transpose(1, 2)
    length, kernel = x.shape[1], taps.shape[1]
    padded = F.pad(x, (0, 0, kernel - 1, 0))
    last = padded[:, kernel - 1 :] * taps[:, kernel - 1]
    out = last + bias if bias is not None else last
    for k in range(kernel - 1):
        out = torch.addcmul(out, padded[:, k : k + length], taps[:, k])
    return out
