"""Which shards a ``data.source`` names, with their sample counts and byte offsets when a manifest has
them: a directory or object-store prefix (its ``manifest.parquet``, else its ``*.tar``), a manifest, a
list, a brace pattern (the manifest of the pattern's directory is used when it lists every shard) or a
single URL."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.shardlists import expand_urls

from .manifest import shards_with_few_classes
from .tar_reader import open_url

logger = logging.getLogger("defocus_scale.data.stream")  # one logger for the stream's warnings

MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # from the manifest; None when unknown (counted only by reading)
    # byte offset of each sample's first tar header, from the manifest: a reader seeks to its slice
    offsets: np.ndarray | None = field(default=None, compare=False, repr=False)


def is_local(url: str) -> bool:
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


def _read_manifest_table(manifest: str) -> pa.Table:
    if is_local(manifest):
        table = pq.read_table(urlparse(manifest).path if manifest.startswith("file:") else manifest)
    else:
        with open_url(manifest) as stream:
            table = pq.read_table(pa.BufferReader(stream.read()))
    missing = {"shard", "samples"} - set(table.column_names)
    if missing:
        raise ValueError(f"manifest {manifest} lacks column(s) {sorted(missing)}")
    return table


def _shards_from_table(manifest: str, table: pa.Table) -> list[Shard]:
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    names = table.column("shard").to_pylist()
    counts = table.column("samples").to_pylist()
    if "offsets" in table.column_names:
        offsets = [None if o is None else np.asarray(o, dtype=np.int64)
                   for o in table.column("offsets").to_pylist()]  # fmt: skip
    else:  # a manifest written before offsets were recorded: readers skip to their slice
        offsets = [None] * len(names)
    shards = []
    for name, count, offset in zip(names, counts, offsets):
        if offset is not None and len(offset) != count:
            raise ValueError(f"manifest {manifest}: shard {name} has {count} samples but {len(offset)} "
                             "offsets; rebuild it with `defocus-scale index-shards`")  # fmt: skip
        # names are relative to the manifest's directory; an absolute path or URL is taken as it is
        url = name if ("://" in name or name.startswith("/")) else f"{base}/{name}"
        shards.append(Shard(url, int(count), offset))
    return shards


def _shards_from_manifest(manifest: str) -> list[Shard]:
    table = _read_manifest_table(manifest)
    _warn_if_shards_hold_few_classes(manifest, table)
    return _shards_from_table(manifest, table)


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
            "would hold: %s). They were probably written in class order; the stream interleaves slices of "
            "several shards per worker, but rewriting them with `defocus-scale make-shards` (which "
            "shuffles) mixes batches best.",
            len(few), checked, manifest, examples,
        )  # fmt: skip


def _manifest_beside(urls: Sequence[str]) -> list[Shard] | None:
    """The shards of ``urls`` from the manifest of their common directory, if there is one that lists
    them all (a brace pattern over a directory that ``make-shards`` or ``index-shards`` wrote)."""
    directories = {u.rsplit("/", 1)[0] for u in urls if "/" in u}
    if len(directories) != 1 or any(urlparse(u).scheme in ("pipe", "http", "https") for u in urls):
        return None
    manifest = f"{directories.pop()}/{MANIFEST_NAME}"
    try:
        fs, path = fsspec.core.url_to_fs(manifest)
        if not fs.isfile(path):
            return None
    except (ImportError, ValueError, OSError):
        return None
    listed = {s.url: s for s in _shards_from_table(manifest, _read_manifest_table(manifest))}
    if not all(u in listed for u in urls):
        return None
    return [listed[u] for u in urls]


def resolve_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Shard]:
    """Shards of a directory (its manifest, else its ``*.tar``), a manifest, a list, a pattern or a URL."""
    if isinstance(source, (list, tuple)):
        urls = [str(s) for s in source]
    else:
        source = str(source)
        if is_local(source) and os.path.isdir(source):
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
    local = [u for u in urls if is_local(u)]
    if local and len(local) == len(urls) and not any(os.path.exists(urlparse(u).path) for u in local):
        raise FileNotFoundError(f"none of the {len(urls)} shard(s) of {source!r} exists (first: {urls[0]})")
    described = _manifest_beside(urls)
    return described if described is not None else [Shard(u, None) for u in urls]


def shard_fingerprint(shards: Sequence[Shard]) -> str:
    """Identifies the shard list by file names, so a moved copy of the same shards still matches."""
    names = "\n".join(urlparse(s.url).path.rsplit("/", 1)[-1] or s.url for s in shards)
    return hashlib.sha1(names.encode()).hexdigest()[:16]
