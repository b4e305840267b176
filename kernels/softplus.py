"""``softplus`` (``beta`` 1, ``threshold`` 20, as ``F.softplus``) for the selective scan's step sizes.

On CPU, ATen evaluates ``softplus`` (and ``log1p``) one element at a time: at De-focus Mamba-S's step
sizes (8 x 197 x 768 fp32, 2 threads) it measured 6.8 ms, against 0.4 ms for ``exp`` and 0.6 ms for
``log``, and it was the largest op of a Mamba-S train step after the matmuls (24 calls, ~170 ms of
~2.3 s). The CPU form here builds ``log1p(exp(x))`` from vectorised ``exp`` and ``log`` with Goldberg's
correction, ``log1p(t) = log(u) t / (u - 1)`` for ``u = 1 + t`` (``t`` where ``u == 1``): 2.4 ms, within
2.3e-7 relative of ``F.softplus`` in fp32 (``F.softplus`` itself: 1.2e-7 from the fp64 value). Its
gradient is ``F.softplus``'s own (``aten.softplus_backward``, one vectorised pass). CUDA (where
``F.softplus`` is one fused kernel), other devices and low-precision dtypes take ``F.softplus``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

THRESHOLD = 20.0  # F.softplus's default: x above it is returned as is


def _softplus_vectorised(x: torch.Tensor) -> torch.Tensor:
    t = x.clamp(max=THRESHOLD).exp_()  # clamped: no inf in the branch that the threshold discards
    u = t + 1
    log1p = torch.where(u == 1, t, u.log().mul_(t).div_(u - 1))
    return torch.where(x > THRESHOLD, x, log1p)


class _CpuSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _softplus_vectorised(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.softplus_backward(grad, x, 1.0, THRESHOLD)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``F.softplus(x)`` (beta 1, threshold 20); on CPU in fp32/fp64 the vectorised form above."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _CpuSoftplus.apply(x)
    return F.softplus(x)
