"""De-focus Mamba (and the plain Mamba baseline), matching the released classifier's forward pass and
state-dict names exactly (see the project's published-defocus-mamba spec).

De-focus Mamba = Mamba's selective scan (data-dependent decay, the low-pass part) plus a learnable
rotary ``freq`` on B and C (the band), plus a weightless group RMS norm on the scan output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from defocus_scale.kernels import causal_depthwise_conv1d, selective_scan, softplus
from defocus_scale.models.registry import register_family
from defocus_scale.models.trunk import DropPathRate, TokenClassifier, reject_scripting, scheduled_drop_path


def default_rotary_freq(state_size: int) -> torch.Tensor:
    """The released initialisation: ``freq[n] = (100^(-(n+1)/N) - 0.01) / 0.99``, spread from near 1
    down to 0 so each state dimension starts in a different band."""
    n = torch.arange(state_size, dtype=torch.float64)
    return ((100.0 ** (-(n + 1) / state_size) - 0.01) / 0.99).float()


@register_notrace_module  # FX: the selective scan is one leaf (it loops over tokens in Python)
class DefocusMambaMixer(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        inner_dim: int,
        *,
        state_size: int = 16,
        dt_rank: int = 48,
        conv_kernel: int = 4,
        rotary: bool = True,
        group_size: int = 64,
        rope_scale: float = 1.0,
        delta_scale: float = 1.0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_floor: float = 1e-4,
        backend: str = "auto",
        scan_state_every: int = 0,
    ) -> None:
        super().__init__()
        if group_size and inner_dim % group_size:
            raise ValueError(f"inner_dim {inner_dim} is not a multiple of group_size {group_size}")
        self.inner_dim, self.state_size, self.dt_rank = inner_dim, state_size, dt_rank
        self.group_size, self.rope_scale, self.delta_scale = group_size, rope_scale, delta_scale
        self.dt_min, self.dt_max, self.dt_floor = dt_min, dt_max, dt_floor
        self.backend = backend
        # tokens between the scan states kept for the backward (Triton backend; 0: its default of 8):
        # 32 keeps a quarter of the memory for a slower backward
        self.scan_state_every = scan_state_every
        self.in_proj = nn.Linear(embed_dim, 2 * inner_dim, bias=False)
        self.conv1d = nn.Conv1d(
            inner_dim, inner_dim, conv_kernel, groups=inner_dim, padding=conv_kernel - 1, bias=True
        )
        self.x_proj = nn.Linear(inner_dim, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner_dim, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner_dim, state_size))
        self.D = nn.Parameter(torch.empty(inner_dim))
        self.freq = nn.Parameter(torch.empty(state_size)) if rotary else None
        self.out_proj = nn.Linear(inner_dim, embed_dim, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The released initialisation of the SSM parameters (runs after the trunk's generic init)."""
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        # dt log-spaced (deterministically) over the channels, stored as inverse softplus in the bias.
        dt = torch.exp(
            torch.linspace(math.log(self.dt_min), math.log(self.dt_max), self.inner_dim, dtype=torch.float64)
        ).clamp(min=self.dt_floor)
        self.dt_proj.bias.copy_((dt + torch.log(-torch.expm1(-dt))).float())
        states = torch.arange(1, self.state_size + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(states).expand(self.inner_dim, -1))
        self.D.fill_(1.0)
        if self.freq is not None:
            self.freq.copy_(default_rotary_freq(self.state_size))

    def __prepare_scriptable__(self) -> nn.Module:
        reject_scripting(self, "the selective scan")
        return self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        # Causal depthwise conv (left zero padding K-1) with the nn.Conv1d's parameters, channels last.
        x = F.silu(causal_depthwise_conv1d(x, self.conv1d.weight, self.conv1d.bias))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        # Under bf16 the dt_proj bias, A_log, D and freq stay fp32 (FP32_PARAMETERS): as in the release, the
        # bias is added in fp32 to the (bf16) projection, so delta, A, D and freq reach the scan in fp32.
        bias = self.dt_proj.bias
        delta = softplus(F.linear(dt, self.dt_proj.weight).to(bias.dtype) + bias)
        if self.delta_scale != 1.0:  # (a division by 1 is a full pass over the tensor, forward and backward)
            delta = delta / self.delta_scale
        A = -torch.exp(self.A_log)
        y = selective_scan(
            x, delta, A, B, C,
            freq=self.freq, rope_scale=self.rope_scale,
            D=self.D, z=z, group_size=self.group_size,
            backend=self.backend, state_every=self.scan_state_every,
        )  # fmt: skip
        return self.out_proj(y)


class DefocusMambaBlock(nn.Module):
    def __init__(self, embed_dim: int, mixer: DefocusMambaMixer, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(embed_dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPathRate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + scheduled_drop_path(self.mixer(self.norm(x)), self.drop_path.rate, self.training)


class DefocusMamba(TokenClassifier):
    """De-focus Mamba (``rotary=True``, ``group_size`` > 0) or plain Mamba; the other keyword arguments are
    :class:`~defocus_scale.models.trunk.TokenClassifier`'s (classes, image and patch size, heads, pooling,
    ``device``/``dtype`` ...)."""

    # The SSM's decay (A_log), skip (D), step-size bias and the learned rotary band stay fp32 under bf16.
    FP32_PARAMETERS = ("A_log", "D", "freq", "dt_proj.bias")

    def __init__(
        self,
        *,
        embed_dim: int = 768,
        depth: int = 24,
        inner_dim: int | None = None,
        state_size: int = 16,
        dt_rank: int = 48,
        conv_kernel: int = 4,
        rotary: bool = True,
        group_size: int = 64,
        rope_scale: float = 1.0,
        delta_scale: float = 1.0,
        backend: str = "auto",
        scan_state_every: int = 0,
        **trunk: Any,
    ) -> None:
        inner_dim = inner_dim or 2 * embed_dim

        def make_blocks() -> Iterator[nn.Module]:
            for _ in range(depth):
                mixer = DefocusMambaMixer(
                    embed_dim, inner_dim, state_size=state_size, dt_rank=dt_rank, conv_kernel=conv_kernel,
                    rotary=rotary, group_size=group_size, rope_scale=rope_scale, delta_scale=delta_scale,
                    backend=backend, scan_state_every=scan_state_every,
                )  # fmt: skip
                yield DefocusMambaBlock(embed_dim, mixer)

        super().__init__(embed_dim=embed_dim, depth=depth, make_blocks=make_blocks, **trunk)


# Released sizes: Small 384x24 (inner 768), Base 768x24 (inner 1536), Large 1024x48 (inner 2048, MLP
# heads as in the 21k->1k checkpoints); state 16 and dt rank 48 everywhere. 1b/3b scale width and depth.
MAMBA_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=24),
    "small": dict(embed_dim=384, depth=24),
    "base": dict(embed_dim=768, depth=24),
    "large": dict(embed_dim=1024, depth=48, head_mlp_ratio=3.0),
    "1b": dict(embed_dim=1792, depth=50),
    "3b": dict(embed_dim=2816, depth=62),
}

register_family("defocus_mamba", DefocusMamba, MAMBA_SIZES, __name__)
# Baseline: plain Mamba, no rotary, no group norm, no aux head (the paper's Mamba-S/B counts).
register_family("mamba", DefocusMamba, MAMBA_SIZES, __name__, rotary=False, group_size=0, aux_head="none")
