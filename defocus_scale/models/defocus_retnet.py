"""De-focus RetNet: RetNet's multi-scale retention with the per-head decay ``gamma`` and the rotary
angles made learnable (``lambda = -exp(lambda_hat)``, ``theta``); the baseline keeps them fixed at
RetNet's values (``gamma_h = 1 - 2^(-5-h)``, RoPE angles)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from defocus_scale.kernels import retention_scan
from defocus_scale.models.bandpass import BandpassParams
from defocus_scale.models.defocus_vit import VIT_SIZES, TransformerBlock
from defocus_scale.models.registry import register_family
from defocus_scale.models.trunk import TokenClassifier, reject_scripting


@register_notrace_module  # FX: the chunked retention scan is one leaf
class MultiScaleRetention(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, learnable: bool = True, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"width {dim} must split into {num_heads} heads of even size")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.bandpass = BandpassParams(num_heads, self.head_dim, learnable=learnable, decay_init="retnet")

    def __prepare_scriptable__(self) -> nn.Module:
        reject_scripting(self, "the retention scan")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape) * self.head_dim**-0.5
        v = self.v_proj(x).view(shape)
        lambda_hat, theta = self.bandpass()
        log_decay = -torch.exp(lambda_hat)
        out = retention_scan(q, k, v, log_decay, theta, backend=self.backend)
        # Per-head group norm (RetNet's, no affine): retention outputs differ in scale across heads.
        norm_dtype = torch.promote_types(out.dtype, torch.float32)  # at least fp32, as in RetNet
        out = F.rms_norm(out.to(norm_dtype), (self.head_dim,), eps=1e-6).to(x.dtype)
        out = out.reshape(batch, length, dim)
        return self.out_proj(F.silu(self.g_proj(x)) * out)


class DefocusRetNet(TokenClassifier):
    """De-focus RetNet (``learnable=True``) or RetNet; the other keyword arguments are
    :class:`~defocus_scale.models.trunk.TokenClassifier`'s."""

    # The learned per-head decay and rotary angles stay fp32 under bf16 (the baseline's are buffers).
    FP32_PARAMETERS = ("bandpass.lambda_hat", "bandpass.theta")

    def __init__(
        self,
        *,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        learnable: bool = True,
        backend: str = "auto",
        **trunk: Any,
    ) -> None:
        def make_blocks() -> Iterator[nn.Module]:
            for _ in range(depth):
                mixer = MultiScaleRetention(embed_dim, num_heads, learnable=learnable, backend=backend)
                yield TransformerBlock(embed_dim, mixer, mlp_ratio)

        super().__init__(embed_dim=embed_dim, depth=depth, make_blocks=make_blocks, **trunk)


# ViT's sizes; a RetNet layer has 13 d^2 weights to ViT's 12 (the gate), so 1b/3b are one step shallower.
RETNET_SIZES: dict[str, dict] = {
    **VIT_SIZES,
    "1b": {**VIT_SIZES["1b"], "depth": 18},
    "3b": {**VIT_SIZES["3b"], "depth": 35},
}

register_family("defocus_retnet", DefocusRetNet, RETNET_SIZES, __name__)
# RetNet baseline: fixed decay and angles, no aux head.
register_family("retnet", DefocusRetNet, RETNET_SIZES, __name__, learnable=False, aux_head="none")
