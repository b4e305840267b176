"""Training and evaluation batches from shard streams, decoded and augmented in DataLoader workers.

Each DataLoader worker owns one substream of the rank's :class:`ShardStream` and builds whole batches.
Every batch carries its worker's stream state *after* that batch; the main process records it on
receipt, so ``TrainLoader.state_dict()`` describes exactly the batches the trainer has received,
whatever the workers have read ahead. A last message per worker carries its end-of-epoch state (with
``drop_last``, the final partial batch counts as consumed).

Augmentation is seeded per sample from (seed, epoch, key, view), so a sample's views do not
depend on which worker, rank or restart produced them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .stream import SampleDecodeError, ShardReadError, ShardStream, decode_sample
from .transforms import eval_transform, mixup_fn, train_transform

logger = logging.getLogger(__name__)


def _derived_seed(*words: Any) -> int:
    digest = hashlib.blake2b(repr(words).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _seed_global_rngs(seed: int) -> None:
    """timm's transforms and Mixup draw from the global random, numpy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it queues CUDA seeding, slowly


@contextlib.contextmanager
def _global_rngs_preserved(enabled: bool) -> Iterator[None]:
    """Keep the caller's global generators untouched when augmenting in the main process (workers=0)."""
    if not enabled:
        yield
        return
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _BatchProducer(IterableDataset):
    """Runs in each DataLoader worker: read substream ``worker id``, decode, augment, batch, mix."""

    def __init__(
        self,
        stream: ShardStream,
        transform: Callable,
        *,
        batch_size: int,
        drop_last: bool,
        repeats: int,
        cfg: DataConfig | None,
    ) -> None:
        self.stream, self.transform = stream, transform
        self.batch_size, self.drop_last, self.repeats = batch_size, drop_last, repeats
        self.cfg = cfg  # None: no mixup (evaluation)

    def _batch_buffer(self, image: torch.Tensor, in_worker: bool) -> torch.Tensor:
        shape = (self.batch_size, *image.shape)
        if not in_worker:
            return torch.empty(shape, dtype=image.dtype)
        # The batch goes to the main process through shared memory: allocate it there at once, as
        # torch's default_collate does (share_memory_() would copy a fresh buffer).
        storage = image._typed_storage()._new_shared(image.numel() * self.batch_size, device=image.device)
        return image.new(storage).resize_(shape)

    def _finish(self, images: torch.Tensor, labels: list, keys: list, worker: int, reader, mixer) -> dict:
        targets = torch.tensor(labels, dtype=torch.int64)
        if mixer is not None:
            with _global_rngs_preserved(get_worker_info() is None):
                _seed_global_rngs(_derived_seed(self.stream.seed, self.stream.epoch, "mix", keys[0]))
                if len(images) % 2 == 0:
                    images, targets = mixer(images, targets)
                else:  # timm mixes pairs; an odd final batch (drop_last=False) gets smoothing only
                    targets = mixup_target(targets, mixer.num_classes, 1.0, mixer.label_smoothing)
        return {**self._progress(worker, reader), "images": images, "targets": targets, "keys": keys}

    @staticmethod
    def _progress(worker: int, reader) -> dict:
        # The state travels as one JSON string: the DataLoader would otherwise walk every list in it.
        state = json.dumps(reader.state_dict())
        return {"worker": worker, "state": state, "bad_shards": sorted(reader.bad_shards)}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = self.stream.reader(worker)
        mixer = mixup_fn(self.cfg) if self.cfg is not None else None
        images: torch.Tensor | None = None
        labels: list[int] = []
        keys: list[str] = []
        for raw in reader:
            try:
                sample = decode_sample(raw)
            except SampleDecodeError as exc:
                reader.bad_samples += 1
                logger.warning("skipping %s", exc)
                continue
            for view in range(self.repeats):
                sample_seed = _derived_seed(self.stream.seed, self.stream.epoch, sample["__key__"], view)
                with _global_rngs_preserved(info is None):
                    _seed_global_rngs(sample_seed)
                    image = self.transform(sample["image"])
                if images is None:
                    images = self._batch_buffer(image, in_worker=info is not None)
                images[len(labels)] = image  # now: holding all outputs for one stack costs fresh pages
                labels.append(sample["label"])
                keys.append(sample["__key__"])
                if len(labels) == self.batch_size:
                    yield self._finish(images, labels, keys, worker, reader, mixer)
                    images, labels, keys = None, [], []
        if labels and not self.drop_last:
            yield self._finish(images[: len(labels)], labels, keys, worker, reader, mixer)
        yield self._progress(worker, reader)


def _as_is(message: dict) -> dict:
    return message


class _StreamBatches:
    """Iterating runs a fresh DataLoader over the stream's current state and records each receipt."""

    def __init__(self, stream: ShardStream, producer: _BatchProducer, cfg: DataConfig) -> None:
        self.stream, self.producer, self.cfg = stream, producer, cfg

    def _dataloader(self) -> DataLoader:
        for i in range(self.stream.num_substreams):  # workers start from the recorded states
            self.stream.set_substream_state(i, self.stream.substream_state(i))
        workers = self.cfg.workers
        return DataLoader(
            self.producer,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            generator=torch.Generator().manual_seed(_derived_seed(self.stream.seed, self.stream.epoch)),
            collate_fn=_as_is,
        )

    def batches_with_keys(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like iterating, plus each batch's sample keys (one per view): for audits and debugging."""
        bad = self.stream.bad_shards()
        for message in self._dataloader():
            self.stream.set_substream_state(message["worker"], message["state"])
            bad.update(message["bad_shards"])
            if len(bad) > self.stream.max_bad_fraction * len(self.stream.shards):
                raise ShardReadError(
                    f"{len(bad)} of {len(self.stream.shards)} shards are missing or corrupt, more than "
                    f"max_bad_fraction={self.stream.max_bad_fraction}: {', '.join(sorted(bad))}"
                )
            if "images" in message:
                yield message["images"], message["targets"], message["keys"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets, _ in self.batches_with_keys():
            yield images, targets

    def batches_remaining(self) -> int | None:
        """Batches this rank will still yield this epoch; None when shard sizes are unknown.

        Exact unless samples fail to decode (then an upper bound). Ranks may differ by a batch or so:
        a data-parallel trainer takes the minimum over ranks as the epoch's remaining step count.
        """
        batches = 0
        for i in range(self.stream.num_substreams):  # each worker batches its own substream
            samples = self.stream.substream_remaining(i)
            if samples is None:
                return None
            full, partial = divmod(samples * self.producer.repeats, self.producer.batch_size)
            batches += full + (1 if partial and not self.producer.drop_last else 0)
        return batches

    def stats(self) -> dict[str, Any]:
        """Counts for logging: bad shards (names) and undecodable samples skipped so far this epoch."""
        subs = [self.stream.substream_state(i) for i in range(self.stream.num_substreams)]
        return {
            "bad_shards": sorted(self.stream.bad_shards()),
            "bad_samples": sum(s["bad_samples"] for s in subs),
            "samples_remaining": self.stream.samples_remaining(),
        }


class TrainLoader(_StreamBatches):
    """Yields ``(images (B,3,S,S) float32, targets)``: int64 (B,), or soft (B, classes) under Mixup/CutMix.

    ``state_dict()`` is small and JSON-able; ``load_state_dict(states of all old ranks)`` resumes this
    rank of any new world size or worker count with every source sample of the epoch delivered once.
    """

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, seed: int, epoch: int = 0) -> None:
        stream = ShardStream(
            cfg.source,
            rank=rank,
            world_size=world_size,
            seed=seed,
            epoch=epoch,
            shuffle=cfg.shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            open_shards=cfg.open_shards,
            max_bad_fraction=cfg.max_bad_fraction,
            num_substreams=max(1, cfg.workers),
        )
        producer = _BatchProducer(
            stream,
            train_transform(cfg),
            batch_size=cfg.batch_size,
            drop_last=cfg.drop_last,
            repeats=cfg.repeated_aug,
            cfg=cfg,
        )
        super().__init__(stream, producer, cfg)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` afresh; the epoch just restored by load_state_dict keeps its progress."""
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict(states)


def build_train_loader(
    cfg: DataConfig, *, rank: int, world_size: int, seed: int, epoch: int = 0
) -> TrainLoader:
    return TrainLoader(cfg, rank=rank, world_size=world_size, seed=seed, epoch=epoch)


class EvalLoader(_StreamBatches):
    """Yields ``(images, labels int64)``; ranks together cover every eval sample once, without padding."""


def build_eval_loader(cfg: DataConfig, *, rank: int, world_size: int) -> EvalLoader:
    if cfg.eval_source is None:
        raise ValueError("build_eval_loader: DataConfig.eval_source is not set")
    stream = ShardStream(
        cfg.eval_source,
        rank=rank,
        world_size=world_size,
        seed=0,
        shuffle=False,
        max_bad_fraction=cfg.max_bad_fraction,
        num_substreams=max(1, cfg.workers),
    )
    producer = _BatchProducer(
        stream,
        eval_transform(cfg),
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        drop_last=False,
        repeats=1,
        cfg=None,
    )
    return EvalLoader(stream, producer, cfg)
