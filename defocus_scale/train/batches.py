"""Micro-batches in lockstep across ranks: every rank runs the same number of forward passes per epoch
(FSDP needs every rank in every step), decided once per epoch instead of once per micro-batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class TrainLoaderLike(Protocol):
    """What the loop needs of a train loader (``defocus_scale.data.loader.TrainLoader`` is one).

    ``batches_remaining()`` (optional): the batches this rank will still yield this epoch, None when
    unknown; with it the epoch's length is agreed once per epoch."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, states: list[dict]) -> None: ...


class MicroBatch(NamedTuple):
    images: torch.Tensor
    targets: torch.Tensor
    keys: list[str]
    weight: float  # 1.0; 0.0 for a stand-in that keeps a short rank in step (its loss counts for nothing)


def reduce_int(value: int, op: dist.ReduceOp, device: torch.device) -> int:
    """``value`` reduced over the ranks with ``op`` (MIN, MAX, ...): one all-reduce and one host sync."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


class LockstepBatches:
    """Micro-batches across epochs, with every rank ending each epoch at the same batch (ranks' shares
    may differ by a batch). Leftovers of an epoch are dropped.

    The epoch's length: at its start each rank states its planned batch count (the loader's
    ``batches_remaining()``) and the minimum over ranks is taken in one all-reduce; after that no
    micro-batch needs a collective or a host sync. The plan is exact unless samples fail to decode: a
    rank whose loader ends before the plan does fills the rest of the epoch with zero-weight stand-ins
    (its last batch again, loss multiplied by 0), so FSDP's collectives still meet and no sample counts
    twice; ``stand_ins`` counts them. Loaders that cannot plan (shard sizes unknown, e.g. no manifest)
    fall back to one all-reduce per micro-batch.

    Batches come with their sample keys when the loader offers ``batches_with_keys()`` (as
    ``defocus_scale.data.loader.TrainLoader`` does): they name the samples of a non-finite step. With
    ``audit`` the keys of every batch handed out are also kept in ``consumed``."""

    def __init__(
        self, loader: TrainLoaderLike, epoch: int, device: torch.device, audit: bool = False,
        on_epoch_end: Callable[[int], None] | None = None,
    ) -> None:
        self.loader, self.epoch, self.device, self.audit = loader, epoch, device, audit
        # called with the epoch just finished, before the next one starts (on every rank at the same batch)
        self.on_epoch_end = on_epoch_end
        self._batches: Iterator[Any] | None = None
        self._with_keys = getattr(loader, "batches_with_keys", None)
        if audit and self._with_keys is None:
            raise TypeError("trainer.audit_samples needs a train loader with batches_with_keys()")
        self.consumed: list[str] = []
        self._left: int | None = None  # planned batches left in this epoch; None: no plan (fallback)
        self._last: MicroBatch | None = None
        self.stand_ins = 0
        self.planned_epochs = 0  # epochs whose length was agreed up front (for tests and logs)

    def _iterate(self) -> Iterator[Any]:
        if self._with_keys is None:
            return ((images, targets, []) for images, targets in self.loader)
        return self._with_keys()

    def _start_epoch(self) -> None:
        remaining = getattr(self.loader, "batches_remaining", None)
        planned = remaining() if callable(remaining) else None
        agreed = reduce_int(-1 if planned is None else planned, dist.ReduceOp.MIN, self.device)
        self._left = agreed if agreed >= 0 else None  # any rank without a plan: all fall back
        self.planned_epochs += self._left is not None
        self._batches = self._iterate()

    def _hand_out(self, batch: Any) -> MicroBatch:
        images, targets, keys = batch
        if self.audit:
            self.consumed.extend(keys)
        self._last = MicroBatch(images, targets, list(keys), 1.0)
        return self._last

    def _stand_in(self) -> MicroBatch:
        if self._last is None:
            raise RuntimeError(
                f"this rank's loader yielded no batch in epoch {self.epoch} although its plan promised "
                "some: every sample of its shards failed to decode"
            )
        self.stand_ins += 1
        logger.warning("epoch %d: this rank ran out of batches before the agreed epoch end (samples that "
                       "failed to decode); a zero-weight stand-in keeps it in step", self.epoch)  # fmt: skip
        return self._last._replace(keys=[], weight=0.0)

    def next(self) -> MicroBatch:
        for _attempt in range(2):
            if self._batches is None:
                self._start_epoch()
            if self._left is None:  # no plan: ask every rank, every micro-batch
                batch = next(self._batches, None)
                have = reduce_int(int(batch is not None), dist.ReduceOp.MIN, self.device)
                if have:
                    return self._hand_out(batch)
            elif self._left > 0:
                self._left -= 1
                batch = next(self._batches, None)
                return self._hand_out(batch) if batch is not None else self._stand_in()
            self.close()
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.epoch)
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
        raise RuntimeError(
            "a fresh epoch gave some rank no batch: the training set is smaller than one batch per rank"
        )

    def close(self) -> None:
        """Close the epoch's batch generator now, so its DataLoader workers are joined here rather than
        whenever garbage collection finds it (or never, on an error path)."""
        batches, self._batches = self._batches, None
        close_iterator(batches)


def close_iterator(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if callable(close):
        close()
