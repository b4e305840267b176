"""DeiT augmentation and evaluation preprocessing, built by timm from a DataConfig."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform

from .config import DataConfig


def _posterize(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, also for 0 bits: Pillow 13 rejects them; older Pillow and the TF reference
    RandAugment (which timm follows) keep no bit, a black image. ``rand-m9-mstd0.5-inc1`` reaches 0."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _augment_ops(transform: Callable) -> list:
    """The timm AugmentOps inside a composed transform (RandAugment ops, AutoAugment sub-policies)."""
    ops = []
    for step in getattr(transform, "transforms", []):
        ops += getattr(step, "ops", [])
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
    return ops


def train_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop, flip, RandAugment / colour jitter, normalise, random erasing."""
    transform = create_transform(
        input_size=cfg.image_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


def eval_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to image_size / eval_crop_pct, center crop image_size, normalise."""
    return create_transform(
        input_size=cfg.image_size,
        is_training=False,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        crop_pct=cfg.eval_crop_pct,
    )


def mixup_fn(cfg: DataConfig) -> Mixup | None:
    """timm Mixup/CutMix producing smoothed soft targets, or None when both alphas are zero."""
    if not cfg.mixup_active:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.label_smoothing,
        num_classes=cfg.num_classes,
    )
