"""The trunk every variant shares, as a timm model: patches in causal order (raster, or the release's
quadrant order), class token LAST, residual blocks with a per-block drop-path rate, final norm, a main
head on the last token and an auxiliary head on the patches.

Families (Mamba, RetNet, ViT) differ only in the blocks they hand to :class:`TokenClassifier`.

timm's model API, read for a 1D causal model:

* ``forward(x)`` returns the logits of the class token (``global_pool="token"``, the default), in training
  and in eval mode; ``forward_head(features, pre_logits=True)`` the pooled features. ``forward_train(x,
  drop_path_rate)`` returns :class:`ModelOutput` (logits and the aux head's logits) for the De-focus loss.
* ``forward_features(x)`` is the whole normed token sequence ``(batch, patches + 1, width)`` in causal
  order, class token last.
* ``forward_intermediates`` / ``feature_info`` / ``features_only=True``: the output of every block
  (``feature_info[i]`` is ``blocks.i``, width ``embed_dim``, reduction ``patch_size``). ``output_fmt="NCHW"``
  puts the patch tokens back on the image grid, ``"NLC"`` keeps them in causal order; either way the patch
  token at position t has seen only the patches before it. The class token, which has seen all of them,
  is timm's "prefix token" (``return_prefix_tokens=True``) although it comes last.
"""

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import torch
from timm.layers import (
    PatchEmbed,
    _assert,
    get_device_dtype,
    register_notrace_function,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import checkpoint
from timm.models._features import feature_take_indices
from timm.models._input import update_model_input_size
from torch import nn

AuxHead = Literal["tokens", "pooled", "none"]
GLOBAL_POOLS = ("token", "avg", "")
TOKEN_ORDERS = ("raster", "quadrant")


class ModelOutput(NamedTuple):
    """What :meth:`TokenClassifier.forward_train` returns.

    ``aux_logits`` is ``(batch, patches, classes)`` for the released per-token aux head,
    ``(batch, classes)`` for the paper's pooled aux head, and ``None`` without an aux head.
    """

    logits: torch.Tensor
    aux_logits: torch.Tensor | None


def make_head(embed_dim: int, num_classes: int, mlp_ratio: float) -> nn.Module:
    """A linear head, or ``Linear(C, rC) -> Tanh -> Linear(rC, classes)`` as in the released Large
    (ImageNet-21k -> 1k) checkpoints, whose state-dict keys are ``head.0.*`` and ``head.2.*``."""
    if num_classes <= 0:
        return nn.Identity()
    if mlp_ratio <= 0:
        return nn.Linear(embed_dim, num_classes)
    hidden = int(embed_dim * mlp_ratio)
    return nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def grid_to_tokens(x: torch.Tensor, order: str) -> torch.Tensor:
    """``(B, C, H, W)`` patch embeddings to ``(B, H*W, C)`` tokens in causal order: row-major (``raster``),
    or the release's ``patch_embed_change_res`` order (``quadrant``: the four quadrants top-left,
    top-right, bottom-left, bottom-right, each row-major)."""
    if order == "quadrant":
        batch, channels, height, width = x.shape
        _assert(height % 2 == 0 and width % 2 == 0, "quadrant token order needs an even patch grid")
        x = x.reshape(batch, channels, 2, height // 2, 2, width // 2).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(batch, height * width, channels)
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(y: torch.Tensor, height: int, width: int, order: str) -> torch.Tensor:
    """Inverse of :func:`grid_to_tokens`: ``(B, H*W, C)`` patch tokens to ``(B, C, H, W)``."""
    batch, channels = y.shape[0], y.shape[-1]
    if order == "quadrant":
        y = y.reshape(batch, 2, 2, height // 2, width // 2, channels).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(batch, channels, height, width).contiguous()
    return y.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


@register_notrace_function  # FX: one node (the mask's shape follows the input)
def scheduled_drop_path(x: torch.Tensor, drop_prob: torch.Tensor, training: bool) -> torch.Tensor:
    """Stochastic depth (per sample, scaled by the keep probability) with the rate as a 0-d tensor.

    timm's ``drop_path`` takes a Python float; the trainer changes the rate every step and per block,
    so a compiled block would guard on the float and recompile each step. A tensor rate is a graph
    input: one graph for every block and every step. The mask is drawn even at rate 0 (then it keeps
    everything), so the random stream does not depend on the rate."""
    if not training:
        return x
    keep = 1.0 - drop_prob.to(torch.float32)
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    mask = torch.rand(shape, device=x.device, dtype=torch.float32) < keep
    return x * (mask / keep).to(x.dtype)


class DropPathRate(nn.Module):
    """Holds one block's current drop-path rate as a 0-d fp32 buffer (not saved with the weights).

    A buffer rather than a forward argument: FSDP2's mixed precision casts floating-point forward
    arguments to bf16, which would round the scheduled rate (0.4 -> 0.4004)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rate", torch.zeros((), dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.rate.zero_()

    def set(self, value: float) -> None:
        self.rate.fill_(value)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate per block: linear over depth from 0 at the first block to ``rate``."""
    if depth == 1:
        return [rate]
    return [rate * i / (depth - 1) for i in range(depth)]


@torch.no_grad()
def _init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _square(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class TokenClassifier(nn.Module):
    """Shared trunk; ``make_blocks()`` gives the blocks (each ``block(x) -> x``, reading its drop-path rate
    from ``block.drop_path.rate``).

    ``device`` / ``dtype`` place and type every tensor at construction (timm's factory arguments);
    ``dynamic_img_size`` resamples the absolute position embedding (causal ViT, DeiT) to each input's grid;
    without it those two take only ``img_size`` (``set_input_size`` resamples it once). The families without
    a position embedding take any image whose sides are multiples of ``patch_size``.
    """

    FP32_PARAMETERS: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        make_blocks: Callable[[], Iterable[nn.Module]],
        num_classes: int = 1000,
        patch_size: int = 16,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        aux_head: AuxHead = "tokens",
        head_mlp_ratio: float = 0.0,
        pos_embed: bool = False,
        global_pool: str = "token",
        dynamic_img_size: bool = False,
        token_order: str = "raster",
        final_norm_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if aux_head not in ("tokens", "pooled", "none"):
            raise ValueError(f"aux_head must be 'tokens', 'pooled' or 'none', got {aux_head!r}")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
        if pos_embed and token_order != "raster":
            raise ValueError("token_order='quadrant' is the released De-focus Mamba's option; models with an "
                             "absolute position embedding take raster order only")  # fmt: skip
        size = _square(img_size)
        if size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_classes, self.in_chans = num_classes, in_chans
        self.img_size = size[0] if size[0] == size[1] else size
        self.patch_size = patch_size
        self.drop_path_rate = drop_path_rate
        self.aux_head, self.head_mlp_ratio, self.global_pool = aux_head, head_mlp_ratio, global_pool
        self.dynamic_img_size, self.token_order = dynamic_img_size, token_order
        self.grad_checkpointing = False
        self.output_fmt = "NLC"  # forward_features: a token sequence, not a (B, C, H, W) map
        self._with_aux = False  # set only inside forward_train
        with torch.device(device) if device is not None else contextlib.nullcontext():
            # Position-embedding models take their own grid only, unless they resample it per input.
            self.patch_embed = PatchEmbed(
                size, patch_size, in_chans, embed_dim, output_fmt="NCHW",
                strict_img_size=pos_embed and not dynamic_img_size,
            )  # fmt: skip
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            num_tokens = self.patch_embed.num_patches + 1
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim)) if pos_embed else None
            self.blocks = nn.ModuleList(make_blocks())
            self.norm = nn.LayerNorm(embed_dim, eps=final_norm_eps)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = make_head(embed_dim, num_classes, head_mlp_ratio)
            has_aux = aux_head != "none" and num_classes > 0
            self.head2 = make_head(embed_dim, num_classes, head_mlp_ratio) if has_aux else None
            self.feature_info = [
                dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)
            ]
            self.init_weights()
        if dtype is not None:
            self.to(dtype=dtype)

    # -- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place; works after ``to_empty`` from meta."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module)
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
        self.set_drop_path_rate(self.drop_path_rate)

    # -- forward --------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens in causal order, class token appended, position embedding added; and the grid."""
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = grid_to_tokens(x, self.token_order)
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        if self.pos_embed is not None:
            pos_embed = self.pos_embed
            if self.dynamic_img_size:  # the class token's entry (last) stays as it is
                patches = resample_abs_pos_embed(
                    pos_embed[:, :-1], new_size=[grid[0], grid[1]],
                    old_size=[self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]],
                    num_prefix_tokens=0,
                )  # fmt: skip
                pos_embed = torch.cat([patches, pos_embed[:, -1:]], dim=1)
            x = x + pos_embed.to(x.dtype)
        return x, grid

    def forward_features(self, x: torch.Tensor, drop_path_rate: float | None = None) -> torch.Tensor:
        """Final normed tokens ``(batch, patches + 1, width)`` in causal order, class token last.

        ``drop_path_rate``, when given, is first written into the blocks' buffers (the rate of the last
        block; see :meth:`set_drop_path_rate`) and stays there; None keeps the current rates (the model's
        ``drop_path_rate`` until changed). Drop path acts in training mode only."""
        if not torch.jit.is_scripting() and drop_path_rate is not None:
            self.set_drop_path_rate(drop_path_rate)
        x, _ = self._embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """``token``: the class token (last); ``avg``: the mean of the patch tokens; ``""``: all tokens."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, -1]
        if pool_type == "avg":
            return x[:, :-1].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward_aux_head(self, features: torch.Tensor) -> torch.Tensor | None:
        """The aux head's logits from :meth:`forward_features`'s output (None without an aux head):
        per patch token (``aux_head="tokens"``, released) or of their mean (``"pooled"``, the paper)."""
        if self.head2 is None:
            return None
        patches = self.head_drop(features[:, :-1])
        if self.aux_head == "pooled":
            return self.head2(patches.mean(dim=1))
        return self.head2(patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits ``(batch, classes)`` (pooled features with ``num_classes=0``)."""
        features = self.forward_features(x)
        logits = self.forward_head(features)
        if not torch.jit.is_scripting():
            if self._with_aux:  # inside forward_train only
                return ModelOutput(logits, self.forward_aux_head(features))  # type: ignore[return-value]
        return logits

    def forward_train(self, x: torch.Tensor, drop_path_rate: float | None = None) -> ModelOutput:
        """Logits and aux logits for the De-focus loss (``defocus_scale.losses.defocus_loss``), with this
        drop-path rate (see :meth:`forward_features`). It runs through ``self(x)``, so module hooks (FSDP2's
        all-gathers, for one) run as for ``forward``."""
        if drop_path_rate is not None:
            self.set_drop_path_rate(drop_path_rate)
        self._with_aux = True
        try:
            return self(x)
        finally:
            self._with_aux = False

    @torch.no_grad()
    def set_drop_path_rate(self, rate: float) -> None:
        """Write the per-block rates (linear over depth up to ``rate`` at the last block) into the blocks'
        ``drop_path`` buffers; the blocks read them, so changing the rate never changes a compiled graph."""
        for block, block_rate in zip(self.blocks, drop_path_rates(float(rate), len(self.blocks))):
            block.drop_path.set(block_rate)

    def fp32_parameter_names(self) -> list[str]:
        """The family's precision plan: parameters that stay fp32 in the forward under bf16 mixed precision
        (``FP32_PARAMETERS``: name suffixes, e.g. the learned decays and rotary frequencies, which lose
        their meaning in bf16's 8 significant bits). The trainer applies it; the model stays plain."""
        suffixes = tuple(self.FP32_PARAMETERS)
        return [
            name
            for name, _ in self.named_parameters()
            if any(name == s or name.endswith("." + s) for s in suffixes)
        ]

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names exempt from weight decay: 1-D tensors and the bandpass parameters."""
        return {
            name
            for name, p in self.named_parameters()
            if p.ndim <= 1
            or name.endswith((".A_log", ".D", ".freq", ".lambda_hat", ".theta", "cls_token"))
            or name == "pos_embed"
        }

    # -- timm's model API -----------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return self.no_weight_decay_names()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward (``forward``, ``forward_features``,
        ``forward_intermediates``)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        """The main head, and the aux head when there is one."""
        return self.head if self.head2 is None else (self.head, self.head2)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New (freshly initialised) main and aux heads for ``num_classes`` (0: none, ``forward`` then gives
        the pooled features); ``global_pool`` None keeps the pooling."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.num_classes = num_classes

        def new_head() -> nn.Module:
            with torch.device(dd["device"]):
                head = make_head(self.embed_dim, num_classes, self.head_mlp_ratio).to(dtype=dd["dtype"])
            _init_linear(head)
            return head.train(self.training)

        self.head = new_head()
        self.head2 = new_head() if self.aux_head != "none" and num_classes > 0 else None

    @torch.jit.ignore
    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """Change the input resolution (and patch size: the patch embedding is resampled); the position
        embedding, if any, is resampled to the new grid (the class token's entry kept)."""
        prev_grid = self.patch_embed.grid_size
        if isinstance(patch_size, tuple | list) and patch_size[0] != patch_size[1]:
            raise ValueError(f"patch_size must be square, got {patch_size}")
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        grid = self.patch_embed.grid_size
        if self.pos_embed is not None and grid != prev_grid:
            patches = resample_abs_pos_embed(
                self.pos_embed[:, :-1], new_size=list(grid), old_size=list(prev_grid), num_prefix_tokens=0,
                verbose=True,
            )  # fmt: skip
            self.pos_embed = nn.Parameter(
                torch.cat([patches, self.pos_embed[:, -1:]], dim=1),
                requires_grad=self.pos_embed.requires_grad,
            )
        size = tuple(self.patch_embed.img_size)
        self.img_size = size[0] if size[0] == size[1] else size
        self.patch_size = self.patch_embed.patch_size[0]
        for info in self.feature_info:
            info["reduction"] = self.patch_size
        update_model_input_size(self, size, patch_size=patch_size)
        cfg = getattr(self, "pretrained_cfg", None)
        if cfg is not None:  # resolve_data_config(model=...) follows the new size
            self.pretrained_cfg = self.default_cfg = {**cfg, "input_size": (self.in_chans, *size)}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Block outputs (``indices``: the last n if an int, all if None, else those listed): the patch tokens
        as ``(B, C, H, W)`` maps (``NCHW``) or ``(B, patches, C)`` in causal order (``NLC``); with
        ``return_prefix_tokens`` each paired with the class token ``(B, 1, C)``. ``norm`` applies the final
        norm to them. Returns ``(forward_features output, intermediates)`` unless ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (height, width) = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        class_tokens = [y[:, -1:] for y in intermediates]
        patches = [y[:, :-1] for y in intermediates]
        if output_fmt == "NCHW":
            patches = [tokens_to_grid(y, height, width, self.token_order) for y in patches]
        outputs: list[Any] = list(zip(patches, class_tokens)) if return_prefix_tokens else patches
        if intermediates_only:
            return outputs
        return self.norm(x), outputs

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm, the heads); returns the kept
        indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """timm's ``pretrained=True, pretrained_cfg_overlay=dict(file=...)`` lands here: an exported
        safetensors file, a plain state dict or a released checkpoint (read without unpickling code), see
        :func:`defocus_scale.models.release.load_weights_into`."""
        from defocus_scale.models.release import load_weights_into

        load_weights_into(self, checkpoint_path)


def reject_scripting(module: nn.Module, operator: str) -> None:
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on every submodule: say why this one cannot be
    scripted instead of failing deep inside the operator."""
    raise RuntimeError(
        f"{type(module).__name__} cannot be compiled by TorchScript: {operator} dispatches in Python (custom "
        "autograd functions, torch.library ops, Triton). Use torch.compile or torch.export, or torch.fx "
        "(its mixers are leaf modules, see defocus_scale.models.registry)."
    )
