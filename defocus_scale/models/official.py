"""Loading the released De-focus Mamba checkpoints into our model.

The architecture is read off the tensor shapes; ``group_norm_size``, ``rope_scale``, ``delta_scale``, the
image size and the token order are not in the tensors: they come from the release's config when the file
holds it (the training script's checkpoints do), else from the arguments (the release's defaults: 64, 1.0,
1.0, 224, raster order; Large 384-px: 64, 4.0, 2.0, 384). Files are read without unpickling code
(:mod:`defocus_scale.models.release`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defocus_scale.models.defocus_mamba import MAMBA_SIZES, DefocusMamba
from defocus_scale.models.registry import create_model
from defocus_scale.models.release import Checkpoint, CheckpointError, read_checkpoint, release_settings

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
RELEASE_DEFAULTS: dict[str, Any] = dict(group_size=64, rope_scale=1.0, delta_scale=1.0, img_size=224,
                                        token_order="raster")  # fmt: skip

__all__ = ["CheckpointError", "infer_architecture", "load_official_checkpoint", "release_model_kwargs"]


def _require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"not a De-focus Mamba checkpoint: missing key {key!r}")
    return state[key]


def infer_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Model keyword arguments implied by a released state dict's tensor shapes."""
    proj = _require(state, "patch_embed.proj.weight")
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    block_ids = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))}
    if not block_ids:
        raise CheckpointError("not a De-focus Mamba checkpoint: no blocks.{i}.* keys")
    depth = max(block_ids) + 1
    if block_ids != set(range(depth)):
        gaps = sorted(set(range(depth)) - block_ids)
        raise CheckpointError(f"blocks are not numbered 0..{depth - 1}: missing block(s) {gaps}")
    inner_dim = _require(state, "blocks.0.mixer.in_proj.weight").shape[0] // 2
    state_size = _require(state, "blocks.0.mixer.A_log").shape[1]
    dt_rank = _require(state, "blocks.0.mixer.dt_proj.weight").shape[1]
    conv_kernel = _require(state, "blocks.0.mixer.conv1d.weight").shape[2]
    if "head.weight" in state:
        num_classes, head_mlp_ratio = state["head.weight"].shape[0], 0.0
    elif "head.0.weight" in state:
        num_classes = _require(state, "head.2.weight").shape[0]
        head_mlp_ratio = state["head.0.weight"].shape[0] / embed_dim
    else:
        raise CheckpointError("not a De-focus Mamba checkpoint: no 'head.weight' nor 'head.0.weight'")
    aux = "head2.weight" in state or "head2.0.weight" in state
    return dict(
        embed_dim=embed_dim, depth=depth, inner_dim=inner_dim, state_size=state_size, dt_rank=dt_rank,
        conv_kernel=conv_kernel, rotary="blocks.0.mixer.freq" in state, num_classes=num_classes,
        patch_size=patch_size, in_chans=in_chans, head_mlp_ratio=head_mlp_ratio,
        aux_head="tokens" if aux else "none",
    )  # fmt: skip


def release_model_kwargs(
    checkpoint: Checkpoint, *, use_ema: bool = False, **explicit: Any
) -> tuple[str, dict]:
    """``(variant, keyword arguments)`` that rebuild a released checkpoint's model with ``create_model``.

    ``explicit`` settings (``group_size``, ``rope_scale``, ``delta_scale``, ``img_size``,
    ``token_order``; None means unset) fill what the file's config does not say; contradicting its config
    is an error (except ``img_size``: the model takes other sizes)."""
    arch = infer_architecture(checkpoint.state_dict(use_ema))
    from_config = release_settings(checkpoint.config)
    settings = {**RELEASE_DEFAULTS, **from_config}
    for key, value in explicit.items():
        if value is None:
            continue
        if key in from_config and from_config[key] != value and key != "img_size":
            raise CheckpointError(f"{key}={value!r} contradicts {checkpoint.source}'s release config, "
                                  "which says "
                                  f"{from_config[key]!r}")  # fmt: skip
        settings[key] = value
    family = "defocus_mamba" if arch["rotary"] else "mamba"
    shape = (arch["embed_dim"], arch["depth"])
    size = next((s for s, kw in MAMBA_SIZES.items() if (kw["embed_dim"], kw["depth"]) == shape), "base")
    return f"{family}_{size}", {**arch, **settings}


def materialize_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (the drop-path rates) of a model built on meta and loaded with ``assign``."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    if hasattr(model, "set_drop_path_rate"):
        model.set_drop_path_rate(model.drop_path_rate)


def load_official_checkpoint(
    path_or_state_dict: str | Path | Mapping[str, object],
    group_norm_size: int | None = None,
    rope_scale: float | None = None,
    delta_scale: float | None = None,
    img_size: int | None = None,
    *,
    use_ema: bool = False,
    backend: str = "auto",
    token_order: str | None = None,
) -> DefocusMamba:
    """Build our De-focus Mamba from a released checkpoint (a raw state dict, or a dict holding it under
    ``model`` / ``model_ema``, with or without the release's config) and return it in eval mode, giving the
    published logits.

    Any key the released layout does not have, or lacks, is an error naming the keys.
    """
    checkpoint = read_checkpoint(path_or_state_dict)
    name, kwargs = release_model_kwargs(
        checkpoint, use_ema=use_ema, group_size=group_norm_size, rope_scale=rope_scale,
        delta_scale=delta_scale, img_size=img_size, token_order=token_order,
    )  # fmt: skip
    state = checkpoint.state_dict(use_ema)
    with torch.device("meta"):
        model = create_model(name, backend=backend, **kwargs)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the inferred architecture {kwargs}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in model.state_dict().items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            got, want = tuple(state[key].shape), tuple(tensor.shape)
            raise CheckpointError(f"key {key!r} has shape {got}, expected {want}")
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, assign=True)
    materialize_meta_buffers(model)
    return model.eval()
