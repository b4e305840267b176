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

import torch
from timm.layers import Mlp, drop_path
from torch import nn

from defocus_scale.kernels import defocus_attention
from defocus_scale.models.bandpass import BandpassParams
from defocus_scale.models.registry import register_variant
from defocus_scale.models.trunk import AuxHead, TokenClassifier


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        out = defocus_attention(
            q, k, v,
            lambda_hat=self.bandpass.lambda_hat, theta=self.bandpass.theta,
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

    def forward(self, x: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        x = x + drop_path(self.mixer(self.norm1(x)), drop_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), drop_prob, self.training)


class DefocusViT(TokenClassifier):
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
        pos_embed: bool = False,
        num_classes: int = 1000,
        patch_size: int = 16,
        in_chans: int = 3,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        aux_head: AuxHead = "tokens",
        head_mlp_ratio: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            embed_dim=embed_dim, depth=depth, num_classes=num_classes, patch_size=patch_size,
            in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate, aux_head=aux_head,
            head_mlp_ratio=head_mlp_ratio, pos_embed=pos_embed,
        )  # fmt: skip
        self.blocks.extend(
            TransformerBlock(
                embed_dim,
                DefocusAttention(
                    embed_dim,
                    num_heads,
                    causal=causal,
                    decay=decay,
                    rotary=rotary,
                    learnable=learnable,
                    decay_mode=decay_mode,
                    decay_range=decay_range,
                    backend=backend,
                ),  # fmt: skip
                mlp_ratio,
            )
            for _ in range(depth)
        )
        self.init_weights()


# DeiT sizes (the paper's ViT-S/B); large is ViT-L; 1b/3b scale width and depth.
VIT_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "1b": dict(embed_dim=2048, depth=20, num_heads=16),
    "3b": dict(embed_dim=2560, depth=38, num_heads=20),
}

for _size, _cfg in VIT_SIZES.items():
    # De-focus ViT: causal, learnable decay + learnable RoPE, positions from the rotary only.
    register_variant(f"defocus_vit_{_size}", DefocusViT, "defocus_vit", **_cfg)
    # Causal ViT baseline: causal mask, absolute position embedding, no bandpass, no aux head.
    register_variant(
        f"causal_vit_{_size}", DefocusViT, "causal_vit",
        decay=False, rotary=False, pos_embed=True, aux_head="none", **_cfg,
    )  # fmt: skip
    # DeiT baseline: bidirectional attention, absolute position embedding, no aux head.
    register_variant(
        f"deit_{_size}", DefocusViT, "deit",
        causal=False, decay=False, rotary=False, pos_embed=True, aux_head="none", **_cfg,
    )  # fmt: skip
