"""Training/eval loaders: exactly-once through DataLoader workers, augmentation outputs, Mixup, real data."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from test_stream import all_keys, write_shards

from defocus_scale.data.config import DataConfig
from defocus_scale.data.loader import _derived_seed, build_eval_loader, build_train_loader
from defocus_scale.data.stream import iter_shard
from defocus_scale.data.transforms import eval_transform, mixup_fn, seed_global_rngs, train_transform

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _config(source: Path, **overrides) -> DataConfig:
    options = dict(source=str(source), eval_source=str(source), num_classes=3, image_size=16, batch_size=4,
                   workers=2, shuffle_buffer=5, open_shards=2, mixup=0.0, cutmix=0.0, drop_last=False)
    return DataConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("loader") / "shards"
    write_shards(directory)
    return directory


@pytest.mark.parametrize(("old", "new"), [((2, 2), (3, 1)), ((3, 1), (2, 2))])
def test_train_loader_exactly_once_across_world_and_worker_changes(shard_dir: Path, old, new) -> None:
    """(world size, workers) changes mid-epoch; prefetching workers must not make samples vanish."""
    rng = np.random.default_rng(sum(old))
    (old_world, old_workers), (new_world, new_workers) = old, new
    delivered: list[str] = []
    states = []
    for rank in range(old_world):
        loader = build_train_loader(_config(shard_dir, workers=old_workers), rank=rank, world_size=old_world,
                                    seed=11)
        # Stop after a few batches while the workers have read ahead; the state must not count that.
        for _, _, keys in itertools.islice(loader.batches_with_keys(), int(rng.integers(0, 4))):
            delivered += keys
        states.append(json.loads(json.dumps(loader.state_dict())))
    for rank in range(new_world):
        loader = build_train_loader(_config(shard_dir, workers=new_workers), rank=rank, world_size=new_world,
                                    seed=11)
        loader.load_state_dict(states)
        delivered += [k for _, _, keys in loader.batches_with_keys() for k in keys]
        assert loader.stats()["samples_remaining"] == 0
    assert Counter(delivered) == Counter(all_keys())


def test_batches_shapes_dtypes_and_end_of_epoch(shard_dir: Path) -> None:
    loader = build_train_loader(_config(shard_dir, drop_last=True), rank=0, world_size=1, seed=0)
    assert loader.batches_remaining() == 14  # two workers: 28 samples each, 7 full batches each
    batches = list(loader)
    assert len(batches) == len(all_keys()) // 4
    for images, targets in batches:
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
        assert targets.dtype == torch.int64 and targets.shape == (4,)
    stats = loader.stats()
    assert (stats["bad_shards"], stats["bad_samples"], stats["samples_remaining"]) == ([], 0, 0)
    assert loader.batches_remaining() == 0
    assert list(loader) == []  # the epoch is spent until set_epoch
    loader.set_epoch(1)
    assert len(list(loader)) == len(batches)


def test_mixup_gives_smoothed_soft_targets(shard_dir: Path) -> None:
    cfg = _config(shard_dir, mixup=0.8, cutmix=1.0, label_smoothing=0.1, workers=0)
    images, targets = next(iter(build_train_loader(cfg, rank=0, world_size=1, seed=0)))
    assert images.shape == (4, 3, 16, 16) and targets.shape == (4, 3) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.min() >= 0.1 / 3 - 1e-6  # label smoothing floor
    assert mixup_fn(_config(shard_dir)) is None


def test_augmentation_is_deterministic_and_spares_the_callers_generators(shard_dir: Path) -> None:
    cfg = _config(shard_dir, workers=0, mixup=0.8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = next(iter(build_train_loader(cfg, rank=0, world_size=1, seed=4)))
    assert torch.equal(torch.rand(3), expected)
    again = next(iter(build_train_loader(cfg, rank=0, world_size=1, seed=4)))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_epoch = next(iter(build_train_loader(cfg, rank=0, world_size=1, seed=4, epoch=1)))
    assert not torch.equal(first[0], other_epoch[0])


def test_repeated_augmentation_spreads_views_over_batches_and_epochs(shard_dir: Path) -> None:
    """DeiT's RASampler semantics: 3 views of each sample, in different batches; an epoch holds about as
    many views as the data has samples, so 3 epochs make one pass."""
    cfg = _config(shard_dir, repeated_aug=3, batch_size=6, workers=2, shuffle_buffer=12)
    views: Counter = Counter()
    for epoch in range(3):
        loader = build_train_loader(cfg, rank=0, world_size=1, seed=0, epoch=epoch)
        planned = loader.batches_remaining()
        batches = list(loader.batches_with_keys())
        assert len(batches) == planned
        shared = sum(len(set(keys)) < len(keys) for _, _, keys in batches)
        assert shared <= len(batches) // 4  # views of a sample mostly in different batches (random draws)
        epoch_views = Counter(k for _, _, keys in batches for k in keys)
        assert set(epoch_views.values()) == {3}  # every sample of the epoch gives its 3 views in it
        assert abs(sum(epoch_views.values()) - len(all_keys())) <= 3  # ~ dataset-size views
        assert not views.keys() & epoch_views.keys()  # the 3 epochs hold disjoint thirds of the data
        views += epoch_views
        first = next(b for b in batches if len(set(b[2])) == len(b[2]))
        assert not torch.equal(first[0][0], first[0][1])
    assert set(views) == set(all_keys()) and set(views.values()) == {3}


@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_loader_covers_every_sample_once(shard_dir: Path, world_size: int) -> None:
    keys = []
    for rank in range(world_size):
        for images, labels, batch_keys in build_eval_loader(_config(shard_dir), rank=rank,
                                                            world_size=world_size).batches_with_keys():
            assert images.shape[1:] == (3, 16, 16) and labels.dtype == torch.int64
            assert len(images) == len(labels) == len(batch_keys) <= 4
            keys += batch_keys
    assert sorted(keys) == sorted(all_keys())


def test_transforms_follow_the_config(shard_dir: Path) -> None:
    from PIL import Image

    cfg = _config(shard_dir, image_size=24)
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    for transform in (train_transform(cfg), eval_transform(cfg)):
        output = transform(image)
        assert output.shape == (3, 24, 24) and output.dtype == torch.uint8  # normalised per batch, later
    with pytest.raises(ValueError, match="batch_size"):
        _config(shard_dir, batch_size=0)


def test_randaugment_posterize_at_full_magnitude_does_not_crash(shard_dir: Path) -> None:
    """rand-m9-mstd0.5-inc1 draws magnitude 10 now and then: 0 bits kept, which Pillow 13 rejects."""
    from PIL import Image

    from defocus_scale.data.transforms import _augment_ops

    ops = _augment_ops(train_transform(_config(shard_dir)))
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0.0
    out = posterize(Image.new("RGB", (9, 7), (200, 100, 50)))
    assert out.size == (9, 7) and out.getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.mark.skipif(not (REAL_DATA / "hymenoptera").is_dir(), reason="shared real data absent")
def test_real_jpegs_and_the_bad_gif_stream_through(tmp_path: Path) -> None:
    """ants/bees photos of many sizes, plus the GIF placeholder (it decodes as the image it is)."""
    files = sorted((REAL_DATA / "hymenoptera" / "train").glob("*/*"))
    classes = sorted({f.parent.name for f in files})
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as writer:
        for i, path in enumerate(files[:20] + [f for f in files if f.suffix == ".gif"]):
            label = classes.index(path.parent.name)
            writer.write({"__key__": f"{i:05d}", "jpg": path.read_bytes(), "cls": label})
    cfg = _config(tmp_path, num_classes=2, image_size=32, batch_size=6, workers=1, mixup=0.8, cutmix=1.0)
    batches = list(build_train_loader(cfg, rank=0, world_size=1, seed=0))
    assert [tuple(b[0].shape) for b in batches] == [(6, 3, 32, 32)] * 3 + [(3, 3, 32, 32)]
    assert [tuple(b[1].shape) for b in batches] == [(6, 2)] * 3 + [(3, 2)]  # odd last: smoothing only
    assert torch.isfinite(torch.cat([b[0] for b in batches])).all()



@pytest.mark.parametrize("reprob", [0.0, 1.0])
def test_workers_ship_uint8_batches_normalised_and_erased_on_arrival(shard_dir: Path, reprob: float) -> None:
    cfg = _config(shard_dir, workers=1, reprob=reprob)
    raw = list(build_train_loader(cfg, rank=0, world_size=1, seed=0).raw_batches())
    finished = list(build_train_loader(cfg, rank=0, world_size=1, seed=0).batches_with_keys())
    assert [keys for _, _, keys in raw] == [keys for _, _, keys in finished]
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    for (images, labels, _), (floats, targets, _) in zip(raw, finished):
        assert images.dtype == torch.uint8 and floats.dtype == torch.float32 and torch.equal(labels, targets)
        changed = ~torch.isclose(floats, (images.float() / 255 - mean) / std, atol=1e-5)
        per_image = changed.flatten(1).float().mean(1)
        if reprob == 0:
            assert not changed.any()
        else:  # every image has an erased rectangle (of 2-33% of its area), the rest is as shipped
            assert ((per_image > 0) & (per_image < 0.5)).all()


def test_worker_batches_skip_undecodable_samples_and_match_per_image_augmentation(tmp_path: Path) -> None:
    """Workers decode a batch's images before augmenting them: the outputs are still each image's own
    seeded augmentation, and a sample that does not decode is skipped and counted, not fatal."""
    write_shards(tmp_path, (7,), image_size=12)
    with wds.TarWriter(str(tmp_path / "shard-000001.tar")) as writer:
        writer.write({"__key__": "broken", "png": b"\x89PNG but truncated", "cls": 1})
    (tmp_path / "manifest.parquet").unlink()  # read the *.tar of the directory
    cfg = _config(tmp_path, workers=1, batch_size=3, shuffle=False)
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=5)
    batches = list(loader.raw_batches())
    assert [len(keys) for _, _, keys in batches] == [3, 3, 1]
    assert [k for _, _, keys in batches for k in keys] == all_keys((7,))
    assert loader.stats()["bad_samples"] == 1
    transform = train_transform(cfg)
    for images, _, keys in batches:
        for image, key in zip(images, keys):
            raw = next(s for _, s in iter_shard(str(tmp_path / "shard-000000.tar")) if s["__key__"] == key)
            seed_global_rngs(_derived_seed(5, 0, key, 0))
            assert torch.equal(image, transform(Image.open(io.BytesIO(raw["png"])).convert("RGB")))


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data is absent")
def test_bench_data_smoke(tmp_path: Path) -> None:
    """The data benchmark runs end to end on a few real images and writes its table."""
    out = tmp_path / "bench_data.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"
    command = [sys.executable, str(script), "--smoke", "--repeats", "1", "--workers", "1", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dataset"], r["image_size"], r["workers"]) for r in rows] == [("ants/bees", 224, 1),
                                                                            ("cifar10", 32, 1)]
    for row in rows:
        assert row["images"] == 64 and row["per_worker_ratio"] > 0 and row["per_worker_ratio_vs_staged"] > 0
