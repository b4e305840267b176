"""The FSDP2 trainer: plain torch.distributed, launched by ``torchrun -m defocus_scale.train ...``,
``defocus-scale train ...`` or the orchestration (Ray) through :func:`train_in_process_group`.

* ``load_train_config(overrides) -> TrainConfig`` (Hydra compose of ``configs/train.yaml``);
* ``train(cfg, hooks=None, ...) -> dict``: the loop (``loop.py``);
* ``export_checkpoint(ckpt, out, ema=False)`` / ``load_exported(path)``: single-file inference weights.
"""

from __future__ import annotations

from typing import Any

from defocus_scale.train.config import (
    ConfigError,
    TrainConfig,
    compose_train_config,
    load_train_config,
    split_orchestration,
    to_train_config,
)
from defocus_scale.train.export import export_checkpoint, load_exported
from defocus_scale.train.loop import TrainingHooks, train
from defocus_scale.train.optim import param_groups

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainingHooks",
    "export_checkpoint",
    "load_exported",
    "load_train_config",
    "param_groups",
    "split_orchestration",
    "to_train_config",
    "train",
    "train_in_process_group",
]


def train_in_process_group(cfg: dict[str, Any], hooks: TrainingHooks | None = None) -> dict[str, Any]:
    """The orchestration's entry, inside an initialised process group: ``cfg`` (plain containers) is merged
    onto the defaults of ``configs/train.yaml``. A ``model`` section given replaces the default model
    entirely (its ``overrides`` are keyword arguments of that model only), and a ``data`` section the
    default data (the built-in synthetic set)."""
    from omegaconf import OmegaConf

    base = split_orchestration(compose_train_config())[1]
    if "model" in cfg:
        base.pop("model", None)
    if "data" in cfg:
        base.pop("data", None)
        base.pop("synthetic_data", None)
    return train(to_train_config(OmegaConf.merge(base, cfg)), hooks=hooks)
