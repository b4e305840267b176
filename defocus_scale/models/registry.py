"""One registry for every model variant: timm's.

Each family module calls :func:`register_family`, which writes the family's pretrained configs into the
module's ``default_cfgs`` (``generate_default_cfgs``) and registers one entry point per size with timm's
``register_model``; every entry point builds through timm's ``build_model_with_cfg``. So
``timm.create_model(name, ...)`` and :func:`create_model` are the same call, with timm's handling of
``pretrained`` / ``pretrained_cfg_overlay`` / ``features_only`` / ``checkpoint_path`` / ``device`` /
``dtype``.

The variants have no hosted weights; local ones load with
``create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` (an exported safetensors
file, a plain state dict or a released De-focus Mamba checkpoint, read by ``models.release``) or
``checkpoint_path=PATH`` (timm's loader: an exported file or a plain state dict, keys as ours).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

PAPER = "arXiv:2406.04342"


@dataclass(frozen=True)
class Family:
    name: str
    model_cls: type[nn.Module]
    sizes: dict[str, dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)


_FAMILIES: dict[str, Family] = {}


def default_cfg(
    classifier: str | tuple[str, ...], *, fixed_input_size: bool, **overrides: Any
) -> dict[str, Any]:
    """The data config of a variant: 224 px, the release's evaluation (resize the shorter side to 256/224 of
    the crop, bicubic, center crop; ImageNet mean/std), 1000 classes, no hosted weights (``custom_load``:
    local files go through the model's ``load_pretrained``)."""
    return {
        "url": "",
        "custom_load": True,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "fixed_input_size": fixed_input_size,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": classifier,
        "license": "apache-2.0",
        "paper_ids": PAPER,
        "paper_name": "Learning 1D Causal Visual Representation with De-focus Attention Networks",
        "origin_url": "https://github.com/OpenGVLab/De-focus-Attention-Networks",
        **overrides,
    }


def _classifier(kwargs: dict[str, Any]) -> str | tuple[str, ...]:
    heads = ("head", "head2") if kwargs.get("aux_head", "tokens") != "none" else ("head",)
    if kwargs.get("head_mlp_ratio", 0.0) > 0:  # Linear -> Tanh -> Linear: the last Linear classifies
        heads = tuple(f"{h}.2" for h in heads)
    return heads if len(heads) > 1 else heads[0]


def build_variant(
    model_cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """``build_model_with_cfg`` for one of our variants; an explicit ``img_size`` / ``in_chans`` becomes the
    pretrained config's ``input_size`` (so ``timm.data.resolve_data_config(model=m)`` follows it)."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if overlay.get("file"):  # timm resets custom_load for a given source; files go through load_pretrained
        overlay.setdefault("custom_load", True)
    if ("img_size" in kwargs or "in_chans" in kwargs) and "input_size" not in overlay:
        size = kwargs.get("img_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        overlay["input_size"] = (kwargs.get("in_chans", 3), *size)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=_unwrap_state_dict,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _unwrap_state_dict(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """For ``pretrained_cfg_overlay=dict(state_dict=...)``: a checkpoint dict's ``model_ema`` / ``model``
    entry, ``module.`` prefixes dropped (files go through ``load_pretrained`` instead)."""
    for key in ("model_ema", "state_dict_ema", "model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _entrypoint(name: str, family: Family, module: str, size_kwargs: dict[str, Any]) -> Any:
    defaults = {**size_kwargs, **family.defaults}

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_variant(family.model_cls, name, pretrained, **{**defaults, **kwargs})

    # timm names an entry point by its function's __name__ and files it under its module.
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module
    entrypoint.__doc__ = (
        f"{family.model_cls.__name__}({', '.join(f'{k}={v!r}' for k, v in defaults.items())})"
    )
    return entrypoint


def register_family(
    family: str, model_cls: type[nn.Module], sizes: dict[str, dict[str, Any]], module: str, **defaults: Any
) -> None:
    """Register ``{family}_{size}`` for every size as ``model_cls(**sizes[size], **defaults)`` in timm."""
    if family in _FAMILIES:
        raise ValueError(f"model family {family!r} is registered twice")
    entry = Family(family, model_cls, dict(sizes), dict(defaults))
    mod = sys.modules[module]
    cfgs = {}
    for size, size_kwargs in sizes.items():
        kwargs = {**size_kwargs, **defaults}
        cfgs[f"{family}_{size}"] = default_cfg(
            _classifier(kwargs), fixed_input_size=kwargs.get("pos_embed", False)
        )
    mod.default_cfgs = {**getattr(mod, "default_cfgs", {}), **generate_default_cfgs(cfgs)}
    for size, size_kwargs in sizes.items():
        name = f"{family}_{size}"
        function = _entrypoint(name, entry, module, size_kwargs)
        setattr(mod, name, function)
        register_model(function)
    _FAMILIES[family] = entry


def _variant(name: str) -> tuple[Family, str] | None:
    for family in _FAMILIES.values():
        for size in family.sizes:
            if name == f"{family.name}_{size}":
                return family, size
    return None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; an unknown name is an error listing ours."""
    if not timm.is_model(name.partition(".")[0]):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return timm.create_model(name, **kwargs)


def list_models(family: str | None = None) -> list[str]:
    """Names of our registered variants, optionally of one family (e.g. ``"defocus_mamba"``)."""
    families = [_FAMILIES[family]] if family in _FAMILIES else [] if family else list(_FAMILIES.values())
    return sorted(
        f"{f.name}_{size}" for f in families for size in f.sizes if timm.is_model(f"{f.name}_{size}")
    )


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments a variant is built with (a copy)."""
    found = _variant(name)
    if found is None:
        raise ValueError(f"unknown model {name!r}")
    family, size = found
    return {**family.sizes[size], **family.defaults}


def family_of(name: str) -> str:
    found = _variant(name)
    if found is None:
        raise ValueError(f"unknown model {name!r}")
    return found[0].name
