"""The files that describe a directory of shards: ``manifest.parquet`` (one row per shard),
``classes.json`` (class names, index = label) and ``skipped.json`` (source items left out, with the
reason); the summary of a ``make_shards`` run; and ``defocus-scale index-shards``, which writes the
manifest of shards that exist already from their tar headers alone."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

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
        # byte offset in the tar of each sample's first member header (len = samples): readers seek there
        pa.field("offsets", pa.list_(pa.int64()), nullable=False),
    ]
)
_OPTIONAL_COLUMNS = ("offsets",)  # manifests written before they were recorded lack them


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
    offsets: tuple[int, ...]  # byte offset of each sample's first tar header


def _replace_atomically(path: Path, payload: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def manifest_payload(records: Sequence[ShardRecord], num_classes: int) -> bytes:
    """The Parquet bytes of a manifest of ``records`` (class counts padded to ``num_classes``)."""
    for record in records:
        if len(record.offsets) != record.samples:
            raise ValueError(f"shard {record.shard}: {len(record.offsets)} offsets for {record.samples} "
                             "samples")  # fmt: skip
    counts = [list(r.class_counts) + [0] * (num_classes - len(r.class_counts)) for r in records]
    table = pa.table(
        {
            "shard": [r.shard for r in records],
            "samples": [r.samples for r in records],
            "bytes": [r.bytes for r in records],
            "class_counts": counts,
            "offsets": [list(r.offsets) for r in records],
        },
        schema=MANIFEST_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_manifest(out_dir: str | Path, records: Sequence[ShardRecord], num_classes: int) -> Path:
    """Write ``manifest.parquet`` (class counts padded to ``num_classes``); returns its path."""
    path = Path(out_dir) / MANIFEST_NAME
    _replace_atomically(path, manifest_payload(records, num_classes))
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


def _is_url(location: str) -> bool:
    """An fsspec URL (s3://...), not a local path (``file:`` URLs and Windows drives count as local)."""
    scheme = urlparse(location).scheme
    return len(scheme) > 1 and scheme != "file"


def _local(location: str) -> str:
    return urlparse(location).path if location.startswith("file:") else location


def read_manifest(out_dir_or_manifest: str | Path) -> pa.Table:
    """The manifest of a shard directory (or the manifest file itself; local, or an fsspec URL) as a table
    with the columns shard, samples, bytes, class_counts and, unless written before they were recorded,
    offsets."""
    location = str(out_dir_or_manifest)
    if _is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        if fs.isdir(path):
            path, location = f"{path.rstrip('/')}/{MANIFEST_NAME}", f"{location.rstrip('/')}/{MANIFEST_NAME}"
        if not fs.isfile(path):
            raise FileNotFoundError(f"no shard manifest at {location} (write one with `defocus-scale "
                                    "make-shards` or `defocus-scale index-shards`)")  # fmt: skip
        table = pq.read_table(pa.BufferReader(fs.cat_file(path)))
    else:
        local = Path(_local(location))
        if local.is_dir():
            local = local / MANIFEST_NAME
        if not local.is_file():
            raise FileNotFoundError(f"no shard manifest at {local} (write one with `defocus-scale "
                                    "make-shards` or `defocus-scale index-shards`)")  # fmt: skip
        table, location = pq.read_table(local), str(local)
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names and n not in _OPTIONAL_COLUMNS]
    if missing:
        raise ValueError(f"{location} is not a shard manifest: it lacks the column(s) {', '.join(missing)}")
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


# ---------------------------------------------------------------- index-shards

INDEX_DESCRIPTION = """\
Write manifest.parquet for shards that exist already (made elsewhere, or whose manifest was lost), from
their tar headers alone: samples, bytes, each sample's byte offset and the class counts of the .cls
labels. Member data is seeked past (only the few bytes of each .cls are read), so a shard costs about
1 KiB of reads a sample, on an object store two ranged requests a sample: --workers scans that many
shards at once. SOURCE is a shard directory, an object-store prefix (s3://bucket/prefix) or a brace
pattern (.../train-{000000..000009}.tar); the manifest goes beside the shards (the pattern's
directory, the prefix) or to --out, with shard names relative to its directory. classes.json beside
the shards, if there is one, sets the number of classes."""


class ShardIndexError(RuntimeError):
    """A shard could not be indexed (missing, unreadable, truncated, corrupt); the message names it."""


@dataclass
class IndexSummary:
    """What one ``index_shards`` run found and wrote."""

    shards: int
    samples: int
    bytes: int  # of the shards
    bytes_read: int  # to index them
    classes: int
    unlabelled: int  # samples without a .cls class index
    source: str
    manifest: str


def _find_shards(source: str) -> tuple[list[str], str]:
    """The shard URLs of ``source`` (a folder's sorted, a pattern's in its order) and the folder their
    manifest goes in by default."""
    if "{" in source:
        from webdataset.shardlists import expand_urls

        literal = source[: source.index("{")]
        return list(expand_urls(source)), literal.rsplit("/", 1)[0] if "/" in literal else "."
    if _is_url(source):
        import fsspec

        fs, root = fsspec.core.url_to_fs(source)
        root, base = root.rstrip("/"), source.rstrip("/")
        fs.invalidate_cache(root)  # a listing cached earlier in this process may predate the shards
        if fs.isdir(root):
            found = sorted(fs.glob(f"{glob.escape(root)}/*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in {source}")
            return [f"{base}/{path.rsplit('/', 1)[-1]}" for path in found], base
        if root.endswith(".tar") and fs.isfile(root):
            return [base], base.rsplit("/", 1)[0]
        raise FileNotFoundError(f"no shard directory or .tar shard at {source}")
    path = Path(_local(source))
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no .tar shards in {source}")
        return found, str(path)
    if path.suffix == ".tar" and path.is_file():
        return [str(path)], str(path.parent)
    raise FileNotFoundError(f"no shard directory or .tar shard at {source}")


def _relative(url: str, directory: str) -> str:
    """A shard's name in a manifest in ``directory``: its path relative to that folder."""
    if not _is_url(url) and not _is_url(directory):
        return Path(os.path.relpath(_local(url), _local(directory))).as_posix()
    prefix = directory.rstrip("/") + "/"
    if not url.startswith(prefix):
        raise ValueError(f"shard {url} is not under {directory}, the manifest's folder (a manifest names "
                         "its shards relative to its folder): write the manifest higher up")  # fmt: skip
    return url[len(prefix) :]


def _read_class_count(directory: str) -> int:
    """The number of classes in ``classes.json`` of a shard folder; 0 if there is none."""
    location = f"{directory.rstrip('/')}/{CLASSES_NAME}"
    if _is_url(directory):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        if not fs.isfile(path):
            return 0
        classes = json.loads(fs.cat_file(path))
    else:
        path = Path(_local(directory)) / CLASSES_NAME
        if not path.is_file():
            return 0
        classes = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise ValueError(f"{location} must hold a JSON list of class names")
    return len(classes)


def scan_or_explain(url: str) -> ShardRecord:
    """``scan_shard(url)``, its failures as one ShardIndexError naming the shard."""
    from .tar_reader import scan_shard  # (tar_reader imports this module)

    try:
        return scan_shard(url)
    except FileNotFoundError as exc:
        raise ShardIndexError(f"shard {url} does not exist") from exc
    except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
        text = str(exc)
        raise ShardIndexError(text if url in text else f"{url}: {text}") from exc


def index_shards(source: str | Path, out: str | Path | None = None, *, workers: int = 8) -> IndexSummary:
    """Write the manifest of the shards at ``source`` (a folder, an object-store prefix, a brace pattern or
    one ``.tar``) from their tar headers, ``workers`` shards at a time: to ``out`` (a ``.parquet`` path or
    a folder for ``manifest.parquet``) or beside the shards. Raises FileNotFoundError when there are no
    shards, ShardIndexError naming a shard that cannot be read."""
    from .tar_reader import READS

    if workers < 1:
        raise ValueError(f"workers must be at least 1; got {workers}")
    source = str(source)
    urls, base = _find_shards(source)
    target = base if out is None else str(out)
    manifest = target if target.endswith(".parquet") else f"{target.rstrip('/')}/{MANIFEST_NAME}"
    folder = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    names = [_relative(url, folder) for url in urls]  # a misplaced --out fails before any read
    with READS.measure() as reads:
        pool = ThreadPoolExecutor(min(workers, len(urls)), thread_name_prefix="index-shards")
        try:
            scanned = list(pool.map(scan_or_explain, urls))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, scans not started are dropped
    records = [replace(record, shard=name) for record, name in zip(scanned, names)]
    classes = max([_read_class_count(base), *(len(r.class_counts) for r in records)])
    payload = manifest_payload(records, classes)
    if _is_url(manifest):
        import fsspec

        fs, path = fsspec.core.url_to_fs(manifest)
        fs.pipe_file(path, payload)  # one PUT: the object appears whole or not at all
    else:
        path = Path(_local(manifest))
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomically(path, payload)
        manifest = str(path)
    samples = sum(r.samples for r in records)
    return IndexSummary(len(records), samples, sum(r.bytes for r in records), reads.bytes, classes,
                        samples - sum(sum(r.class_counts) for r in records), source, manifest)  # fmt: skip


def _size(count: float) -> str:
    units, power = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while count >= 1024 and power < len(units) - 1:
        count, power = count / 1024, power + 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"


def print_index_summary(summary: IndexSummary, file: TextIO | None = None) -> None:
    share = 100 * summary.bytes_read / summary.bytes if summary.bytes else 0.0
    unlabelled = f", {summary.unlabelled} without a .cls label" if summary.unlabelled else ""
    print(f"indexed {summary.shards} shards ({summary.samples} samples{unlabelled}, {summary.classes} "
          f"classes, {_size(summary.bytes)}) of {summary.source}, reading {_size(summary.bytes_read)} "
          f"({share:.1f}%); wrote {summary.manifest}", file=file or sys.stdout)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index-shards", help="write manifest.parquet for existing shards, reading only their tar headers",
        description=INDEX_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "source", metavar="SOURCE", help="shard directory, s3://bucket/prefix or brace pattern"
    )
    parser.add_argument(
        "--out", metavar="MANIFEST", help="where to write the manifest (a .parquet path, or a folder); "
        "default: beside the shards",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=8, help="shards scanned at once (threads; default 8)")
    parser.set_defaults(func=_index_main)


def _index_main(args: argparse.Namespace) -> int:
    try:
        summary = index_shards(args.source, args.out, workers=args.workers)
    except (OSError, ValueError, ImportError, ShardIndexError) as exc:  # FileNotFoundError is an OSError
        print(f"defocus-scale index-shards: error: {exc}", file=sys.stderr)
        return 2
    print_index_summary(summary)
    return 0
