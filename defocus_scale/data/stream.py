"""Exactly-once, resumable, elastic streaming of WebDataset shards.

An epoch's work is a list of :class:`~defocus_scale.data.work.WorkUnit` s -- a range of sample indices
of one shard, or an explicit set of indices ("picks") -- dealt deterministically to ranks and, within a
rank, to substreams (one per DataLoader worker): equal shares of samples, each cut into slices from
places spread over the epoch's shard order (:func:`~defocus_scale.data.work.deal_work`). A substream
reads ``open_shards`` units at once, interleaving them at random into a bounded shuffle buffer, and
draws samples from the buffer at random. With a manifest that records byte offsets a reader seeks to
its slice instead of reading the bytes before it; a read that fails is retried with backoff from the
sample it stopped at.

Repeated augmentation (``repeats`` > 1, DeiT's RASampler): a sample drawn from the buffer goes back into
it until it has delivered all its views, so the views land in different batches; an epoch is one
``1 / repeats`` part of a pass over the shards, i.e. about as many views as the dataset has samples.

A substream's state is its pending units, the read position of each open unit, the ids (and views
delivered) of the raw samples sitting in its buffer, and its random generator: no sample data.
Restoring the same world size and substream count re-reads the buffered samples and continues bit for
bit; any other shape unions the remaining work of all old ranks (buffered ids become picks units) and
deals it again, so every view of the epoch is delivered exactly once in total across the restart.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import tarfile
import time
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from .shard_list import MANIFEST_NAME, Shard, resolve_shards, shard_fingerprint
from .tar_reader import iter_shard
from .work import WorkUnit, deal_work, remaining_units, split_work, upgrade_substream

__all__ = [
    "MANIFEST_NAME", "SampleDecodeError", "Shard", "ShardReadError", "ShardStream", "SubstreamReader",
    "WorkUnit", "decode_sample", "iter_shard", "open_stream", "remaining_units", "resolve_shards",
    "shard_fingerprint", "split_work",
]  # fmt: skip

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATE_FORMAT = "defocus_scale.stream/2"
_OLD_STATE_FORMATS = ("defocus_scale.stream/1",)
# A buffered sample's id: shard << 36 | view << 32 | index (views < 16, indices < 2**32, shards < 2**27)
_VIEW_SHIFT, _SHARD_SHIFT = 32, 36
_MAX_REPEATS = 16


class ShardReadError(RuntimeError):
    """More shards failed (missing, truncated, corrupt) than ``max_bad_fraction`` allows."""


class SampleDecodeError(ValueError):
    """A sample lacks an image or label, or its image does not decode."""


def decode_sample(raw: dict[str, Any], decode: bool = True) -> dict[str, Any]:
    """``{"__key__", "__url__", "__shard__", "__index__", "__view__", "label", "image" | <ext>: bytes}``."""
    extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if extension is None or "cls" not in raw:
        raise SampleDecodeError(
            f"{_where(raw)} lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) or a .cls member"
        )
    try:
        label = int(raw["cls"])  # int() takes ASCII digits as bytes, with surrounding whitespace
    except ValueError as exc:
        raise SampleDecodeError(f"{_where(raw)}: unreadable label {raw['cls'][:20]!r}") from exc
    sample = {k: raw[k] for k in ("__key__", "__url__", "__shard__", "__index__")}
    sample["__view__"] = raw.get("__view__", 0)
    sample["label"] = label
    if not decode:
        sample[extension] = raw[extension]
        return sample
    try:
        with Image.open(io.BytesIO(raw[extension])) as image:
            sample["image"] = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SampleDecodeError(f"{_where(raw)}: image does not decode ({exc})") from exc
    return sample


def _where(raw: dict[str, Any]) -> str:
    return f"sample {raw['__key__']!r} of {raw.get('__url__')}"


def _generator(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def _seed_words(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0])


def _new_substream(units: Sequence[WorkUnit], rng: np.random.Generator) -> dict:
    return {
        "pending": [u.to_json() for u in units],
        "open": [],
        "buffered": [],
        "waiting": [],
        "rng": rng.bit_generator.state,
        "delivered": 0,
        "bad_shards": [],
        "bad_samples": 0,
    }


def _is_permanent(exc: BaseException) -> bool:
    """Errors a retry meets again: a missing or unreadable file, or a tar whose bytes are bad (a read
    that failed on the way raises the storage's own error instead, and is retried)."""
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError, tarfile.TarError))


# ----------------------------------------------------------------------------- one substream


class SubstreamReader:
    """Iterates one substream's raw samples; ``state_dict()`` between samples describes what is left."""

    def __init__(
        self,
        shards: Sequence[Shard],
        state: dict,
        *,
        shuffle: bool,
        shuffle_buffer: int,
        open_shards: int,
        max_bad_fraction: float,
        known_bad: set[str] = frozenset(),
        repeats: int = 1,
        view_gap: int = 1,
        read_retries: int = 3,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self.shards = shards
        self.shuffle = shuffle
        self.repeats, self.view_gap = repeats, max(1, view_gap)
        # views of a sample wait in the buffer, so repeats need one even unshuffled (then they come in turn)
        self.buffer_size = shuffle_buffer if shuffle else (1 if repeats > 1 else 0)
        self.open_limit = max(1, open_shards) if shuffle else 1
        self.max_bad_fraction = max_bad_fraction
        self.read_retries, self.retry_backoff_s = read_retries, retry_backoff_s
        self.known_bad = set(known_bad)
        self.pending = deque(WorkUnit.from_json(u) for u in state["pending"])
        # [unit, read position, iterator or None, failed attempts in a row]
        self.open: list[list] = [[WorkUnit.from_json(e), int(e[5]), None, 0] for e in state["open"]]
        self.unfilled = [(int(s), int(i), int(v)) for s, i, v in state["buffered"]]
        # views drawn again only once `view_gap` more views have gone (a batch): [release at, raw sample]
        self.waiting: deque[list] = deque()
        self.unfilled_waiting = [(int(s), int(i), int(v), int(r)) for s, i, v, r in state.get("waiting", [])]
        self.buffer: list[dict] = []
        # the id of each buffered sample, for state_dict: a typed array copies to numpy at once
        self.buffer_ids = array("q")
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.delivered = int(state["delivered"])
        self.bad_shards = set(state["bad_shards"])
        self.bad_samples = int(state["bad_samples"])
        self.retried_reads = 0

    def state_dict(self, compact: bool = False) -> dict:
        """What is left, JSON-able; ``compact``: "buffered" as an int (n, 3) array (cheaper to send)."""
        ids = np.array(self.buffer_ids, dtype=np.int64)
        live = np.stack([ids >> _SHARD_SHIFT, ids & 0xFFFFFFFF, (ids >> _VIEW_SHIFT) & 0xF], axis=1)
        buffered = np.concatenate([live, np.array(self.unfilled, dtype=np.int64).reshape(-1, 3)])
        waiting = np.array([(raw["__shard__"], raw["__index__"], raw["__view__"], release)
                            for release, raw in self.waiting] + self.unfilled_waiting,
                           dtype=np.int64).reshape(-1, 4)  # fmt: skip
        return {
            "pending": [u.to_json() for u in self.pending],
            "open": [[*unit.to_json(), position] for unit, position, _, _ in self.open],
            "buffered": buffered if compact else buffered.tolist(),
            "waiting": waiting if compact else waiting.tolist(),
            "rng": self.rng.bit_generator.state,  # a fresh dict each time
            "delivered": self.delivered,
            "bad_shards": sorted(self.bad_shards),
            "bad_samples": self.bad_samples,
        }

    def _shard_failed(self, shard: int, reason: str) -> None:
        url = self.shards[shard].url
        if url in self.bad_shards:
            return
        self.bad_shards.add(url)
        bad = sorted(self.bad_shards | self.known_bad)
        logger.warning("skipping shard %s: %s (%d of %d shards bad)", url, reason, len(bad), len(self.shards))
        if len(bad) > self.max_bad_fraction * len(self.shards):
            raise ShardReadError(
                f"{len(bad)} of {len(self.shards)} shards are missing or corrupt, more than "
                f"max_bad_fraction={self.max_bad_fraction}: {', '.join(bad)}"
            )

    def _tag(self, shard: int, index: int, view: int, raw: dict) -> dict:
        raw["__shard__"], raw["__index__"], raw["__url__"] = shard, index, self.shards[shard].url
        raw["__view__"] = view
        return raw

    @staticmethod
    def _id(raw: dict) -> int:
        return raw["__shard__"] << _SHARD_SHIFT | raw["__view__"] << _VIEW_SHIFT | raw["__index__"]

    def _refill(self) -> None:
        """Re-read the samples a restored state had in its buffer, keeping their buffer order."""
        by_shard: dict[int, list[int]] = {}
        for shard, index, *_ in self.unfilled + self.unfilled_waiting:
            by_shard.setdefault(shard, []).append(index)
        found: dict[tuple[int, int], dict] = {}
        for shard, indices in by_shard.items():
            for attempt in range(self.read_retries + 1):
                try:
                    for index, raw in iter_shard(self.shards[shard].url, picks=indices,
                                                 offsets=self.shards[shard].offsets):
                        found[shard, index] = raw
                    break
                except Exception as exc:  # noqa: BLE001 - any read failure, retried unless permanent
                    if _is_permanent(exc) or attempt == self.read_retries:
                        self._shard_failed(shard, f"{type(exc).__name__}: {exc}")
                        break
                    self._back_off(shard, attempt, exc)
            lost = [i for i in indices if (shard, i) not in found]
            if lost and self.shards[shard].url not in self.bad_shards:
                self._shard_failed(shard, f"buffered sample(s) {lost[:5]} no longer in the shard")
        kept = [(s, i, v) for s, i, v in self.unfilled if (s, i) in found]
        self.buffer = [self._tag(s, i, v, dict(found[s, i])) for s, i, v in kept]
        self.buffer_ids = array("q", [s << _SHARD_SHIFT | v << _VIEW_SHIFT | i for s, i, v in kept])
        self.waiting = deque([r, self._tag(s, i, v, dict(found[s, i]))]
                             for s, i, v, r in self.unfilled_waiting if (s, i) in found)  # fmt: skip
        self.unfilled, self.unfilled_waiting = [], []

    def _back_off(self, shard: int, attempt: int, exc: BaseException) -> None:
        delay = self.retry_backoff_s * 2**attempt
        self.retried_reads += 1
        logger.warning("reading shard %s failed (%s: %s); retry %d of %d in %.1f s", self.shards[shard].url,
                       type(exc).__name__, exc, attempt + 1, self.read_retries, delay)  # fmt: skip
        time.sleep(delay)

    def _read(self, slot: int) -> dict | None:
        """The next sample of open unit ``slot``; closes the unit (and returns None) when it is done. A
        failed read is retried with backoff, reopening the shard at the sample it stopped at."""
        unit, position, iterator, failures = self.open[slot]
        try:
            if iterator is None:
                rest = unit.after(position)
                shard = self.shards[unit.shard]
                iterator = iter_shard(shard.url, rest.start, rest.stop, rest.picks, offsets=shard.offsets)
                self.open[slot][2] = iterator
            index, raw = next(iterator)
        except StopIteration:
            end = unit.end
            if end is not None and position < end:
                self._shard_failed(unit.shard, f"ended before sample {position} (expected {end})")
            del self.open[slot]
            return None
        except Exception as exc:  # noqa: BLE001 - storage errors are retried; missing/corrupt shards are bad
            if iterator is not None:
                iterator.close()
            if _is_permanent(exc) or failures >= self.read_retries:
                del self.open[slot]
                self._shard_failed(unit.shard, f"{type(exc).__name__}: {exc}")
                return None
            self.open[slot][2:] = [None, failures + 1]
            self._back_off(unit.shard, failures, exc)
            return None
        self.open[slot][1], self.open[slot][3] = index + 1, 0
        end = unit.end
        if end is not None and index + 1 >= end:  # a known end: close now, not at a later read attempt
            iterator.close()
            del self.open[slot]
        return self._tag(unit.shard, index, unit.view_of(index) if unit.views is not None else 0, raw)

    def _choice(self, n: int) -> int:
        # Raw 64-bit draws modulo n: a tenth of Generator.integers' call cost, bias below 2**-50.
        return self.rng.bit_generator.random_raw() % n if self.shuffle and n > 1 else 0

    def _draw(self) -> dict:
        """A random buffered sample's next view. A sample owing more views waits out ``view_gap`` views (a
        batch) before it can be drawn again, so no batch holds two views of it (but at an epoch's end)."""
        slot = self._choice(len(self.buffer))
        raw = self.buffer[slot]
        self.buffer[slot], self.buffer_ids[slot] = self.buffer[-1], self.buffer_ids[-1]
        self.buffer.pop()
        self.buffer_ids.pop()
        if raw["__view__"] + 1 < self.repeats:
            following = dict(raw, __view__=raw["__view__"] + 1)
            if self.view_gap > 1:
                self.waiting.append([self.delivered + self.view_gap, following])
            else:
                self.buffer.append(following)
                self.buffer_ids.append(self._id(following))
        return raw

    def _release(self, force: bool = False) -> None:
        """Waiting views whose gap has passed go back into the buffer (``force``: the first one anyway)."""
        while self.waiting and (self.waiting[0][0] <= self.delivered or force):
            _, raw = self.waiting.popleft()
            self.buffer.append(raw)
            self.buffer_ids.append(self._id(raw))
            force = False

    def __iter__(self) -> Iterator[dict]:
        if self.unfilled or self.unfilled_waiting:
            self._refill()
        while True:
            while len(self.open) < self.open_limit and self.pending:
                self.open.append([self.pending.popleft(), 0, None, 0])
            self._release()
            if self.open and len(self.buffer) + len(self.waiting) < self.buffer_size:
                raw = self._read(self._choice(len(self.open)))
                if raw is not None:
                    self.buffer.append(raw)
                    self.buffer_ids.append(self._id(raw))
                continue
            if self.buffer:
                raw = self._draw()
            elif self.open:
                raw = self._read(self._choice(len(self.open)))
                if raw is None:
                    continue
            elif self.waiting:  # nothing else left: the epoch's last views come closer together
                self._release(force=True)
                continue
            else:
                return
            self.delivered += 1
            yield raw


# ----------------------------------------------------------------------------- one rank


class ShardStream:
    """One rank's share of an epoch of shards, split into ``num_substreams`` (DataLoader workers).

    ``repeats``: views per sample (repeated augmentation); ``batch_size``: views per batch, so that every
    worker but one gets whole batches and ranks differ by at most one batch."""

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int = 0,
        shuffle: bool = True,
        decode: bool = True,
        shuffle_buffer: int = 1000,
        open_shards: int = 8,
        max_bad_fraction: float = 0.05,
        num_substreams: int = 1,
        repeats: int = 1,
        batch_size: int = 1,
        read_retries: int = 3,
        retry_backoff_s: float = 0.5,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0 or epoch < 0 or num_substreams < 1:
            raise ValueError(f"seed and epoch must be >= 0, num_substreams >= 1 (got {seed}, {epoch}, "
                             f"{num_substreams})")
        if not 1 <= repeats <= _MAX_REPEATS or batch_size < 1 or read_retries < 0:
            raise ValueError(f"repeats must lie in [1, {_MAX_REPEATS}], batch_size >= 1, read_retries >= 0 "
                             f"(got {repeats}, {batch_size}, {read_retries})")
        self.shards = resolve_shards(source)
        self.fingerprint = shard_fingerprint(self.shards)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.decode = shuffle, decode
        self.shuffle_buffer, self.open_shards = shuffle_buffer, open_shards
        self.max_bad_fraction = max_bad_fraction
        self.num_substreams = num_substreams
        self.repeats, self.batch_size = repeats, batch_size
        self.read_retries, self.retry_backoff_s = read_retries, retry_backoff_s
        self.epoch = epoch
        if any(s.samples is None for s in self.shards) and len(self.shards) < world_size * num_substreams:
            logger.warning(
                "%d shards without a manifest for %d ranks x %d workers: whole shards are dealt out, so some "
                "workers get none; `defocus-scale index-shards SOURCE` writes a manifest that lets the "
                "stream split shards by sample", len(self.shards), world_size, num_substreams,
            )  # fmt: skip
        self._substreams = self._fresh_plan()
        self._live: list[SubstreamReader | None] = [None] * num_substreams

    def _fresh_plan(self) -> list[dict]:
        """Epoch ``e``: part ``e % repeats`` of pass ``e // repeats`` over the shards (shuffled per pass)."""
        passes, part = divmod(self.epoch, self.repeats)
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = _generator(self.seed, passes).permutation(order)
        units = [WorkUnit(int(i), 0, self.shards[i].samples) for i in order]
        if self.repeats > 1:
            units = split_work(units, self.repeats)[part]
        return self._deal(units, generation=0)

    def _deal(self, units: Sequence[WorkUnit], generation: int) -> list[dict]:
        align = self.batch_size // math.gcd(self.batch_size, self.repeats)  # samples making whole batches
        mine = deal_work(units, ranks=self.world_size, workers=self.num_substreams, rank=self.rank,
                         slices=self.open_shards if self.shuffle else 1, align=align,
                         seed=_seed_words(self.seed, self.epoch, generation) if self.shuffle else None)
        return [
            _new_substream(part, _generator(self.seed, self.epoch, self.rank, self.world_size, i, generation))
            for i, part in enumerate(mine)
        ]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` afresh; the current epoch (e.g. one just restored) keeps its progress."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._substreams = self._fresh_plan()
            self._live = [None] * self.num_substreams

    def substream_state(self, i: int) -> dict:
        live, stored = self._live[i], self._substreams[i]
        if live is not None:
            return live.state_dict()
        if isinstance(stored, str):
            return json.loads(stored)
        state = copy.deepcopy(stored)
        for key in ("buffered", "waiting"):  # compact states (as DataLoader workers send them) hold arrays
            if isinstance(state.get(key), np.ndarray):
                state[key] = state[key].tolist()
        return state

    def set_substream_state(self, i: int, state: dict | str) -> None:
        """Record substream ``i``'s progress (a state dict, compact or not, or it as JSON)."""
        self._substreams[i] = state
        self._live[i] = None

    def bad_shards(self) -> set[str]:
        return {url for i in range(self.num_substreams) for url in self.substream_state(i)["bad_shards"]}

    def reader(self, i: int) -> SubstreamReader:
        """A reader continuing substream ``i`` from its current state (the stream tracks it live)."""
        reader = SubstreamReader(
            self.shards,
            self.substream_state(i),
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            open_shards=self.open_shards,
            max_bad_fraction=self.max_bad_fraction,
            known_bad=self.bad_shards(),
            repeats=self.repeats,
            view_gap=self.batch_size,
            read_retries=self.read_retries,
            retry_backoff_s=self.retry_backoff_s,
        )
        self._live[i] = reader
        return reader

    def substream_remaining(self, i: int) -> int | None:
        """Views substream ``i`` has still to deliver this epoch (samples x repeats, less those delivered);
        None when shard sizes are unknown."""
        counts = [u.views_left(self.repeats) for u in remaining_units(self.substream_state(i))]
        return None if any(c is None for c in counts) else sum(counts)

    def samples_remaining(self) -> int | None:
        """Views (samples when ``repeats`` is 1) this rank has still to deliver this epoch; None when shard
        sizes are unknown."""
        counts = [self.substream_remaining(i) for i in range(self.num_substreams)]
        return None if any(c is None for c in counts) else sum(counts)

    def __iter__(self) -> Iterator[dict]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "open_stream() cannot track its state inside DataLoader workers; iterate it in the main "
                "process or use defocus_scale.data.loader.build_train_loader"
            )
        for i in range(self.num_substreams):
            reader = self.reader(i)
            for raw in reader:
                try:
                    yield decode_sample(raw, self.decode)
                except SampleDecodeError as exc:
                    reader.bad_samples += 1
                    logger.warning("skipping %s", exc)

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "repeats": self.repeats,
            "num_shards": len(self.shards),
            "fingerprint": self.fingerprint,
            "substreams": [self.substream_state(i) for i in range(self.num_substreams)],
        }

    def load_state_dict(self, states: Sequence[dict]) -> None:
        """Restore this rank from the states of all ranks of the old run (any old world size), or from this
        rank's own state alone when the world size is unchanged (what a checkpoint gives each rank then)."""
        states = sorted(states, key=lambda s: s.get("rank", -1))
        if not states or any(s.get("format") not in (STATE_FORMAT, *_OLD_STATE_FORMATS) for s in states):
            raise ValueError(f"load_state_dict expects a non-empty list of {STATE_FORMAT!r} states")
        states = [_upgraded(s) for s in states]
        old_world = states[0]["world_size"]
        own = (len(states) == 1 and old_world == self.world_size and states[0]["rank"] == self.rank
               and len(states[0]["substreams"]) == self.num_substreams)  # fmt: skip
        if not own and (
            [s["rank"] for s in states] != list(range(old_world))
            or {s["world_size"] for s in states} != {old_world}
        ):
            raise ValueError(f"need the states of all ranks 0..{old_world - 1} of the old run exactly once, "
                             f"got ranks {[s['rank'] for s in states]}")
        if {s["epoch"] for s in states} != {states[0]["epoch"]}:
            raise ValueError(f"old ranks disagree on the epoch: {[s['epoch'] for s in states]}")
        for s in states:
            if s["num_shards"] != len(self.shards) or s["fingerprint"] != self.fingerprint:
                raise ValueError(
                    f"state of rank {s['rank']} was saved for another shard list ({s['num_shards']} shards, "
                    f"fingerprint {s['fingerprint']}); this source has {len(self.shards)} shards "
                    f"({self.fingerprint})"
                )
            if s["repeats"] != self.repeats:
                raise ValueError(f"state of rank {s['rank']} was saved with repeated_aug={s['repeats']}, "
                                 f"this run has {self.repeats}: an epoch means different work under each")
        self.epoch = states[0]["epoch"]
        self._live = [None] * self.num_substreams
        if own:
            self._substreams = copy.deepcopy(states[0]["substreams"])
            return
        if old_world == self.world_size and all(len(s["substreams"]) == self.num_substreams for s in states):
            self._substreams = copy.deepcopy(states[self.rank]["substreams"])
            return
        subs = [sub for s in states for sub in s["substreams"]]
        units = [u for sub in subs for u in remaining_units(sub)]
        delivered = sum(sub["delivered"] for sub in subs)
        self._substreams = self._deal(units, generation=delivered + 1)
        bad = sorted({url for sub in subs for url in sub["bad_shards"]})
        for sub in self._substreams:
            sub["bad_shards"] = bad
        if self.rank == 0:  # the old totals are carried once, by rank 0
            self._substreams[0]["delivered"] = delivered
            self._substreams[0]["bad_samples"] = sum(sub["bad_samples"] for sub in subs)


def _upgraded(state: dict) -> dict:
    if state["format"] == STATE_FORMAT:
        return state
    return {**state, "format": STATE_FORMAT, "repeats": 1,
            "substreams": [upgrade_substream(sub) for sub in state["substreams"]]}  # fmt: skip


def open_stream(
    source: str | os.PathLike | Sequence[str | os.PathLike], *, rank: int, world_size: int, seed: int,
    epoch: int = 0, shuffle: bool = True, decode: bool = True, shuffle_buffer: int = 1000,
    open_shards: int = 8, max_bad_fraction: float = 0.05, num_substreams: int = 1, repeats: int = 1,
    batch_size: int = 1, read_retries: int = 3, retry_backoff_s: float = 0.5,
) -> ShardStream:
    """This rank's samples of ``epoch`` as dicts; see the module docstring for the exactly-once state.

    ``source``: a shard directory (with ``manifest.parquet``, else its ``*.tar``), a manifest path, a list
    of paths or URLs, a brace pattern (``train-{000000..000099}.tar``; the manifest beside the shards is
    used when there is one), or any URL webdataset or fsspec opens (``pipe:`` too). Without a manifest
    shard sizes are unknown and whole shards are dealt out (``defocus-scale index-shards`` writes one).
    """
    return ShardStream(
        source, rank=rank, world_size=world_size, seed=seed, epoch=epoch, shuffle=shuffle, decode=decode,
        shuffle_buffer=shuffle_buffer, open_shards=open_shards, max_bad_fraction=max_bad_fraction,
        num_substreams=num_substreams, repeats=repeats, batch_size=batch_size, read_retries=read_retries,
        retry_backoff_s=retry_backoff_s,
    )
