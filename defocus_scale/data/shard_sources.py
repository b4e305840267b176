"""The sources of ``make-shards``: cutting a source into chunks (a worker writes each chunk) and reading
the items of a chunk.

Shuffling (``shuffle_seed`` not None, the default) happens here, so that every shard mixes the classes:
a source listed class by class (an ImageFolder walk, a label-sorted Parquet file) would otherwise give
shards of one or two classes, and a reader's bounded shuffle (a few open shards, a buffer) could not mix
them into useful batches.

* ImageFolder: the list of files is permuted, so every shard is a uniform random sample of the tree.
* Synthetic: the list of indices is permuted (labels are random per index anyway).
* Parquet is read streaming, whole row groups at a time: the list of (file, row group) is permuted and
  packed into windows of about ``MIX_WINDOW_SHARDS`` shards' worth of rows; one worker reads a window's
  row groups once each and sends every row to one of the window's shards by a seeded permutation of its
  rows. Guarantee: each shard is a uniform random sample of its window, and a window is row groups
  drawn at random from all files; memory stays at one row group plus the open shard writers. (Rows of
  one row group keep their relative order inside a shard; the reader's shuffle buffer mixes those.)

Keys come from the source (the file's path, the Parquet file and row, the synthetic index), never from
the order, so a key names the same image whatever the seed.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from defocus_scale.data.synthetic import synthetic_image

SYNTHETIC = "synthetic"
MIX_WINDOW_SHARDS = 8  # Parquet: shards written together from randomly drawn row groups
_PARQUET_BATCH_ROWS = 256


class Skip(Exception):
    """A source item that cannot be written; the message is the reason."""


@dataclass(frozen=True)
class FileItem:
    path: str
    name: str  # path relative to the source root, for messages
    key: str
    label: int


@dataclass(frozen=True)
class RowRange:
    """Rows ``start .. stop - 1`` of a Parquet file, in file order (no shuffling)."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class RowGroup:
    path: str
    group: int
    first_row: int  # index in its file of the group's first row (keys name file rows)
    rows: int


@dataclass(frozen=True)
class ParquetWindow:
    """Whole row groups written together into ``ceil(rows / samples_per_shard)`` shards; the k-th row
    read goes to shard ``slots()[k]``."""

    groups: tuple[RowGroup, ...]
    samples_per_shard: int
    seed: int
    index: int  # of the window: each window draws its own permutation

    def slots(self) -> np.ndarray:
        rows = sum(group.rows for group in self.groups)
        return np.random.default_rng([self.seed, self.index]).permutation(rows) // self.samples_per_shard


@dataclass(frozen=True)
class SyntheticIndices:
    indices: tuple[int, ...]


ChunkPart = FileItem | RowRange | ParquetWindow | SyntheticIndices


@dataclass(frozen=True)
class SyntheticOptions:
    classes: int
    image_size: int
    seed: int


@dataclass
class Plan:
    chunks: list[list[ChunkPart]]
    classes: list[str] | None  # None: named after the labels seen
    items: int
    skipped: list[tuple[str, str]]


def safe_key(text: str) -> str:
    # WebDataset splits a member name at the first dot of its base name, and USTAR names are short.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:80]


# ---------------------------------------------------------------- planning


def _plan_folder(root: Path, samples_per_shard: int, shuffle_seed: int | None) -> Plan:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders (expected an ImageFolder tree: <class>/<image>)")
    skipped = [(p.name, "not inside a class folder") for p in sorted(root.iterdir()) if p.is_file()]
    items: list[ChunkPart] = []
    keys: set[str] = set()
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for filename in sorted(filenames):
                relative = Path(dirpath, filename).relative_to(root).as_posix()
                key = safe_key(relative.rsplit(".", 1)[0])
                if key in keys:  # two names that differ only in characters a key cannot hold
                    key = f"{key[:70]}_{len(items)}"  # (assigned in sorted order: stable whatever the seed)
                keys.add(key)
                items.append(FileItem(str(Path(dirpath, filename)), relative, key, label))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    chunks = [items[i : i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    return Plan(chunks, classes, len(items), skipped)


def _parquet_class_names(schema_metadata: dict[bytes, bytes] | None) -> list[str] | None:
    """The ClassLabel names the Hugging Face datasets library stores in the schema metadata, if any."""
    try:
        info = json.loads((schema_metadata or {})[b"huggingface"])
        names = info["info"]["features"]["label"]["names"]
    except (KeyError, TypeError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _open_parquet_files(files: list[Path]) -> tuple[list[pq.ParquetFile], list[str] | None]:
    opened, classes = [], None
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise ValueError(f"cannot read {path} as Parquet: {exc}") from exc
        missing = {"image", "label"} - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(sorted(missing))} of the Hugging Face "
                             "image layout (image: struct<bytes, path>, label: int)")  # fmt: skip
        classes = classes or _parquet_class_names(parquet.schema_arrow.metadata)
        opened.append(parquet)
    return opened, classes


def _plan_parquet_in_order(files: list[Path], samples_per_shard: int) -> Plan:
    parquets, classes = _open_parquet_files(files)
    chunks: list[list[ChunkPart]] = [[]]
    filled, total = 0, 0
    for path, parquet in zip(files, parquets):
        rows, start = parquet.metadata.num_rows, 0
        total += rows
        while start < rows:
            take = min(samples_per_shard - filled, rows - start)
            chunks[-1].append(RowRange(str(path), start, start + take))
            start, filled = start + take, filled + take
            if filled == samples_per_shard:
                chunks.append([])
                filled = 0
    return Plan([c for c in chunks if c], classes, total, [])


def _plan_parquet_mixed(files: list[Path], samples_per_shard: int, shuffle_seed: int) -> Plan:
    parquets, classes = _open_parquet_files(files)
    groups: list[RowGroup] = []
    for path, parquet in zip(files, parquets):
        first_row = 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if rows:
                groups.append(RowGroup(str(path), group, first_row, rows))
            first_row += rows
    random.Random(shuffle_seed).shuffle(groups)
    window_rows = MIX_WINDOW_SHARDS * samples_per_shard
    chunks: list[list[ChunkPart]] = []
    window: list[RowGroup] = []
    filled = 0
    for group in groups:
        window.append(group)
        filled += group.rows
        if filled >= window_rows or group is groups[-1]:
            chunks.append([ParquetWindow(tuple(window), samples_per_shard, shuffle_seed, len(chunks))])
            window, filled = [], 0
    return Plan(chunks, classes, sum(group.rows for group in groups), [])


def _plan_synthetic(samples: int, num_classes: int, samples_per_shard: int, shuffle_seed: int | None) -> Plan:
    order = np.arange(samples)
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    chunks: list[list[ChunkPart]] = [
        [SyntheticIndices(tuple(int(i) for i in order[start : start + samples_per_shard]))]
        for start in range(0, samples, samples_per_shard)
    ]
    return Plan(chunks, [f"class_{c:03d}" for c in range(num_classes)], samples, [])


def plan_source(
    source: str | Path, samples_per_shard: int, synthetic_samples: int, synthetic_classes: int,
    shuffle_seed: int | None,
) -> Plan:  # fmt: skip
    """Chunks of ``source`` (an ImageFolder directory, Parquet file(s), a glob or ``synthetic``)."""
    if str(source) == SYNTHETIC:
        return _plan_synthetic(synthetic_samples, synthetic_classes, samples_per_shard, shuffle_seed)
    path = Path(source)
    parquet_files: list[Path] = []
    if path.is_file():
        parquet_files = [path]
    elif path.is_dir():
        parquet_files = sorted(path.rglob("*.parquet"))
        if not parquet_files:
            return _plan_folder(path, samples_per_shard, shuffle_seed)
    elif glob.has_magic(str(source)):
        parquet_files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not parquet_files:
            raise FileNotFoundError(f"no files match the source pattern {source}")
    else:
        raise FileNotFoundError(f"source not found: {source} (expected an ImageFolder directory, Parquet "
                                f"file(s) or '{SYNTHETIC}')")  # fmt: skip
    if shuffle_seed is None:
        return _plan_parquet_in_order(parquet_files, samples_per_shard)
    return _plan_parquet_mixed(parquet_files, samples_per_shard, shuffle_seed)


# ---------------------------------------------------------------- reading (worker side)


def read_chunk(chunk: list[ChunkPart], synthetic: SyntheticOptions) -> Iterator[tuple[str, str, object, int]]:
    """``(name, key, payload, slot)`` per source item: payload is ``(image bytes or PIL image, label)`` or
    a ``Skip``; slot numbers the shard of the chunk the item goes to (0 unless a Parquet window)."""
    for part in chunk:
        if isinstance(part, FileItem):
            try:
                yield part.name, part.key, (Path(part.path).read_bytes(), part.label), 0
            except OSError as exc:
                yield part.name, part.key, Skip(f"unreadable file: {exc.strerror or exc}"), 0
        elif isinstance(part, SyntheticIndices):
            for index in part.indices:
                image: Image.Image
                image, label = synthetic_image(
                    index, image_size=synthetic.image_size, num_classes=synthetic.classes, seed=synthetic.seed
                )  # fmt: skip
                yield f"synthetic#{index}", f"synthetic_{index:08d}", (image, label), 0
        elif isinstance(part, ParquetWindow):
            yield from _read_parquet_window(part)
        else:
            for name, key, payload in _read_parquet_rows(part):
                yield name, key, payload, 0


def _row_items(path: str, batch: pa.RecordBatch, first_row: int) -> Iterator[tuple[str, str, object]]:
    file_key, file_name, base = safe_key(Path(path).stem)[:60], Path(path).name, Path(path).parent
    images, labels = batch.column("image").to_pylist(), batch.column("label").to_pylist()
    for row, (image, label) in enumerate(zip(images, labels), first_row):
        yield f"{file_name}#row{row}", f"{file_key}_{row:08d}", _parquet_payload(image, label, base)


def _read_parquet_window(window: ParquetWindow) -> Iterator[tuple[str, str, object, int]]:
    """Each row group of the window once, in the window's (shuffled) order."""
    slots = window.slots()
    opened: dict[str, pq.ParquetFile] = {}
    read = 0
    for group in window.groups:
        if group.path not in opened:
            opened[group.path] = pq.ParquetFile(group.path)
        row = group.first_row
        batches = opened[group.path].iter_batches(_PARQUET_BATCH_ROWS, [group.group], ["image", "label"])
        for batch in batches:
            for name, key, payload in _row_items(group.path, batch, row):
                yield name, key, payload, int(slots[read])
                read += 1
            row += batch.num_rows


def _read_parquet_rows(part: RowRange) -> Iterator[tuple[str, str, object]]:
    """Stream the rows of ``part`` batch by batch, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(part.path)
    groups, row, offset = [], None, 0
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if offset < part.stop and offset + rows > part.start:
            groups.append(group)
            row = offset if row is None else row
        offset += rows
    row = row or 0
    for batch in parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=groups, columns=["image", "label"]):
        batch_start, row = row, row + batch.num_rows
        if batch_start >= part.stop:
            break
        first, last = max(part.start, batch_start), min(part.stop, row)
        if first >= last:
            continue  # rows of a shared row group before this part: never converted to Python
        yield from _row_items(part.path, batch.slice(first - batch_start, last - first), first)


def _parquet_payload(image: object, label: object, base: Path) -> object:
    if not isinstance(label, int) or isinstance(label, bool):
        return Skip(f"unreadable label {label!r}")
    if not isinstance(image, dict):
        return Skip("no image struct")
    if image.get("bytes"):
        return image["bytes"], label
    if image.get("path"):  # the datasets layout may refer to a file instead of embedding it
        try:
            return (base / image["path"]).read_bytes(), label
        except OSError as exc:
            return Skip(f"image path {image['path']!r} unreadable: {exc.strerror or exc}")
    return Skip("image has neither bytes nor path")
