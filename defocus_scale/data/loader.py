"""Training and evaluation batches from shard streams, decoded and augmented in DataLoader workers.

Each DataLoader worker owns one substream of the rank's :class:`ShardStream` and builds whole batches.
Every batch carries its worker's stream state *after* that batch; the main process records it on
receipt, so ``TrainLoader.state_dict()`` describes exactly the batches the trainer has received,
whatever the workers have read ahead. A last message per worker carries its end-of-epoch state (with
``drop_last``, the final partial batch counts as consumed).

Workers read a batch's samples, decode them, then augment each image (crop, flip, RandAugment) into a
uint8 batch: stage by stage, so each stage's code stays in cache; uint8, a quarter of float32's bytes to
ship. The batch half of the recipe (normalise, random erasing,
Mixup/CutMix) runs in the main process on the loader's ``device`` as each batch arrives
(:class:`~defocus_scale.data.transforms.BatchFinisher`). Per-image augmentation is seeded from (seed,
epoch, key, view), the batch half from (seed, epoch, first key of the batch), so neither depends on which
worker, rank or restart produced the batch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .stream import SampleDecodeError, ShardReadError, ShardStream, SubstreamReader, decode_sample
from .transforms import BatchFinisher, eval_transform, seed_global_rngs, seeded_global_rngs, train_transform

logger = logging.getLogger(__name__)


def _derived_seed(*words: Any) -> int:
    digest = hashlib.blake2b(repr(words).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _WorkerProgress:
    """A worker's stream state after a batch. An opaque object: the pin-memory thread leaves it alone
    (it would walk every list of a dict), and it pickles as is (a JSON round trip costs more)."""

    def __init__(self, state: dict) -> None:
        self.state = state


class _ShippedImages:
    """A worker's uint8 batch, pickled inline through the worker's pipe: cheaper than torch's shared-memory
    handover of a tensor (a fresh segment, and its file descriptor passed over a socket, per batch). The
    DataLoader's pin-memory thread calls ``pin_memory()`` when batches go to CUDA."""

    def __init__(self, images: np.ndarray) -> None:
        self.array = images

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.array)

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        return self.tensor().pin_memory()


class _BatchProducer(IterableDataset):
    """Runs in each DataLoader worker: read substream ``worker id``, decode, augment, batch (uint8)."""

    def __init__(self, stream: ShardStream, transform: Callable, *, batch_size: int, drop_last: bool) -> None:
        self.stream, self.transform = stream, transform
        self.batch_size, self.drop_last = batch_size, drop_last

    def _message(self, worker: int, reader: SubstreamReader, **batch: Any) -> dict:
        return {"worker": worker, "progress": _WorkerProgress(reader.state_dict(compact=True)), **batch}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = self.stream.reader(worker)
        seed, epoch = self.stream.seed, self.stream.epoch
        images: torch.Tensor | None = None
        labels: list[int] = []
        keys: list[str] = []
        samples = iter(reader)  # one entry per view: the stream spreads a sample's views over batches
        # Work stage by stage on the samples that complete the batch: read them, decode them, then augment
        # them, so that each stage's code and tables stay in cache (at 32 px this saves ~10% of the CPU).
        # The reader's state when the batch leaves is the same as image by image.
        while chunk := list(itertools.islice(samples, self.batch_size - len(labels))):
            for decoded in _decoded_groups(chunk, reader):
                for sample in decoded:
                    key, view = sample["__key__"], sample["__view__"]
                    if info is None:  # in the main process: spare the caller's generators
                        with seeded_global_rngs(_derived_seed(seed, epoch, key, view)):
                            image = self.transform(sample["image"])
                    else:
                        seed_global_rngs(_derived_seed(seed, epoch, key, view))
                        image = self.transform(sample["image"])
                    if images is None:
                        images = np.empty((self.batch_size, *image.shape), dtype=np.uint8)
                    images[len(labels)] = image.numpy()  # numpy's strided copy costs less than torch's
                    labels.append(sample["label"])
                    keys.append(key)
                    if len(labels) == self.batch_size:
                        yield self._message(worker, reader, images=_ShippedImages(images), labels=labels,
                                            keys=keys)
                        images, labels, keys = None, [], []
        if labels and not self.drop_last:
            yield self._message(worker, reader, images=_ShippedImages(images[: len(labels)]),
                                labels=labels, keys=keys)
        yield self._message(worker, reader)


_DECODED_PIXELS = 1 << 20  # decoded images held at once before augmenting (~3 MB of RGB)


def _decoded_groups(chunk: list[dict], reader: SubstreamReader) -> Iterator[list[dict]]:
    """The chunk's samples decoded, in groups of at most ``_DECODED_PIXELS`` pixels (at least one image:
    large photos go one by one); undecodable samples are counted on the reader and skipped."""
    group: list[dict] = []
    pixels = 0
    for raw in chunk:
        try:
            sample = decode_sample(raw)
        except SampleDecodeError as exc:
            reader.bad_samples += 1
            logger.warning("skipping %s", exc)
            continue
        width, height = sample["image"].size
        if group and pixels + width * height > _DECODED_PIXELS:
            yield group
            group, pixels = [], 0
        group.append(sample)
        pixels += width * height
    if group:
        yield group


def _as_is(message: dict) -> dict:
    return message


class _StreamBatches:
    """Iterating runs a fresh DataLoader over the stream's current state and records each receipt."""

    def __init__(
        self, stream: ShardStream, producer: _BatchProducer, cfg: DataConfig, finisher: BatchFinisher,
        device: torch.device | str | None,
    ) -> None:
        self.stream, self.producer, self.cfg, self.finisher = stream, producer, cfg, finisher
        self.device = torch.device(device if device is not None else "cpu")

    def _dataloader(self) -> DataLoader:
        for i in range(self.stream.num_substreams):  # workers start from the recorded states
            self.stream.set_substream_state(i, self.stream.substream_state(i))
        workers = self.cfg.workers
        return DataLoader(
            self.producer,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available() and self.device.type == "cuda",
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            generator=torch.Generator().manual_seed(_derived_seed(self.stream.seed, self.stream.epoch)),
            collate_fn=_as_is,
        )

    def raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """``(uint8 images (B, 3, S, S), int64 labels, keys)`` as the workers made them: augmented per
        image, not yet normalised, erased or mixed. Receipts are recorded as for iterating."""
        bad = self.stream.bad_shards()
        for message in self._dataloader():
            progress = message["progress"].state
            self.stream.set_substream_state(message["worker"], progress)
            bad.update(progress["bad_shards"])
            if len(bad) > self.stream.max_bad_fraction * len(self.stream.shards):
                raise ShardReadError(
                    f"{len(bad)} of {len(self.stream.shards)} shards are missing or corrupt, more than "
                    f"max_bad_fraction={self.stream.max_bad_fraction}: {', '.join(sorted(bad))}"
                )
            if "images" in message:  # labels travel as a list: a tensor would cost a shared-memory handover
                images = message["images"]  # pinned by the DataLoader, or still as shipped
                images = images if isinstance(images, torch.Tensor) else images.tensor()
                yield images, torch.tensor(message["labels"], dtype=torch.int64), message["keys"]

    def batches_with_keys(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like iterating, plus each batch's sample keys (one per view): for audits and debugging."""
        seed, epoch = self.stream.seed, self.stream.epoch
        for images, labels, keys in self.raw_batches():
            batch_seed = _derived_seed(seed, epoch, "batch", keys[0])  # the same whoever made the batch
            yield (*self.finisher(images, labels, seed=batch_seed, device=self.device), keys)

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
            full, partial = divmod(samples, self.producer.batch_size)  # views (samples x repeats)
            batches += full + (1 if partial and not self.producer.drop_last else 0)
        return batches

    def stats(self) -> dict[str, Any]:
        """This rank's counts so far this epoch, as of the batches received (for logging, and for the
        trainer's check of ``max_bad_fraction`` over all ranks): bad shards (URLs), undecodable samples
        skipped, samples delivered (undecodable ones included), samples still to come, and the shards of
        the source."""
        subs = [self.stream.substream_state(i) for i in range(self.stream.num_substreams)]
        return {
            "bad_shards": sorted({url for s in subs for url in s["bad_shards"]}),
            "bad_samples": sum(s["bad_samples"] for s in subs),
            "delivered": sum(s["delivered"] for s in subs),
            "samples_remaining": self.stream.samples_remaining(),
            "num_shards": len(self.stream.shards),
        }


class TrainLoader(_StreamBatches):
    """Yields ``(images (B,3,S,S) float32, targets)`` on ``device``: targets int64 (B,), or soft
    (B, classes) under Mixup/CutMix. Workers ship uint8 batches; normalisation, random erasing and
    Mixup/CutMix run on ``device`` as they arrive (pass the training device: there they cost little).

    ``state_dict()`` is small and JSON-able; ``load_state_dict(states of all old ranks)`` resumes this
    rank of any new world size or worker count with every source sample of the epoch delivered once.
    """

    def __init__(
        self, cfg: DataConfig, *, rank: int, world_size: int, seed: int, epoch: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
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
            repeats=cfg.repeated_aug,
            batch_size=cfg.batch_size,
            read_retries=cfg.read_retries,
            retry_backoff_s=cfg.retry_backoff_s,
        )
        producer = _BatchProducer(stream, train_transform(cfg), batch_size=cfg.batch_size,
                                  drop_last=cfg.drop_last)
        super().__init__(stream, producer, cfg, BatchFinisher(cfg, train=True), device)

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
    cfg: DataConfig, *, rank: int, world_size: int, seed: int, epoch: int = 0,
    device: torch.device | str | None = None,
) -> TrainLoader:
    """Training batches of this rank; ``device`` (default CPU) is where they are normalised and mixed."""
    return TrainLoader(cfg, rank=rank, world_size=world_size, seed=seed, epoch=epoch, device=device)


class EvalLoader(_StreamBatches):
    """Yields ``(images float32, labels int64)`` on ``device``; ranks together cover every eval sample
    once, without padding."""


def build_eval_loader(
    cfg: DataConfig, *, rank: int, world_size: int, device: torch.device | str | None = None
) -> EvalLoader:
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
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        read_retries=cfg.read_retries,
        retry_backoff_s=cfg.retry_backoff_s,
    )
    producer = _BatchProducer(stream, eval_transform(cfg), batch_size=cfg.eval_batch_size or cfg.batch_size,
                              drop_last=False)
    return EvalLoader(stream, producer, cfg, BatchFinisher(cfg, train=False), device)
