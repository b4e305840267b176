"""The trunk every variant shares: patches in raster order, class token LAST, residual blocks with
per-call drop path, final norm, a main head on the last token and an auxiliary head on the patches.

Families (Mamba, RetNet, ViT) differ only in the blocks they hand to :class:`TokenClassifier`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from timm.layers import trunc_normal_
from torch import nn

AuxHead = Literal["tokens", "pooled", "none"]


class ModelOutput(NamedTuple):
    """What ``forward`` returns in training mode.

    ``aux_logits`` is ``(batch, patches, classes)`` for the released per-token aux head,
    ``(batch, classes)`` for the paper's pooled aux head, and ``None`` without an aux head.
    """

    logits: torch.Tensor
    aux_logits: torch.Tensor | None


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution, flattened row-major to ``(B, L, C)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {self.patch_size}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


def make_head(embed_dim: int, num_classes: int, mlp_ratio: float) -> nn.Module:
    """A linear head, or ``Linear(C, rC) -> Tanh -> Linear(rC, classes)`` as in the released Large
    (ImageNet-21k -> 1k) checkpoints, whose state-dict keys are ``head.0.*`` and ``head.2.*``."""
    if num_classes <= 0:
        return nn.Identity()
    if mlp_ratio <= 0:
        return nn.Linear(embed_dim, num_classes)
    hidden = int(embed_dim * mlp_ratio)
    return nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate per block: linear over depth from 0 at the first block to ``rate``."""
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]


class TokenClassifier(nn.Module):
    """Shared trunk. Subclasses build ``self.blocks`` (each ``block(x, drop_prob) -> x``).

    ``forward(images, drop_path_rate=None)``: in eval mode the main logits ``(batch, classes)``; in
    training mode a :class:`ModelOutput` with the aux logits too. ``drop_path_rate`` is the rate of the
    LAST block for this call (the trainer's schedule changes it every step); ``None`` uses
    ``self.drop_path_rate``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_classes: int = 1000,
        patch_size: int = 16,
        in_chans: int = 3,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        aux_head: AuxHead = "tokens",
        head_mlp_ratio: float = 0.0,
        pos_embed: bool = False,
        final_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if aux_head not in ("tokens", "pooled", "none"):
            raise ValueError(f"aux_head must be 'tokens', 'pooled' or 'none', got {aux_head!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.drop_path_rate = drop_path_rate
        self.aux_head = aux_head
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_tokens = (img_size // patch_size) ** 2 + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim)) if pos_embed else None
        self.blocks = nn.ModuleList()
        self.norm = nn.LayerNorm(embed_dim, eps=final_norm_eps)
        self.head = make_head(embed_dim, num_classes, head_mlp_ratio)
        self.head2 = make_head(embed_dim, num_classes, head_mlp_ratio) if aux_head != "none" else None

    # -- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place; works after ``to_empty`` from meta."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                # Patch embedding: as a linear layer over the flattened patch (timm's ViT does the same).
                trunc_normal_(module.weight.view(module.weight.shape[0], -1), std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        # Family-specific parameters (decays, frequencies, dt biases, fixed buffers) come last.
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor, drop_path_rate: float | None = None) -> torch.Tensor:
        """Final normed tokens ``(batch, patches + 1, width)`` in causal order, class token last."""
        x = self.patch_embed(images)
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        if self.pos_embed is not None:
            if self.pos_embed.shape[1] != x.shape[1]:
                raise ValueError(
                    f"this model's position embedding covers {self.pos_embed.shape[1]} tokens "
                    f"(img_size={self.img_size}); got {x.shape[1]}"
                )
            x = x + self.pos_embed
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        for block, block_rate in zip(self.blocks, drop_path_rates(rate, len(self.blocks))):
            x = block(x, block_rate if self.training else 0.0)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, -1])

    def forward_aux_head(self, features: torch.Tensor) -> torch.Tensor | None:
        if self.head2 is None:
            return None
        patches = features[:, :-1]
        if self.aux_head == "pooled":
            return self.head2(patches.mean(dim=1))
        return self.head2(patches)

    def forward(
        self, images: torch.Tensor, drop_path_rate: float | None = None
    ) -> torch.Tensor | ModelOutput:
        features = self.forward_features(images, drop_path_rate)
        logits = self.forward_head(features)
        if not self.training:
            return logits
        return ModelOutput(logits, self.forward_aux_head(features))

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names exempt from weight decay: 1-D tensors and the bandpass parameters."""
        return {
            name
            for name, p in self.named_parameters()
            if p.ndim <= 1
            or name.endswith((".A_log", ".D", ".freq", ".lambda_hat", ".theta", "cls_token"))
            or name == "pos_embed"
        }
