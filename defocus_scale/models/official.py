"""Loading the released De-focus Mamba checkpoints into our model.

The architecture is read off the tensor shapes; ``group_norm_size``, ``rope_scale`` and
``delta_scale`` are not stored in the checkpoints and must be passed in (Large 384-px: 64, 4.0, 2.0).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from defocus_scale.models.defocus_mamba import DefocusMamba

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the released De-focus Mamba layout."""


def _read_state_dict(source: str | Path | Mapping[str, object], use_ema: bool) -> dict[str, torch.Tensor]:
    name = "the given state dict"
    if isinstance(source, str | Path):
        name = str(source)
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {name} does not exist")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(
                f"checkpoint {name} could not be read (corrupt or not a torch file): {exc}"
            ) from exc
    if not isinstance(source, Mapping):
        raise CheckpointError(f"{name} holds a {type(source).__name__}, expected a state dict")
    wanted = "model_ema" if use_ema else "model"
    if wanted in source:
        source = source[wanted]
    elif use_ema:
        raise CheckpointError(f"{name} has no 'model_ema' entry (keys: {sorted(source)[:10]})")
    state = {}
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    return state


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


def load_official_checkpoint(
    path_or_state_dict: str | Path | Mapping[str, object],
    group_norm_size: int = 64,
    rope_scale: float = 1.0,
    delta_scale: float = 1.0,
    img_size: int = 224,
    *,
    use_ema: bool = False,
    backend: str = "auto",
) -> DefocusMamba:
    """Build our De-focus Mamba from a released checkpoint (a raw state dict, or a dict holding it under
    ``model`` / ``model_ema``) and return it in eval mode, giving the published logits.

    Any key the released layout does not have, or lacks, is an error naming the keys.
    """
    state = _read_state_dict(path_or_state_dict, use_ema)
    arch = infer_architecture(state)
    with torch.device("meta"):
        model = DefocusMamba(
            **arch, group_size=group_norm_size, rope_scale=rope_scale, delta_scale=delta_scale,
            img_size=img_size, backend=backend,
        )  # fmt: skip
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the inferred architecture {arch}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in model.state_dict().items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            got, want = tuple(state[key].shape), tuple(tensor.shape)
            raise CheckpointError(f"key {key!r} has shape {got}, expected {want}")
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, assign=True)
    return model.eval()
