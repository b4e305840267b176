"""An epoch's work as units of sample indices, and how it is dealt to ranks and DataLoader workers.

A :class:`WorkUnit` is a range of sample indices of one shard, or an explicit set of them ("picks",
what is left of a shard's samples sitting in a reader's buffer at a restart), with the views of each
pick already delivered (repeated augmentation delivers every sample ``repeats`` times).

:func:`deal_work` gives every (rank, worker) pair of the world an equal share of the samples (to within
one sample per rank, and whole batches per worker, so ranks differ by at most one batch), cut into
``slices`` pieces taken from places spread evenly over the epoch's (shuffled) shard order: a worker then
interleaves several shards even when the world has more workers than there are shards.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkUnit:
    """Samples ``start <= index < stop`` of one shard (stop None: to its end), or only ``picks`` of them;
    ``views[i]``: views of ``picks[i]`` already delivered (None: none of any)."""

    shard: int
    start: int
    stop: int | None
    picks: tuple[int, ...] | None = None
    views: tuple[int, ...] | None = None

    @property
    def size(self) -> int | None:
        if self.picks is not None:
            return len(self.picks)
        return None if self.stop is None else self.stop - self.start

    def views_left(self, repeats: int) -> int | None:
        """Views this unit still has to deliver; None when its size is unknown."""
        size = self.size
        if size is None:
            return None
        return size * repeats - (sum(self.views) if self.views is not None else 0)

    def view_of(self, index: int) -> int:
        """The first view still owed of sample ``index`` of this unit."""
        if self.views is None:
            return 0
        return self.views[self.picks.index(index)]

    def slice(self, begin: int, end: int) -> WorkUnit:
        """Samples ``begin:end`` of this unit (positions within it; its size must be known)."""
        if self.picks is not None:
            picks = self.picks[begin:end]
            views = self.views[begin:end] if self.views is not None else None
            return WorkUnit(self.shard, picks[0], picks[-1] + 1, picks, views)
        return WorkUnit(self.shard, self.start + begin, self.start + end)

    def after(self, position: int) -> WorkUnit | None:
        """What is left once every index below ``position`` has been read."""
        if self.picks is not None:
            kept = [k for k, i in enumerate(self.picks) if i >= position]
            if not kept:
                return None
            picks = tuple(self.picks[k] for k in kept)
            views = tuple(self.views[k] for k in kept) if self.views is not None else None
            return WorkUnit(self.shard, picks[0], picks[-1] + 1, picks, views)
        if self.stop is not None and position >= self.stop:
            return None
        return WorkUnit(self.shard, max(self.start, position), self.stop)

    @property
    def end(self) -> int | None:
        """One past the last index this unit reads (None: to the shard's end)."""
        return self.picks[-1] + 1 if self.picks is not None else self.stop

    def to_json(self) -> list:
        return [self.shard, self.start, self.stop, list(self.picks) if self.picks is not None else None,
                list(self.views) if self.views is not None else None]  # fmt: skip

    @classmethod
    def from_json(cls, data: Sequence) -> WorkUnit:
        shard, start, stop, picks, views = data[:5]
        return cls(int(shard), int(start), stop, tuple(picks) if picks is not None else None,
                   tuple(views) if views is not None else None)  # fmt: skip


def split_work(units: Sequence[WorkUnit], parts: int) -> list[list[WorkUnit]]:
    """Contiguous cuts with sample counts equal to within one when all sizes are known, else round-robin."""
    result: list[list[WorkUnit]] = [[] for _ in range(parts)]
    sizes = [u.size for u in units]
    if any(size is None for size in sizes):
        for i, unit in enumerate(units):
            result[i % parts].append(unit)
        return result
    bounds = np.cumsum([0] + sizes)
    total = int(bounds[-1])
    for part in range(parts):
        result[part] = _cut(units, bounds, total * part // parts, total * (part + 1) // parts)
    return result


def _cut(units: Sequence[WorkUnit], bounds: np.ndarray, begin: int, end: int) -> list[WorkUnit]:
    """The units' samples at positions ``begin:end`` of their concatenation (``bounds``: cumulative sizes)."""
    pieces = []
    first = bisect.bisect_right(bounds, begin) - 1
    for u in range(max(first, 0), len(units)):
        lo, hi = int(bounds[u]), int(bounds[u + 1])
        if lo >= end:
            break
        if hi > begin and hi > lo:
            pieces.append(units[u].slice(max(begin, lo) - lo, min(end, hi) - lo))
    return pieces


def worker_quotas(total: int, ranks: int, workers: int, align: int = 1) -> np.ndarray:
    """Samples of each (rank, worker), shape (ranks, workers): ranks equal to within one sample; within a
    rank every worker a multiple of ``align`` (a batch's worth of samples) but the last, which takes the
    remainder, so a rank's batches number ``rank share // align`` (+1 partial)."""
    rank = np.arange(ranks + 1, dtype=np.int64)
    rank_share = np.diff(total * rank // ranks)
    full = rank_share // align  # whole batches of each rank
    w = np.arange(workers + 1, dtype=np.int64)
    quotas = np.diff(full[:, None] * w[None, :] // workers, axis=1) * align
    quotas[:, -1] += rank_share - full * align
    return quotas


def deal_work(
    units: Sequence[WorkUnit], *, ranks: int, workers: int, rank: int, slices: int = 1, align: int = 1,
    seed: int | None = None,
) -> list[list[WorkUnit]]:
    """Rank ``rank``'s share of ``units`` as one list per worker (see the module docstring).

    Each worker's quota is cut into ``slices`` pieces; piece ``j`` of every worker of every rank lies in
    the ``j``-th of ``slices`` consecutive rounds of the units' concatenation, so a worker's pieces are
    ``total / slices`` samples apart. Within a round the pieces of all (rank, worker) pairs come in an
    order drawn from ``seed`` (in rank-major order without one), so that neither a rank's workers nor one
    worker of every rank (what a global batch draws from) read neighbouring slices of the same shards.
    A worker's list interleaves its pieces' units (a reader opens the first few at once). Units of
    unknown size are dealt whole, round-robin over ranks then workers.
    """
    sizes = [u.size for u in units]
    if any(size is None for size in sizes):
        return split_work(split_work(units, ranks)[rank], workers)
    bounds = np.cumsum([0] + sizes)
    quotas = worker_quotas(int(bounds[-1]), ranks, workers, max(1, align)).reshape(-1)
    slices = max(1, slices)
    j = np.arange(slices + 1, dtype=np.int64)
    piece = np.diff(quotas[:, None] * j[None, :] // slices, axis=1)  # (ranks * workers, slices)
    round_start = np.concatenate([[0], np.cumsum(piece.sum(axis=0))[:-1]])
    start = np.empty_like(piece)
    rng = np.random.default_rng(seed) if seed is not None else None
    for s in range(slices):
        order = rng.permutation(len(quotas)) if rng is not None else np.arange(len(quotas))
        in_order = piece[order, s]
        start[order, s] = round_start[s] + np.cumsum(in_order) - in_order
    result = []
    for part in range(rank * workers, (rank + 1) * workers):
        per_piece = [_cut(units, bounds, int(start[part, s]), int(start[part, s] + piece[part, s]))
                     for s in range(slices) if piece[part, s] > 0]  # fmt: skip
        longest = max((len(p) for p in per_piece), default=0)
        result.append([p[k] for k in range(longest) for p in per_piece if k < len(p)])
    return result


def remaining_units(substream: dict) -> list[WorkUnit]:
    """A substream state's unread work: its buffered and waiting samples (as picks with their views
    delivered, one unit per shard) first, then what is left of its open units, then its pending ones."""
    by_shard: dict[int, list[tuple[int, int]]] = {}
    waiting = [entry[:3] for entry in substream.get("waiting", [])]  # views waiting out their gap
    for shard, index, view in list(substream["buffered"]) + waiting:
        by_shard.setdefault(int(shard), []).append((int(index), int(view)))
    units = []
    for shard, entries in by_shard.items():
        entries.sort()
        picks = tuple(i for i, _ in entries)
        views = tuple(v for _, v in entries)
        units.append(WorkUnit(shard, picks[0], picks[-1] + 1, picks, views if any(views) else None))
    for entry in substream["open"]:
        rest = WorkUnit.from_json(entry).after(entry[5])
        if rest is not None:
            units.append(rest)
    units.extend(WorkUnit.from_json(u) for u in substream["pending"])
    return units


def upgrade_substream(substream: dict) -> dict:
    """A substream state of format 1 (no views) in format 2: units get an empty views field, open units'
    read position moves from element 4 to 5, buffered entries become (shard, index, view 0)."""
    def unit(u: list) -> list:
        return [*u[:4], None]

    buffered = np.asarray(substream["buffered"], dtype=np.int64).reshape(-1, 2)
    return {
        **substream,
        "pending": [unit(u) for u in substream["pending"]],
        "open": [[*unit(e), e[4]] for e in substream["open"]],
        "buffered": np.concatenate([buffered, np.zeros((len(buffered), 1), np.int64)], axis=1).tolist(),
        "waiting": [],
    }
