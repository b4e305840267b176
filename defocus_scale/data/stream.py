"""Exactly-once, resumable, elastic streaming of WebDataset shards.

An epoch's work is a list of :class:`WorkUnit` s -- a range of sample indices of one shard, or an
explicit set of indices ("picks") -- split deterministically over ranks and, within a rank, over
substreams (one per DataLoader worker). A substream reads ``open_shards`` units at once, interleaving
them at random into a bounded shuffle buffer, and draws samples from the buffer at random.

A substream's state is its pending units, the read position of each open unit, the ids of the raw
samples sitting in its buffer, and its random generator: no sample data. Restoring the same world
size and substream count re-reads the buffered samples and continues bit for bit; any other shape
unions the remaining work of all old ranks (buffered ids become picks units) and splits it again, so
every sample of the epoch is delivered exactly once in total across the restart.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import json
import logging
import os
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.utils.data
from PIL import Image
from webdataset.shardlists import expand_urls

from .manifest import shards_with_few_classes
from .tar_reader import iter_shard, open_url

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATE_FORMAT = "defocus_scale.stream/1"
MANIFEST_NAME = "manifest.parquet"


class ShardReadError(RuntimeError):
    """More shards failed (missing, truncated, corrupt) than ``max_bad_fraction`` allows."""


class SampleDecodeError(ValueError):
    """A sample lacks an image or label, or its image does not decode."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # from the manifest; None when unknown (counted only by reading)


# ----------------------------------------------------------------------------- sources


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _remote_directory(url: str) -> tuple[Any, str] | None:
    """``(filesystem, path)`` if ``url`` is a directory on an fsspec filesystem (``s3://bucket/shards``),
    else None (a shard URL, a brace pattern, ``pipe:``, a protocol fsspec does not know)."""
    if "{" in url or urlparse(url).scheme in ("pipe", "http", "https"):
        return None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError):  # no driver installed for the protocol: webdataset may still open it
        return None
    root = root.rstrip("/")
    return (fs, root) if fs.isdir(root) else None


def _shards_from_manifest(manifest: str) -> list[Shard]:
    if _is_local(manifest):
        table = pq.read_table(manifest)
    else:
        with open_url(manifest) as stream:
            table = pq.read_table(pa.BufferReader(stream.read()))
    missing = {"shard", "samples"} - set(table.column_names)
    if missing:
        raise ValueError(f"manifest {manifest} lacks column(s) {sorted(missing)}")
    _warn_if_shards_hold_few_classes(manifest, table)
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    names = table.column("shard").to_pylist()
    counts = table.column("samples").to_pylist()
    return [Shard(f"{base}/{name}", int(count)) for name, count in zip(names, counts)]


_CHECKED_MANIFESTS: set[str] = set()


def _warn_if_shards_hold_few_classes(manifest: str, table: pa.Table) -> None:
    if manifest in _CHECKED_MANIFESTS:  # once per process
        return
    _CHECKED_MANIFESTS.add(manifest)
    few, checked = shards_with_few_classes(table)
    if few:
        examples = ", ".join(f"{name}: {present} of ~{mixed:.0f}" for name, present, mixed in few[:5])
        examples += f" and {len(few) - 5} more" if len(few) > 5 else ""
        logger.warning(
            "%d of %d shards checked in %s hold few classes each (classes present, of those a random sample "
            "would hold: %s). They were probably written in class order, so batches will hold few classes; "
            "rewrite them with `defocus-scale make-shards` (which shuffles).",
            len(few), checked, manifest, examples,
        )  # fmt: skip


def resolve_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Shard]:
    """Shards of a directory (its manifest, else its ``*.tar``), a manifest, a list, a pattern or a URL."""
    if isinstance(source, (list, tuple)):
        urls = [str(s) for s in source]
    else:
        source = str(source)
        if _is_local(source) and os.path.isdir(source):
            if os.path.exists(os.path.join(source, MANIFEST_NAME)):
                return _shards_from_manifest(os.path.join(source, MANIFEST_NAME))
            urls = sorted(str(p) for p in Path(source).glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"shard directory {source} has no {MANIFEST_NAME} and no .tar files")
        elif source.endswith(".parquet"):
            return _shards_from_manifest(source)
        elif (remote := _remote_directory(source)) is not None:
            fs, root = remote
            if fs.isfile(f"{root}/{MANIFEST_NAME}"):
                return _shards_from_manifest(f"{source.rstrip('/')}/{MANIFEST_NAME}")
            urls = sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{glob.escape(root)}/*.tar"))
            if not urls:
                raise FileNotFoundError(f"shard directory {source} has no {MANIFEST_NAME} and no .tar files")
        else:
            urls = expand_urls(source)
    if not urls:
        raise ValueError(f"shard source {source!r} names no shards")
    local = [u for u in urls if _is_local(u)]
    if local and len(local) == len(urls) and not any(os.path.exists(urlparse(u).path) for u in local):
        raise FileNotFoundError(f"none of the {len(urls)} shard(s) of {source!r} exists (first: {urls[0]})")
    return [Shard(u, None) for u in urls]


def shard_fingerprint(shards: Sequence[Shard]) -> str:
    """Identifies the shard list by file names, so a moved copy of the same shards still matches."""
    names = "\n".join(urlparse(s.url).path.rsplit("/", 1)[-1] or s.url for s in shards)
    return hashlib.sha1(names.encode()).hexdigest()[:16]


def decode_sample(raw: dict[str, Any], decode: bool = True) -> dict[str, Any]:
    """``{"__key__", "__url__", "__shard__", "__index__", "label", "image" | <ext>: bytes}``."""
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


# ----------------------------------------------------------------------------- work units


@dataclass(frozen=True)
class WorkUnit:
    """Samples ``start <= index < stop`` of one shard (stop None: to its end), or only ``picks`` of them."""

    shard: int
    start: int
    stop: int | None
    picks: tuple[int, ...] | None = None

    @property
    def size(self) -> int | None:
        if self.picks is not None:
            return len(self.picks)
        return None if self.stop is None else self.stop - self.start

    def slice(self, begin: int, end: int) -> WorkUnit:
        """Samples ``begin:end`` of this unit (positions within it; its size must be known)."""
        if self.picks is not None:
            picks = self.picks[begin:end]
            return WorkUnit(self.shard, picks[0], picks[-1] + 1, picks)
        return WorkUnit(self.shard, self.start + begin, self.start + end)

    def after(self, position: int) -> WorkUnit | None:
        """What is left once every index below ``position`` has been read."""
        if self.picks is not None:
            picks = tuple(i for i in self.picks if i >= position)
            return WorkUnit(self.shard, picks[0], picks[-1] + 1, picks) if picks else None
        if self.stop is not None and position >= self.stop:
            return None
        return WorkUnit(self.shard, max(self.start, position), self.stop)

    def to_json(self) -> list:
        return [self.shard, self.start, self.stop, list(self.picks) if self.picks is not None else None]

    @classmethod
    def from_json(cls, data: Sequence) -> WorkUnit:
        shard, start, stop, picks = data[:4]
        return cls(int(shard), int(start), stop, tuple(picks) if picks is not None else None)


def split_work(units: Sequence[WorkUnit], parts: int) -> list[list[WorkUnit]]:
    """Contiguous cuts with sample counts equal to within one when all sizes are known, else round-robin."""
    result: list[list[WorkUnit]] = [[] for _ in range(parts)]
    sizes = [u.size for u in units]
    if any(size is None for size in sizes):
        for i, unit in enumerate(units):
            result[i % parts].append(unit)
        return result
    total = sum(sizes)
    bounds = [total * p // parts for p in range(parts + 1)]
    offset, part = 0, 0
    for unit, size in zip(units, sizes):
        taken = 0
        while taken < size:
            while offset + taken >= bounds[part + 1]:
                part += 1
            take = min(size - taken, bounds[part + 1] - offset - taken)
            result[part].append(unit.slice(taken, taken + take))
            taken += take
        offset += size
    return result


def remaining_units(substream: dict) -> list[WorkUnit]:
    """A substream state's unread work: its buffered samples (as picks, one unit per shard) first."""
    by_shard: dict[int, list[int]] = {}
    for shard, index in substream["buffered"]:
        by_shard.setdefault(shard, []).append(index)
    units = [WorkUnit(s, min(ids), max(ids) + 1, tuple(sorted(ids))) for s, ids in by_shard.items()]
    for entry in substream["open"]:
        rest = WorkUnit.from_json(entry).after(entry[4])
        if rest is not None:
            units.append(rest)
    units.extend(WorkUnit.from_json(u) for u in substream["pending"])
    return units


def _generator(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def _new_substream(units: Sequence[WorkUnit], rng: np.random.Generator) -> dict:
    return {
        "pending": [u.to_json() for u in units],
        "open": [],
        "buffered": [],
        "rng": rng.bit_generator.state,
        "delivered": 0,
        "bad_shards": [],
        "bad_samples": 0,
    }


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
    ) -> None:
        self.shards = shards
        self.shuffle = shuffle
        self.buffer_size = shuffle_buffer if shuffle else 0
        self.open_limit = max(1, open_shards) if shuffle else 1
        self.max_bad_fraction = max_bad_fraction
        self.known_bad = set(known_bad)
        self.pending = deque(WorkUnit.from_json(u) for u in state["pending"])
        self.open: list[list] = [[WorkUnit.from_json(e), int(e[4]), None] for e in state["open"]]
        self.unfilled: list[tuple[int, int]] = [(int(s), int(i)) for s, i in state["buffered"]]
        self.buffer: list[dict] = []
        # (shard << 32) | index of each buffered sample, for state_dict: a typed array copies to numpy at once
        self.buffer_ids = array("q")
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.delivered = int(state["delivered"])
        self.bad_shards = set(state["bad_shards"])
        self.bad_samples = int(state["bad_samples"])

    def state_dict(self, compact: bool = False) -> dict:
        """What is left, JSON-able; ``compact``: "buffered" as an int (n, 2) array (cheaper to send)."""
        ids = np.array(self.buffer_ids, dtype=np.int64)
        buffered = np.concatenate([np.stack([ids >> 32, ids & 0xFFFFFFFF], axis=1),
                                   np.array(self.unfilled, dtype=np.int64).reshape(-1, 2)])
        return {
            "pending": [u.to_json() for u in self.pending],
            "open": [[*unit.to_json(), position] for unit, position, _ in self.open],
            "buffered": buffered if compact else buffered.tolist(),
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

    def _tag(self, shard: int, index: int, raw: dict) -> dict:
        raw["__shard__"], raw["__index__"], raw["__url__"] = shard, index, self.shards[shard].url
        return raw

    def _refill(self) -> None:
        """Re-read the samples a restored state had in its buffer, keeping their buffer order."""
        by_shard: dict[int, list[int]] = {}
        for shard, index in self.unfilled:
            by_shard.setdefault(shard, []).append(index)
        found: dict[tuple[int, int], dict] = {}
        for shard, indices in by_shard.items():
            try:
                for index, raw in iter_shard(self.shards[shard].url, picks=indices):
                    found[shard, index] = self._tag(shard, index, raw)
            except Exception as exc:  # noqa: BLE001 - any read failure makes the shard bad
                self._shard_failed(shard, f"{type(exc).__name__}: {exc}")
            lost = [i for i in indices if (shard, i) not in found]
            if lost and self.shards[shard].url not in self.bad_shards:
                self._shard_failed(shard, f"buffered sample(s) {lost[:5]} no longer in the shard")
        self.buffer = [found[i] for i in self.unfilled if i in found]
        kept = [(shard, index) for shard, index in self.unfilled if (shard, index) in found]
        self.buffer_ids = array("q", [shard << 32 | index for shard, index in kept])
        self.unfilled = []

    def _read(self, slot: int) -> dict | None:
        """The next sample of open unit ``slot``; closes the unit (and returns None) when it is done."""
        unit, position, iterator = self.open[slot]
        if iterator is None:
            rest = unit.after(position)
            iterator = iter_shard(self.shards[unit.shard].url, rest.start, rest.stop, rest.picks)
            self.open[slot][2] = iterator
        try:
            index, raw = next(iterator)
        except StopIteration:
            end = unit.picks[-1] + 1 if unit.picks is not None else unit.stop
            if end is not None and position < end:
                self._shard_failed(unit.shard, f"ended before sample {position} (expected {end})")
            del self.open[slot]
            return None
        except Exception as exc:  # noqa: BLE001 - missing file, truncated or corrupt tar
            del self.open[slot]
            iterator.close()
            self._shard_failed(unit.shard, f"{type(exc).__name__}: {exc}")
            return None
        self.open[slot][1] = index + 1
        end = unit.picks[-1] + 1 if unit.picks is not None else unit.stop
        if end is not None and index + 1 >= end:  # a known end: close now, not at a later read attempt
            iterator.close()
            del self.open[slot]
        return self._tag(unit.shard, index, raw)

    def _choice(self, n: int) -> int:
        # Raw 64-bit draws modulo n: a tenth of Generator.integers' call cost, bias below 2**-50.
        return self.rng.bit_generator.random_raw() % n if self.shuffle and n > 1 else 0

    def __iter__(self) -> Iterator[dict]:
        if self.unfilled:
            self._refill()
        while True:
            while len(self.open) < self.open_limit and self.pending:
                self.open.append([self.pending.popleft(), 0, None])
            if self.open and len(self.buffer) < self.buffer_size:
                raw = self._read(self._choice(len(self.open)))
                if raw is not None:
                    self.buffer.append(raw)
                    self.buffer_ids.append(raw["__shard__"] << 32 | raw["__index__"])
                continue
            if self.buffer:
                slot = self._choice(len(self.buffer))
                raw = self.buffer[slot]
                self.buffer[slot], self.buffer_ids[slot] = self.buffer[-1], self.buffer_ids[-1]
                self.buffer.pop()
                self.buffer_ids.pop()
            elif self.open:
                raw = self._read(self._choice(len(self.open)))
                if raw is None:
                    continue
            else:
                return
            self.delivered += 1
            yield raw


# ----------------------------------------------------------------------------- one rank


class ShardStream:
    """One rank's share of an epoch of shards, split into ``num_substreams`` (DataLoader workers)."""

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
        open_shards: int = 4,
        max_bad_fraction: float = 0.05,
        num_substreams: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0 or epoch < 0 or num_substreams < 1:
            raise ValueError(f"seed and epoch must be >= 0, num_substreams >= 1 (got {seed}, {epoch}, "
                             f"{num_substreams})")
        self.shards = resolve_shards(source)
        self.fingerprint = shard_fingerprint(self.shards)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.decode = shuffle, decode
        self.shuffle_buffer, self.open_shards = shuffle_buffer, open_shards
        self.max_bad_fraction = max_bad_fraction
        self.num_substreams = num_substreams
        self.epoch = epoch
        self._substreams = self._fresh_plan()
        self._live: list[SubstreamReader | None] = [None] * num_substreams

    def _fresh_plan(self) -> list[dict]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = _generator(self.seed, self.epoch).permutation(order)
        units = [WorkUnit(int(i), 0, self.shards[i].samples) for i in order]
        return self._split_for_rank(units, generation=0)

    def _split_for_rank(self, units: Sequence[WorkUnit], generation: int) -> list[dict]:
        mine = split_work(split_work(units, self.world_size)[self.rank], self.num_substreams)
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
        if isinstance(state["buffered"], np.ndarray):  # a compact state, as DataLoader workers send it
            state["buffered"] = state["buffered"].tolist()
        return state

    def set_substream_state(self, i: int, state: dict | str) -> None:
        """Record substream ``i``'s progress (a state dict, compact or not, or it as JSON)."""
        self._substreams[i] = state
        self._live[i] = None

    def bad_shards(self) -> set[str]:
        return {url for i in range(self.num_substreams) for url in self.substream_state(i)["bad_shards"]}

    def reader(self, i: int) -> SubstreamReader:
        """A reader continuing substream ``i`` from its current state (the stream tracks it live)."""
        state = self.substream_state(i)
        reader = SubstreamReader(
            self.shards,
            state,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            open_shards=self.open_shards,
            max_bad_fraction=self.max_bad_fraction,
            known_bad=self.bad_shards(),
        )
        self._live[i] = reader
        return reader

    def substream_remaining(self, i: int) -> int | None:
        """Samples substream ``i`` has still to deliver this epoch (None when shard sizes are unknown)."""
        sizes = [u.size for u in remaining_units(self.substream_state(i))]
        return None if any(s is None for s in sizes) else sum(sizes)

    def samples_remaining(self) -> int | None:
        """Samples this rank has still to deliver this epoch (None when shard sizes are unknown)."""
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
            "num_shards": len(self.shards),
            "fingerprint": self.fingerprint,
            "substreams": [self.substream_state(i) for i in range(self.num_substreams)],
        }

    def load_state_dict(self, states: Sequence[dict]) -> None:
        """Restore this rank from the states of all ranks of the old run (any old world size), or from this
        rank's own state alone when the world size is unchanged (what a checkpoint gives each rank then)."""
        states = sorted(states, key=lambda s: s.get("rank", -1))
        if not states or any(s.get("format") != STATE_FORMAT for s in states):
            raise ValueError(f"load_state_dict expects a non-empty list of {STATE_FORMAT!r} states")
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
        self._substreams = self._split_for_rank(units, generation=delivered + 1)
        bad = sorted({url for sub in subs for url in sub["bad_shards"]})
        for sub in self._substreams:
            sub["bad_shards"] = bad
        if self.rank == 0:  # the old totals are carried once, by rank 0
            self._substreams[0]["delivered"] = delivered
            self._substreams[0]["bad_samples"] = sum(sub["bad_samples"] for sub in subs)


def open_stream(
    source: str | os.PathLike | Sequence[str | os.PathLike], *, rank: int, world_size: int, seed: int,
    epoch: int = 0, shuffle: bool = True, decode: bool = True, shuffle_buffer: int = 1000,
    open_shards: int = 4, max_bad_fraction: float = 0.05,
) -> ShardStream:
    """This rank's samples of ``epoch`` as dicts; see the module docstring for the exactly-once state.

    ``source``: a shard directory (with ``manifest.parquet``, else its ``*.tar``), a manifest path, a list
    of paths or URLs, a brace pattern (``train-{000000..000099}.tar``), or any URL webdataset or fsspec
    opens (``pipe:`` too). Without a manifest, shard sizes are unknown and whole shards are dealt out.
    """
    return ShardStream(
        source, rank=rank, world_size=world_size, seed=seed, epoch=epoch, shuffle=shuffle, decode=decode,
        shuffle_buffer=shuffle_buffer, open_shards=open_shards, max_bad_fraction=max_bad_fraction,
    )
