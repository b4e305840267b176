"""One registry for every model variant, mirrored into timm's.

Each variant is a (builder, default keyword arguments) pair. ``register_variant`` also creates a timm
entry point of the same name in the builder's module, so ``timm.create_model(name, **overrides)`` and
``defocus_scale.models.create_model(name, **overrides)`` build the same thing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from timm.models import register_model
from torch import nn


@dataclass(frozen=True)
class ModelVariant:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    family: str = ""


_VARIANTS: dict[str, ModelVariant] = {}
_TIMM_FACTORY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def register_variant(name: str, builder: Callable[..., nn.Module], family: str, **defaults: Any) -> None:
    """Register ``name`` as ``builder(**defaults)`` here and as a timm entry point."""
    if name in _VARIANTS:
        raise ValueError(f"model variant {name!r} is registered twice")
    _VARIANTS[name] = ModelVariant(name=name, builder=builder, defaults=dict(defaults), family=family)

    def entrypoint(pretrained: bool = False, **overrides: Any) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"{name}: no pretrained weights are bundled; load a released checkpoint with "
                "defocus_scale.models.load_official_checkpoint or an exported one with load_exported"
            )
        for timm_only in _TIMM_FACTORY_ARGS:  # timm's factory passes these to every entry point
            overrides.pop(timm_only, None)
        return create_model(name, **overrides)

    # timm names an entry point by its function's __name__ and files it under its module.
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = builder.__module__
    setattr(sys.modules[builder.__module__], name, entrypoint)
    register_model(entrypoint)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered variant; ``overrides`` replace its default keyword arguments."""
    try:
        variant = _VARIANTS[name]
    except KeyError:
        known = ", ".join(sorted(_VARIANTS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    kwargs = {**variant.defaults, **overrides}
    return variant.builder(**kwargs)


def list_models(family: str | None = None) -> list[str]:
    """Names of the registered variants, optionally of one family (e.g. ``"defocus_mamba"``)."""
    return sorted(n for n, v in _VARIANTS.items() if family is None or v.family == family)


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments a variant is built with (a copy)."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}")
    return dict(_VARIANTS[name].defaults)
