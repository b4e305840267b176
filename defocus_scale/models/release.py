"""Reading weight files without running their code: exported safetensors, plain state dicts, and the
checkpoints the De-focus release's training script saves (``{"model", "model_ema", "optimizer", ...,
"config"}``, with ``config`` a yacs ``CfgNode``).

Torch files are unpickled by a restricted unpickler: it resolves only tensor and storage rebuilders, torch
dtypes/sizes/devices, plain containers, numpy scalars and the release's ``yacs.config.CfgNode``, which is read
as a plain dict of its values (yacs need not be installed, and none of its code runs). Any other global is
refused with an error naming it. The release's config supplies what the tensors cannot tell:
``group_norm_size``, ``rope_scale_factor``, ``delta_scale_factor``, the image size and the token order
(``MODEL.patch_embed_change_res``: the release's quadrant order, same keys as raster order), see
:func:`release_settings`; a model whose settings differ is refused rather than loaded wrong.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import json
import pickle
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from timm.models import adapt_input_conv
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


class ReleaseConfig(dict):
    """The release's yacs ``CfgNode``, as a plain dict of its values (yacs' own bookkeeping dropped)."""

    def __setstate__(self, state: Any) -> None:  # __immutable__, __new_allowed__, ...: not kept
        pass


_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("_codecs", "encode"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "strided"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}
_CONFIG_GLOBALS = {("yacs.config", "CfgNode"): ReleaseConfig}


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) name builtins the Python 2 way.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _CONFIG_GLOBALS:
            return _CONFIG_GLOBALS[module, name]
        if (module, name) in _ALLOWED:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedGlobal(module, name)


# torch.load's ``pickle_module``: it subclasses our Unpickler (adding storages) and calls load for old files.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="defocus_scale.restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` with the restricted unpickler (see the module docstring), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False)
    except RefusedGlobal as exc:
        raise CheckpointError(
            f"checkpoint {path} asks the unpickler for {exc.qualified}, which is refused: only tensors, "
            "plain containers and the release's yacs config are read, so that no code in the file runs. "
            "Re-save its "
            "weights alone, e.g. torch.save(checkpoint['model'], ...)"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} could not be read (truncated, corrupt or not a torch file): {exc}"
        ) from exc


@dataclass
class Checkpoint:
    """Weights of one file: ``weights`` (live), ``ema`` (or None), the release's ``config`` (plain dicts) and
    an export's safetensors ``metadata``."""

    source: str
    kind: str  # "export" | "safetensors" | "release" | "state_dict"
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def state_dict(self, use_ema: bool) -> dict[str, torch.Tensor]:
        if use_ema and self.ema is None:
            raise CheckpointError(f"{self.source} has no EMA weights ('model_ema')")
        return self.ema if use_ema else self.weights

    @property
    def overrides(self) -> dict[str, Any]:
        """An export's model keyword arguments."""
        return json.loads(self.metadata["overrides"]) if "overrides" in self.metadata else {}


def _tensors(name: str, entry: Any) -> dict[str, torch.Tensor]:
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{name} holds a {type(entry).__name__}, expected a state dict")
    state = {}
    for key, value in entry.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[str(key).removeprefix("module.")] = value
    return state


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def read_checkpoint(source: str | Path | Mapping[str, Any]) -> Checkpoint:
    """The weights of a safetensors file, a torch file or an in-memory dict: a raw state dict, or a dict
    holding one under ``model`` / ``state_dict`` (and ``model_ema`` / ``state_dict_ema``), as the release
    and timm save them. ``module.`` prefixes are dropped."""
    name = "the given state dict" if isinstance(source, Mapping) else str(source)
    if not isinstance(source, Mapping) and str(source).endswith(".safetensors"):
        try:
            with safe_open(str(source), framework="pt") as handle:
                metadata = handle.metadata() or {}
                weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            if not Path(source).is_file():
                raise FileNotFoundError(f"checkpoint {source} does not exist") from None
            raise CheckpointError(f"checkpoint {source} is not a readable safetensors file: {exc}") from exc
        kind = "export" if metadata.get("format", "").startswith("defocus-scale/export") else "safetensors"
        return Checkpoint(name, kind, weights, metadata=metadata)
    loaded = source if isinstance(source, Mapping) else load_torch_file(source)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{name} holds a {type(loaded).__name__}, expected a state dict")
    live_key = next((k for k in ("model", "state_dict") if k in loaded), None)
    ema_key = next((k for k in ("model_ema", "state_dict_ema") if k in loaded), None)
    if live_key is None and ema_key is None:
        return Checkpoint(name, "state_dict", _tensors(name, loaded))
    ema = _tensors(f"{name}['{ema_key}']", loaded[ema_key]) if ema_key else None
    weights = _tensors(f"{name}['{live_key}']", loaded[live_key]) if live_key else ema
    config = _plain(loaded["config"]) if isinstance(loaded.get("config"), Mapping) else None
    return Checkpoint(
        name,
        "release" if config is not None or ema_key == "model_ema" else "state_dict",
        weights,
        ema,
        config,
    )


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def release_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Model keyword arguments the release's config fixes and the tensors do not: ``group_size``,
    ``rope_scale``, ``delta_scale``, ``token_order`` and ``img_size``. Configurations our De-focus Mamba
    cannot reproduce are refused, naming the setting."""
    if config is None:
        return {}
    refusals = {
        "MODEL.TYPE": lambda v: v not in (None, "mamba"),
        "MODEL.use_pos_embed": lambda v: bool(v),
        "MODEL.head_type": lambda v: v is not None and "cls" not in str(v),
    }
    for key, refused in refusals.items():
        if refused(_get(config, key)):
            raise CheckpointError(
                f"the release config's {key}={_get(config, key)!r} is not the released De-focus "
                "Mamba layout (class-token head, no position embedding) these models reproduce"
            )
    settings = {
        "group_size": _get(config, "MODEL.MAMBA.group_norm_size"),
        "rope_scale": _get(config, "MODEL.MAMBA.rope_scale_factor"),
        "delta_scale": _get(config, "MODEL.MAMBA.delta_scale_factor"),
        "img_size": _get(config, "DATA.IMG_SIZE"),
    }
    change_res = _get(config, "MODEL.patch_embed_change_res")
    if change_res is not None:
        settings["token_order"] = "quadrant" if change_res else "raster"
    return {k: v for k, v in settings.items() if v is not None}


# Settings that shape the forward pass but not the tensors, and where a model keeps them.
_FORWARD_SETTINGS = {
    "group_size": lambda m: _mixer_attr(m, "group_size"),
    "rope_scale": lambda m: _mixer_attr(m, "rope_scale"),
    "delta_scale": lambda m: _mixer_attr(m, "delta_scale"),
    "token_order": lambda m: getattr(m, "token_order", None),
    "decay_mode": lambda m: _mixer_attr(m, "decay_mode"),
    "causal": lambda m: _mixer_attr(m, "causal"),
}
_RELEASE_NAMES = {
    "group_size": "MODEL.MAMBA.group_norm_size",
    "rope_scale": "MODEL.MAMBA.rope_scale_factor",
    "delta_scale": "MODEL.MAMBA.delta_scale_factor",
    "token_order": "MODEL.patch_embed_change_res",
}


def _mixer_attr(model: nn.Module, name: str) -> Any:
    blocks = getattr(model, "blocks", None)
    return getattr(blocks[0].mixer, name, None) if blocks is not None and len(blocks) else None


def check_settings(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Refuse a model whose forward-shaping settings differ from what the file says it was trained with
    (the release's config, an export's keyword arguments)."""
    wanted = {**release_settings(checkpoint.config), **checkpoint.overrides}
    for key, read in _FORWARD_SETTINGS.items():
        have = read(model)
        if key in wanted and have is not None and wanted[key] != have:
            origin = (
                f"its config's {_RELEASE_NAMES[key]}"
                if checkpoint.config and key in _RELEASE_NAMES
                else "its export metadata"
            )
            raise CheckpointError(
                f"{checkpoint.source} was trained with {key}={wanted[key]!r} ({origin}); the "
                f"model has {key}={have!r}: build it with {key}={wanted[key]!r}"
            )


def load_weights_into(model: nn.Module, path: str | Path, use_ema: bool = True) -> list[str]:
    """Load a file's weights into ``model`` as timm's ``load_pretrained`` would: the EMA weights when the file
    has them (timm's default for files), the input convolution adapted to ``model.in_chans`` (timm's
    ``adapt_input_conv``), the heads left freshly initialised when their class count differs. Any other
    missing, unexpected or misshapen tensor is an error naming it. Returns the names left as they were."""
    checkpoint = read_checkpoint(path)
    check_settings(model, checkpoint)
    state = dict(checkpoint.ema if use_ema and checkpoint.ema is not None else checkpoint.weights)
    own = model.state_dict()
    conv = "patch_embed.proj.weight"
    if conv in state and conv in own and state[conv].shape[1] != own[conv].shape[1]:
        state[conv] = adapt_input_conv(own[conv].shape[1], state[conv])
    kept = []
    for key in list(state):
        if key.startswith(("head.", "head2.")) and key in own and state[key].shape != own[key].shape:
            del state[key]  # another class count: a fresh head, as timm does for its classifier
            kept.append(key)
    kept += [k for k in own if k.startswith(("head.", "head2.")) and k not in state and k not in kept]
    missing = sorted(set(own) - set(state) - set(kept))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{checkpoint.source} does not fit {type(model).__name__}: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, shapes differ for "
            f"{[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:4]]}"
        )
    model.load_state_dict(state, strict=False)
    return sorted(kept)
