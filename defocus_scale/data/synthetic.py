"""The built-in synthetic data set: procedurally drawn images whose class is easy to learn.

Each image is a noisy background (grey with a tint and a brightness ramp) with one Gabor patch on it: a
grating under a Gaussian window. The class sets the patch's hue and the grating's orientation; position,
size, frequency, phase, contrast, the background and the pixel noise are random. Everything is drawn in
coordinates normalised to the unit square, so the same index gives the same picture at any resolution.

Sample ``index`` under ``seed`` depends on nothing else: its parameters and noise come from a
NumPy generator seeded by a hash of ``(seed, index)``, so a batch equals the concatenation of its single
images whatever the batch boundaries are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# Per-sample random numbers, drawn in this order from the sample's own generator.
_PARAMS = (
    "label", "bg_grey", "bg_tint_r", "bg_tint_g", "bg_tint_b", "ramp_amount", "ramp_angle",
    "centre_x", "centre_y", "window", "orientation_jitter", "frequency", "phase", "contrast",
    "hue_jitter", "saturation", "value", "noise",
)  # fmt: skip
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_MASK64 = (1 << 64) - 1


def _sample_seed(seed: int, index: int) -> int:
    """SplitMix64 of (seed, index): well-spread generator seeds for neighbouring indices and seeds."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _draw_parameters(
    start: int, count: int, image_size: int, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Uniform [0, 1) parameters ``{name: (count,)}`` and standard normal noise ``(count, 3, H, W)``."""
    uniforms = np.empty((count, len(_PARAMS)), dtype=np.float32)
    noise = np.empty((count, 3, image_size, image_size), dtype=np.float32)
    for row in range(count):
        generator = np.random.Generator(np.random.PCG64(_sample_seed(seed, start + row)))
        uniforms[row] = generator.random(len(_PARAMS), dtype=np.float32)
        noise[row] = generator.standard_normal((3, image_size, image_size), dtype=np.float32)
    return {name: uniforms[:, i] for i, name in enumerate(_PARAMS)}, noise


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``(N,)`` HSV in [0, 1] to ``(N, 3)`` RGB (the standard piecewise-linear formula)."""
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32) + hue[:, None] * 6.0) % 6.0
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[:, None] - value[:, None] * saturation[:, None] * ramp


def class_orientation(labels: np.ndarray) -> np.ndarray:
    """Grating orientation (radians in [0, pi)) of each class: golden-ratio spaced, so that classes whose
    hues are neighbours get far-apart orientations."""
    return (math.pi * np.modf(labels * _GOLDEN)[0]).astype(np.float32)


def class_hue(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Patch hue in [0, 1) of each class: evenly spaced around the colour wheel."""
    return (labels / num_classes).astype(np.float32)


def synthetic_batch(
    start: int, count: int, *, image_size: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(count, 3, image_size, image_size)`` float32 in [0, 1] and labels ``(count,)`` int64 of
    the samples ``start .. start + count - 1``."""
    if count < 0 or image_size < 1 or num_classes < 1:
        raise ValueError(f"need count >= 0, image_size >= 1, num_classes >= 1; got {count}, {image_size}, "
                         f"{num_classes}")  # fmt: skip
    # NumPy rather than torch: its elementwise maths is single-threaded, whereas torch's intra-op threads
    # cost more than they save on images this small (ten times more on a loaded machine).
    p, noise = _draw_parameters(start, count, image_size, seed)
    labels = np.minimum((p["label"] * num_classes).astype(np.int64), num_classes - 1)

    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    x = coords.reshape(1, 1, image_size)  # (1, 1, W): x runs along the width
    y = coords.reshape(1, image_size, 1)  # (1, H, 1)

    def per_sample(values: np.ndarray) -> np.ndarray:
        return values.reshape(-1, 1, 1).astype(np.float32)

    # Background: a tinted grey with a linear brightness ramp in a random direction.
    grey = 0.25 + 0.5 * p["bg_grey"]
    tint = np.stack([p["bg_tint_r"], p["bg_tint_g"], p["bg_tint_b"]], axis=1) * 0.16 - 0.08
    ramp_angle = p["ramp_angle"] * 2.0 * math.pi
    ramp = per_sample(p["ramp_amount"] * 0.3 - 0.15) * (
        (x - 0.5) * per_sample(np.cos(ramp_angle)) + (y - 0.5) * per_sample(np.sin(ramp_angle))
    )
    background = (grey[:, None] + tint).reshape(-1, 3, 1, 1) + ramp[:, None]

    # Patch: a Gabor grating whose hue and orientation carry the class.
    dx = x - per_sample(0.3 + 0.4 * p["centre_x"])
    dy = y - per_sample(0.3 + 0.4 * p["centre_y"])
    window_sigma = per_sample(0.14 + 0.12 * p["window"])
    window = np.exp(-(dx * dx + dy * dy) / (2.0 * window_sigma * window_sigma))
    orientation = class_orientation(labels) + (p["orientation_jitter"] - 0.5) * 0.2
    along = dx * per_sample(np.cos(orientation)) + dy * per_sample(np.sin(orientation))
    cycles_per_image = per_sample(3.0 + 2.0 * p["frequency"])
    phase = per_sample(p["phase"] * 2.0 * math.pi)
    grating = 0.5 + 0.5 * np.cos(2.0 * math.pi * cycles_per_image * along + phase)
    alpha = (per_sample(0.75 + 0.25 * p["contrast"]) * window * grating)[:, None]  # (N, 1, H, W)
    hue = np.modf(class_hue(labels, num_classes) + (p["hue_jitter"] - 0.5) * 0.04 + 1.0)[0]
    colour = _hsv_to_rgb(hue, 0.75 + 0.25 * p["saturation"], 0.7 + 0.3 * p["value"]).reshape(-1, 3, 1, 1)

    images = background * (1.0 - alpha) + colour * alpha
    images += noise * (0.02 + 0.06 * p["noise"]).reshape(-1, 1, 1, 1)
    images = np.clip(images, 0.0, 1.0, out=images).astype(np.float32, copy=False)
    return torch.from_numpy(images), torch.from_numpy(labels)


def synthetic_image(index: int, *, image_size: int, num_classes: int, seed: int) -> tuple[Image.Image, int]:
    """Sample ``index`` as an RGB PIL image (the batch version rounded to uint8) and its label."""
    images, labels = synthetic_batch(index, 1, image_size=image_size, num_classes=num_classes, seed=seed)
    pixels = np.rint(images[0].numpy() * 255.0).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels)), int(labels[0])
