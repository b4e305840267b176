"""DeiT augmentation and evaluation preprocessing, built by timm from a DataConfig.

The per-image transforms (crop, flip, RandAugment; resize and center crop) run in DataLoader workers and
end in uint8 tensors, as timm's own prefetching loader has them: a quarter of float32's bytes to ship
through shared memory. Normalisation, random erasing and Mixup/CutMix follow on the batch, on the
device it goes to (:class:`BatchFinisher`), in the order the DeiT recipe applies them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

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
    """RandomResizedCrop, flip, RandAugment / colour jitter, to a uint8 (3, S, S) tensor.

    Normalisation and random erasing come later, per batch: see :class:`BatchFinisher`.
    """
    transform = create_transform(
        input_size=cfg.image_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        use_prefetcher=True,  # timm's name for "stop at uint8 tensors; normalise and erase on the batch"
    )
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


def eval_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to image_size / eval_crop_pct, center crop image_size, to a uint8 (3, S, S) tensor."""
    return create_transform(
        input_size=cfg.image_size,
        is_training=False,
        interpolation=cfg.interpolation,
        crop_pct=cfg.eval_crop_pct,
        use_prefetcher=True,
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


def to_model_input(
    images: torch.Tensor, device: torch.device | str, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B, 3, S, S) images as normalised float32 on ``device``: ``(x / 255 - mean) / std``.

    The copy to the device moves the uint8 bytes (non-blocking from pinned memory); the conversion
    and normalisation happen there, in place.
    """
    images = images.to(device, non_blocking=True).float()
    scale = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    shift = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    return images.sub_(shift).div_(scale)


class BatchFinisher:
    """The batch half of the recipe, on the batch's device: normalise, then (training) random erasing
    and Mixup/CutMix with label smoothing, drawn from a per-batch seed (the caller's global generators
    are left as they were)."""

    def __init__(self, cfg: DataConfig, *, train: bool) -> None:
        self.cfg, self.train = cfg, train
        self.mixer = mixup_fn(cfg) if train else None
        self._erasers: dict[torch.device, RandomErasing] = {}

    def _eraser(self, device: torch.device) -> RandomErasing | None:
        if not self.train or self.cfg.reprob <= 0:
            return None
        if device not in self._erasers:
            self._erasers[device] = RandomErasing(
                probability=self.cfg.reprob, mode=self.cfg.remode, max_count=self.cfg.recount, device=device
            )
        return self._erasers[device]

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, seed: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float32 images, targets)`` on ``device``: soft (B, classes) targets under Mixup/CutMix."""
        images = to_model_input(images, device, self.cfg.mean, self.cfg.std)
        targets = labels.to(images.device, non_blocking=True)
        eraser = self._eraser(images.device)
        if eraser is None and self.mixer is None:
            return images, targets
        with seeded_global_rngs(seed, images.device):
            if eraser is not None:
                images = eraser(images)
            if self.mixer is not None:
                if len(images) % 2 == 0:
                    images, targets = self.mixer(images, targets)
                else:  # timm mixes pairs; an odd final batch (drop_last=False) gets smoothing only
                    targets = mixup_target(targets, self.mixer.num_classes, 1.0, self.mixer.label_smoothing)
        return images, targets


def seed_global_rngs(seed: int) -> None:
    """timm's transforms, RandomErasing and Mixup draw from the global random, numpy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it queues CUDA seeding, slowly


@contextlib.contextmanager
def seeded_global_rngs(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed the global generators (and a CUDA ``device``'s) for a block; restore their states after."""
    cuda = device is not None and device.type == "cuda"
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if cuda else []):
        try:
            seed_global_rngs(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
