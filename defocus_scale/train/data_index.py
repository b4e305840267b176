"""Shards without a manifest are indexed once, by all ranks together, before training reads them.

Without sample counts the stream can only deal whole shards, so at scale most workers would sit idle
(1,024 shards for 512 ranks x 8 workers) and ranks would hold different amounts. At the start of a run
whose source has no manifest (a bare directory, a brace pattern, a remote prefix), every rank reads the
tar headers of ``1 / world`` of the shards (seeking past image data), the ranks exchange what they found
and rank 0 writes a manifest in the run directory (``data_index/<fingerprint>/manifest.parquet``, shard
URLs absolute). The run then reads that manifest in place of its source; a later start, resume or
elastic restart finds it there and reads nothing again.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import fsspec
import torch.distributed as dist

from defocus_scale.data.manifest import ShardIndexError, ShardRecord, manifest_payload, scan_or_explain
from defocus_scale.data.shard_list import resolve_shards, shard_fingerprint
from defocus_scale.data.stream import ShardReadError

logger = logging.getLogger(__name__)

INDEX_FOLDER = "data_index"
_SCAN_THREADS = 8


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _scan_all(urls: list[str]) -> list[ShardRecord | str]:
    """Each shard's record, or the reason it could not be read."""

    def scan(url: str) -> ShardRecord | str:
        try:
            return scan_or_explain(url)
        except ShardIndexError as exc:
            return str(exc)

    if not urls:
        return []
    with ThreadPoolExecutor(min(_SCAN_THREADS, len(urls)), thread_name_prefix="index-shards") as pool:
        return list(pool.map(scan, urls))


def indexed_source(source: str, run_dir: str, *, rank: int, world_size: int, max_bad_fraction: float) -> str:
    """``source`` itself when its shards' sample counts are known; else the run's manifest of them (built
    now by all ranks, or found from an earlier start). Call it on every rank at the same point.

    Shards that cannot be read are left out of the manifest with a warning naming them; more than
    ``max_bad_fraction`` of them is a ShardReadError on every rank."""
    shards = resolve_shards(source)
    if all(s.samples is not None for s in shards):
        return source
    folder = f"{shard_fingerprint(shards)}-{len(shards)}"
    manifest = f"{run_dir.rstrip('/')}/{INDEX_FOLDER}/{folder}/manifest.parquet"
    fs, path = fsspec.core.url_to_fs(manifest)
    if fs.exists(path):  # (every rank sees it: the run directory is shared, checked at start)
        return manifest
    urls = [_absolute(s.url) for s in shards]
    mine = _scan_all(urls[rank::world_size])
    if world_size > 1 and dist.is_initialized():
        gathered: list[list] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    found: list[ShardRecord | str] = [None] * len(urls)  # type: ignore[list-item]
    for r, results in enumerate(gathered):
        found[r::world_size] = results
    failed = [(url, why) for url, why in zip(urls, found) if isinstance(why, str)]
    if len(failed) > max_bad_fraction * len(urls):
        raise ShardReadError(f"{len(failed)} of {len(urls)} shards of {source} cannot be read, more than "
                             f"max_bad_fraction={max_bad_fraction}: {'; '.join(w for _, w in failed[:5])}")
    for _, why in failed:
        logger.warning("indexing %s: left out: %s", source, why)
    records = [replace(r, shard=url) for url, r in zip(urls, found) if not isinstance(r, str)]
    if rank == 0:
        classes = max((len(r.class_counts) for r in records), default=0)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(temporary, manifest_payload(records, classes))
        fs.mv(temporary, path)  # a rename on disk; on an object store one PUT of the whole object
        logger.info("indexed %d shards of %s (%d samples) into %s", len(records), source,
                    sum(r.samples for r in records), manifest)  # fmt: skip
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
    fs.invalidate_cache()
    return manifest
