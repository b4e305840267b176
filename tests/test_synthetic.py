"""The built-in synthetic data: deterministic per (index, seed), batch == single images, learnable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defocus_scale.data.synthetic import synthetic_batch, synthetic_image

DATA = dict(num_classes=10, seed=0)


def test_batch_shapes_types_and_range():
    images, labels = synthetic_batch(7, 5, image_size=24, **DATA)
    assert images.shape == (5, 3, 24, 24) and images.dtype == torch.float32
    assert labels.shape == (5,) and labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert ((labels >= 0) & (labels < 10)).all()


def test_deterministic_in_index_and_seed_whatever_the_batch():
    images, labels = synthetic_batch(3, 6, image_size=16, **DATA)
    again, again_labels = synthetic_batch(3, 6, image_size=16, **DATA)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    singles = [synthetic_batch(3 + i, 1, image_size=16, **DATA) for i in range(6)]
    assert torch.equal(images, torch.cat([s[0] for s in singles]))
    assert torch.equal(labels, torch.cat([s[1] for s in singles]))
    shifted, _ = synthetic_batch(4, 6, image_size=16, **DATA)
    assert torch.equal(images[1:], shifted[:-1])
    other_seed, _ = synthetic_batch(3, 6, image_size=16, num_classes=10, seed=1)
    assert not torch.equal(images, other_seed)


def test_image_is_the_batch_picture_rounded_to_uint8():
    images, labels = synthetic_batch(11, 3, image_size=20, **DATA)
    for row in range(3):
        image, label = synthetic_image(11 + row, image_size=20, **DATA)
        assert image.mode == "RGB" and image.size == (20, 20)
        assert label == labels[row].item()
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        assert (pixels - images[row]).abs().max() <= 0.5 / 255.0 + 1e-6


def test_same_picture_at_any_resolution():
    fine, fine_labels = synthetic_batch(0, 40, image_size=64, **DATA)
    coarse, coarse_labels = synthetic_batch(0, 40, image_size=32, **DATA)
    other, _ = synthetic_batch(40, 40, image_size=32, **DATA)
    assert torch.equal(fine_labels, coarse_labels)
    # Only the pixel noise differs between resolutions; another sample differs far more.
    same_sample = (F.avg_pool2d(fine, 2) - coarse).abs().mean()
    other_sample = (other - coarse).abs().mean()
    assert same_sample < 0.4 * other_sample


def test_labels_cover_the_classes_evenly():
    _, labels = synthetic_batch(0, 2000, image_size=4, **DATA)
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 140 and counts.max() < 260  # 200 expected each


def test_classes_are_learnable_by_a_linear_model():
    torch.manual_seed(0)
    train_x, train_y = synthetic_batch(0, 600, image_size=16, **DATA)
    test_x, test_y = synthetic_batch(100_000, 300, image_size=16, **DATA)
    model = torch.nn.Linear(3 * 16 * 16, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        loss = F.cross_entropy(model(train_x.flatten(1)), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model(test_x.flatten(1)).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.35  # chance is 0.1


@pytest.mark.parametrize("kwargs", [dict(count=-1), dict(image_size=0), dict(num_classes=0)])
def test_bad_arguments_are_rejected(kwargs):
    args = dict(start=0, count=2, image_size=8, num_classes=10, seed=0) | kwargs
    with pytest.raises(ValueError):
        synthetic_batch(args.pop("start"), args.pop("count"), **args)
