"""De-focus ViT: causal softmax attention whose logits carry a learnable per-head decay and a learnable
rotary phase (a bandpass filter on the attention), plus the baselines causal ViT and DeiT.

``decay_mode="multiplicative"`` is the paper's equation (the decay ``exp(lambda (t-s))`` multiplies the
logit); ``"additive"`` adds ``lambda (t-s)`` to the logit (an ALiBi-like bias, the paper's open ablation)
and runs through PyTorch's fused SDPA kernels with a bias as well as through FlexAttention. Additive is
the default because it trained as well in a side-by-side run (``benchmarks/compare_vit_decay_modes.py``:
CIFAR-10 subset, two seeds, test top-1 38.9/38.3% additive vs 38.2/37.2% multiplicative); pass
``decay_mode="multiplicative"`` for the paper's exact form.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp, register_notrace_module
from torch import nn

from defocus_scale.kernels import defocus_attention
from defocus_scale.models.bandpass import BandpassParams
from defocus_scale.models.registry import register_family
from defocus_scale.models.trunk import DropPathRate, TokenClassifier, reject_scripting, scheduled_drop_path


@register_notrace_module  # FX: one leaf (FlexAttention / SDPA dispatch)
class DefocusAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = True,
        decay: bool = True,
        rotary: bool = True,
        learnable: bool = True,
        decay_mode: str = "additive",
        decay_range: tuple[float, float] = (2.0**-8, 2.0**-1),
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.causal, self.decay_mode, self.backend = causal, decay_mode, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bandpass = BandpassParams(
            num_heads, self.head_dim, decay=decay, rotary=rotary, learnable=learnable,
            decay_init="loguniform", decay_range=decay_range,
        )  # fmt: skip

    def __prepare_scriptable__(self) -> nn.Module:
        if self.bandpass.lambda_hat is not None or self.bandpass.theta is not None:
            reject_scripting(self, "De-focus attention (decay and rotary score modification)")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        if torch.jit.is_scripting():
            # Only the bandpass-free baselines script (see __prepare_scriptable__): plain (causal) SDPA, as
            # the operator's SDPA form computes it without decay and rotary.
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)
        else:
            lambda_hat, theta = self.bandpass()
            out = defocus_attention(
                q, k, v,
                lambda_hat=lambda_hat, theta=theta,
                causal=self.causal, decay_mode=self.decay_mode, backend=self.backend,
            )  # fmt: skip
        return self.proj(out.reshape(batch, length, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPathRate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rate = self.drop_path.rate
        x = x + scheduled_drop_path(self.mixer(self.norm1(x)), rate, self.training)
        return x + scheduled_drop_path(self.mlp(self.norm2(x)), rate, self.training)


class DefocusViT(TokenClassifier):
    """De-focus ViT, causal ViT (``decay=rotary=False, pos_embed=True``) or DeiT (also ``causal=False``); the
    other keyword arguments are :class:`~defocus_scale.models.trunk.TokenClassifier`'s (``pos_embed`` and
    ``dynamic_img_size`` among them)."""

    # The learned per-head decay and rotary frequencies stay fp32 under bf16.
    FP32_PARAMETERS = ("bandpass.lambda_hat", "bandpass.theta")

    def __init__(
        self,
        *,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        decay: bool = True,
        rotary: bool = True,
        learnable: bool = True,
        decay_mode: str = "additive",
        decay_range: tuple[float, float] = (2.0**-8, 2.0**-1),
        backend: str = "auto",
        **trunk: Any,
    ) -> None:
        def make_blocks() -> Iterator[nn.Module]:
            for _ in range(depth):
                mixer = DefocusAttention(
                    embed_dim, num_heads, causal=causal, decay=decay, rotary=rotary, learnable=learnable,
                    decay_mode=decay_mode, decay_range=decay_range, backend=backend,
                )  # fmt: skip
                yield TransformerBlock(embed_dim, mixer, mlp_ratio)

        super().__init__(embed_dim=embed_dim, depth=depth, make_blocks=make_blocks, **trunk)


# DeiT sizes (the paper's ViT-S/B); large is ViT-L; 1b/3b scale width and depth.
VIT_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "1b": dict(embed_dim=2048, depth=20, num_heads=16),
    "3b": dict(embed_dim=2560, depth=38, num_heads=20),
}

# De-focus ViT: causal, learnable decay + learnable RoPE, positions from the rotary only.
register_family("defocus_vit", DefocusViT, VIT_SIZES, __name__)
# Causal ViT baseline: causal mask, absolute position embedding, no bandpass, no aux head.
register_family(
    "causal_vit", DefocusViT, VIT_SIZES, __name__, decay=False, rotary=False, pos_embed=True, aux_head="none"
)
# DeiT baseline: bidirectional attention, absolute position embedding, no aux head.
register_family(
    "deit", DefocusViT, VIT_SIZES, __name__,
    causal=False, decay=False, rotary=False, pos_embed=True, aux_head="none",
)  # fmt: skip
