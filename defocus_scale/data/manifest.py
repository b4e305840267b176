"""The files that describe a directory of shards: ``manifest.parquet`` (one row per shard),
``classes.json`` (class names, index = label) and ``skipped.json`` (source items left out, with the
reason); and the summary of a ``make_shards`` run."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.parquet"
CLASSES_NAME = "classes.json"
SKIPPED_NAME = "skipped.json"
_SUMMARY_LINES = 20
_CLASS_MIX_CELLS = 4_000_000  # shards x classes the class-mix check looks at, at most (cost bound)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),  # file name, relative to the manifest's directory
        pa.field("samples", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("class_counts", pa.list_(pa.int64()), nullable=False),  # index = class id
    ]
)


@dataclass
class ShardSummary:
    """What one ``make_shards`` run wrote."""

    shards: int
    samples: int
    skipped: list[tuple[str, str]]  # (source item, reason)
    out_dir: Path | str  # a local folder, or the URL of an object-store prefix
    manifest: Path | str
    classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShardRecord:
    """One row of the manifest."""

    shard: str
    samples: int
    bytes: int
    class_counts: tuple[int, ...]


def _replace_atomically(path: Path, payload: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_manifest(out_dir: str | Path, records: Sequence[ShardRecord], num_classes: int) -> Path:
    """Write ``manifest.parquet`` (class counts padded to ``num_classes``); returns its path."""
    out_dir = Path(out_dir)
    counts = [list(r.class_counts) + [0] * (num_classes - len(r.class_counts)) for r in records]
    table = pa.table(
        {
            "shard": [r.shard for r in records],
            "samples": [r.samples for r in records],
            "bytes": [r.bytes for r in records],
            "class_counts": counts,
        },
        schema=MANIFEST_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = out_dir / MANIFEST_NAME
    _replace_atomically(path, sink.getvalue().to_pybytes())
    return path


def write_classes(out_dir: str | Path, classes: Sequence[str]) -> Path:
    path = Path(out_dir) / CLASSES_NAME
    _replace_atomically(path, (json.dumps(list(classes), indent=1) + "\n").encode("utf-8"))
    return path


def write_skipped(out_dir: str | Path, skipped: Sequence[tuple[str, str]]) -> Path:
    """``skipped.json``: every source item left out, with the reason."""
    path = Path(out_dir) / SKIPPED_NAME
    _replace_atomically(path, (json.dumps([list(s) for s in skipped], indent=1) + "\n").encode("utf-8"))
    return path


def print_summary(summary: ShardSummary, file: TextIO | None = None) -> None:
    out = file or sys.stdout
    print(f"wrote {summary.samples} samples of {len(summary.classes)} classes in {summary.shards} shards "
          f"to {summary.out_dir}", file=out)  # fmt: skip
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} item(s) (all listed in {SKIPPED_NAME}):", file=out)
        for name, reason in summary.skipped[:_SUMMARY_LINES]:
            print(f"  {name}: {reason}", file=out)
        if len(summary.skipped) > _SUMMARY_LINES:
            print(f"  … and {len(summary.skipped) - _SUMMARY_LINES} more", file=out)


def read_manifest(out_dir_or_manifest: str | Path) -> pa.Table:
    """The manifest of a shard directory (or the manifest file itself) as a table with the columns
    shard, samples, bytes, class_counts."""
    path = Path(out_dir_or_manifest)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path} (write one with `defocus-scale make-shards`)")
    table = pq.read_table(path)
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{path} is not a shard manifest: it lacks the column(s) {', '.join(missing)}")
    return table


def read_classes(out_dir: str | Path) -> list[str]:
    """Class names of a shard directory, index = label."""
    path = Path(out_dir)
    if path.is_dir():
        path = path / CLASSES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no class list at {path} (write one with `defocus-scale make-shards`)")
    classes = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise ValueError(f"{path} must hold a JSON list of class names")
    return classes


def shards_with_few_classes(table: pa.Table) -> tuple[list[tuple[str, int, float]], int]:
    """``(shard, classes present, classes expected)`` for the shards of a manifest holding fewer than half
    the distinct classes that a random sample of their size would hold (given the classes' overall
    frequencies): the mark of shards written in class order, whose batches a reader's bounded shuffle
    cannot mix; and how many shards were checked (evenly spaced ones, when shards x classes is large).
    Nothing is found when the manifest has no usable per-class counts."""
    if "class_counts" not in table.column_names or table.num_rows == 0:
        return [], 0
    chunks = table.column("class_counts")
    column = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or lengths.min() != lengths.max() or lengths[0] < 2:
        return [], 0  # (make_shards pads every row to the number of classes)
    counts = column.flatten().to_numpy(zero_copy_only=False).reshape(len(lengths), int(lengths[0]))
    totals = counts.sum(axis=0)
    if totals.sum() == 0:
        return [], 0
    fractions = totals / totals.sum()
    wanted = min(len(counts), _CLASS_MIX_CELLS // len(totals) + 1)
    checked = np.unique(np.linspace(0, len(counts) - 1, wanted, dtype=np.int64))
    rows = counts[checked]
    expected = (1.0 - (1.0 - fractions) ** rows.sum(axis=1, keepdims=True)).sum(axis=1)
    present = (rows > 0).sum(axis=1)
    names = table.column("shard").to_pylist()
    found = [
        (names[int(checked[i])], int(present[i]), float(expected[i]))
        for i in np.flatnonzero((expected > 2.0) & (present < expected / 2.0))
    ]
    return found, len(checked)
