"""``defocus-scale make-shards SRC OUT``: write an image data set as WebDataset tar shards.

Sources: an ImageFolder tree (``class/…/file``), Parquet files in the Hugging Face datasets layout
(``image`` struct of ``bytes``/``path``, integer ``label``; a file, a directory or a glob), or
``synthetic`` (the built-in generator). Output, in OUT: ``{prefix}-000000.tar`` … with members
``{key}.{jpg|png|webp}`` (the original bytes unless a format or a resize is asked for) and ``{key}.cls``,
plus ``manifest.parquet`` (per shard: samples, bytes, class counts and each sample's byte offset, so that
a reader seeks to its slice) and ``classes.json``.

By default the items are written in a seeded random order (``--shuffle-seed``, default 0), so that every
shard mixes the classes; ``--no-shuffle`` keeps the source order (see ``shard_sources`` for how Parquet,
read streaming by row group, is mixed). The source is cut into chunks; one worker process writes a whole
chunk into one shard, or several (a Parquet window; the byte bound). Each shard is written under a hidden
temporary name and renamed into place (in chunk order, so shard numbers do not depend on the number of
workers): a shard is complete or absent. Keys come from the source (file path, Parquet row, synthetic
index), so they are stable across runs and seeds. Items that are not usable images or lack a usable
label are skipped, counted and named, never fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import math
import multiprocessing
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from defocus_scale.data.manifest import (
    CLASSES_NAME,
    MANIFEST_NAME,
    SKIPPED_NAME,
    ShardRecord,
    ShardSummary,
    print_summary,
    read_classes,
    read_manifest,
    write_classes,
    write_manifest,
    write_skipped,
)
from defocus_scale.data.shard_sources import (
    SYNTHETIC,
    ChunkPart,
    Plan,
    Skip,
    SyntheticOptions,
    plan_source,
    read_chunk,
)

__all__ = ["ShardSummary", "make_shards", "read_classes", "read_manifest", "register"]

EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # accepted input formats
FORMAT_OF_EXTENSION = {ext: fmt for fmt, ext in EXTENSION_OF_FORMAT.items()}
_TAR_BLOCK, _TAR_RECORD = 512, 10240  # tarfile pads members to blocks and the archive to records


@dataclass(frozen=True)
class _Options:
    image_format: str | None
    resize: int | None
    max_shard_bytes: int
    num_classes: int | None  # known up front: labels outside it are skipped
    synthetic: SyntheticOptions


@dataclass
class _ChunkResult:
    index: int
    items: int
    parts: list[tuple[str, ShardRecord]]  # (temporary file name, record without its final name)
    skipped: list[tuple[str, str]]


# ---------------------------------------------------------------- encoding and writing (worker side)


def _encode(payload: tuple[bytes | Image.Image, int], options: _Options) -> tuple[str, bytes]:
    """``(extension, bytes)`` of the image to store, verifying that encoded input decodes completely."""
    data, _ = payload
    if isinstance(data, Image.Image):  # synthetic: always encoded here
        return _reencode(data, options.image_format or "png", options.resize)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Skip("not an image") from None
    except Exception as exc:  # PIL raises a variety of types on corrupt headers
        raise Skip(f"undecodable image: {exc}") from None
    extension = EXTENSION_OF_FORMAT.get(image.format or "")
    if extension is None:
        raise Skip(f"unsupported image format {image.format} (accepted: JPEG, PNG, WebP)")
    if options.resize:
        # JPEG decodes at a reduced scale when shrinking (much faster), still reading the whole stream
        image.draft(image.mode, _resized_size(image.size, options.resize))
    try:
        image.load()  # decodes everything: a truncated or corrupt file fails here
    except Exception as exc:
        raise Skip(f"undecodable {image.format} image: {exc}") from None
    target = options.image_format or extension
    if options.resize or target != extension:
        return _reencode(image, target, options.resize)
    return extension, data


def _resized_size(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    scale = shorter_side / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _reencode(image: Image.Image, extension: str, resize: int | None) -> tuple[str, bytes]:
    if resize and min(image.size) != resize:
        image = image.resize(_resized_size(image.size, resize), Image.Resampling.BICUBIC)
    allowed_modes = ("RGB", "L") if extension == "jpg" else ("RGB", "RGBA", "L")
    if image.mode not in allowed_modes:
        image = image.convert("RGBA" if "A" in image.mode and extension != "jpg" else "RGB")
    buffer = io.BytesIO()
    quality = {"jpg": {"quality": 95}, "webp": {"quality": 95}, "png": {}}[extension]
    image.save(buffer, format=FORMAT_OF_EXTENSION[extension], **quality)
    return extension, buffer.getvalue()


def _tar_member_bytes(size: int) -> int:
    return _TAR_BLOCK + math.ceil(size / _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar archive holding members that take ``member_bytes`` (end blocks and record padding)."""
    return math.ceil((member_bytes + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


def _temporary_name(prefix: str, chunk: int, part: int) -> str:
    return f".{prefix}-chunk{chunk:06d}-{part:03d}.tar.tmp"


class _PartWriter:
    """One shard being written under its temporary name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")  # closed by finish() or discard()
        self.tar = wds.TarWriter(self.file, mtime=0)  # an int: a float mtime adds a PAX header per member
        self.samples, self.member_bytes, self.class_counts = 0, 0, [0]
        self.offsets: list[int] = []  # of each sample's first header in the tar (the manifest's offsets)

    def write(self, key: str, extension: str, data: bytes, label: int, member_bytes: int) -> None:
        # tarfile's position in the archive (the file lags behind: "w|" writes whole records)
        self.offsets.append(self.tar.tarstream.offset)
        self.tar.write({"__key__": key, extension: data, "cls": str(label).encode("ascii")})
        self.samples += 1
        self.member_bytes += member_bytes
        self.class_counts.extend([0] * (label + 1 - len(self.class_counts)))
        self.class_counts[label] += 1

    def discard(self) -> None:
        with contextlib.suppress(Exception):  # already failing: only make sure no partial file remains
            self.tar.close()
        self.file.close()
        self.path.unlink(missing_ok=True)

    def finish(self) -> ShardRecord:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        size = self.path.stat().st_size
        return ShardRecord("", self.samples, size, tuple(self.class_counts), tuple(self.offsets))


def _write_chunk(
    index: int, chunk: list[ChunkPart], out_dir: str, prefix: str, options: _Options
) -> _ChunkResult:
    """Write one chunk as temporary shards: one per slot (a Parquet window has several), more when the
    byte bound is reached. Parts come back ordered by slot, then by when they were opened."""
    parts: list[tuple[int, int, str, ShardRecord]] = []
    skipped: list[tuple[str, str]] = []
    writers: dict[int, tuple[int, _PartWriter]] = {}  # slot -> (opening number, writer)
    items = opened = 0
    try:
        for name, key, payload, slot in read_chunk(chunk, options.synthetic):
            items += 1
            try:
                if isinstance(payload, Skip):
                    raise payload
                label = payload[1]  # type: ignore[index]
                if label < 0 or (options.num_classes is not None and label >= options.num_classes):
                    raise Skip(f"label {label} outside the {options.num_classes or 'non-negative'} classes")
                extension, data = _encode(payload, options)  # type: ignore[arg-type]
            except Skip as reason:
                skipped.append((name, str(reason)))
                continue
            member_bytes = _tar_member_bytes(len(data)) + _tar_member_bytes(len(str(label)))
            number, writer = writers.get(slot, (0, None))
            if writer and _tar_file_bytes(writer.member_bytes + member_bytes) > options.max_shard_bytes:
                del writers[slot]
                parts.append((slot, number, writer.path.name, writer.finish()))
                writer = None
            if writer is None:
                number, opened = opened, opened + 1
                writer = _PartWriter(Path(out_dir) / _temporary_name(prefix, index, number))
                writers[slot] = (number, writer)
            writer.write(key, extension, data, label, member_bytes)
        for slot in sorted(writers):
            number, writer = writers.pop(slot)
            parts.append((slot, number, writer.path.name, writer.finish()))
    finally:
        for _, writer in writers.values():  # an unexpected error: leave no partial file behind
            writer.discard()
    return _ChunkResult(index, items, [(name, record) for _, _, name, record in sorted(parts)], skipped)


# ---------------------------------------------------------------- driver


def _init_worker() -> None:
    # Parallelism comes from the processes; intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)


def _existing_outputs(out_dir: Path, prefix: str) -> list[Path]:
    found = sorted(out_dir.glob(f"{glob.escape(prefix)}-[0-9]*.tar"))
    described = [out_dir / n for n in (MANIFEST_NAME, CLASSES_NAME, SKIPPED_NAME)]
    return found + [path for path in described if path.exists()]


def _run_chunks(
    plan: Plan, out_dir: str, prefix: str, options: _Options, workers: int, stack: contextlib.ExitStack
) -> Iterator[_ChunkResult]:
    """Write every chunk, in this process or in ``workers`` processes; results in completion order."""
    if workers == 1:
        return (_write_chunk(i, chunk, out_dir, prefix, options) for i, chunk in enumerate(plan.chunks))
    # fork starts workers in milliseconds (spawn re-imports torch in each: seconds). With fork the pool
    # launches all its processes at the first submit, here, before the caller starts any thread.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker))
    # On an error, chunks not yet started are dropped.
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    futures = [
        pool.submit(_write_chunk, index, chunk, out_dir, prefix, options)
        for index, chunk in enumerate(plan.chunks)
    ]

    def completed() -> Iterator[_ChunkResult]:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            # Finished work is placed before a failure is raised.
            yield from (future.result() for future in sorted(done, key=lambda f: f.exception() is not None))

    return completed()


def make_shards(
    source: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 * 2**20,
    workers: int = 1,
    prefix: str = "train",
    image_format: str | None = None,
    resize: int | None = None,
    synthetic_samples: int = 10000,
    synthetic_classes: int = 10,
    synthetic_image_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    shuffle_seed: int | None = 0,
) -> ShardSummary:
    """Write ``source`` as WebDataset shards plus ``manifest.parquet`` and ``classes.json`` in ``out_dir``.

    ``image_format`` (jpg, png or webp) re-encodes images not already in it; ``resize`` scales the
    shorter side to that many pixels (re-encoding). A sample larger than ``max_shard_bytes`` gets a shard
    of its own. Items are written in a random order drawn from ``shuffle_seed`` (None: the source order),
    so that every shard mixes the classes; keys do not depend on it. Existing shards of ``prefix`` or a
    manifest in ``out_dir`` are an error unless ``overwrite``."""
    if image_format is not None:
        image_format = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
        if image_format not in FORMAT_OF_EXTENSION:
            raise ValueError(f"image_format must be one of jpg, png, webp; got {image_format!r}")
    for name, value, least in [
        ("samples_per_shard", samples_per_shard, 1), ("max_shard_bytes", max_shard_bytes, _TAR_RECORD),
        ("workers", workers, 1), ("synthetic_samples", synthetic_samples, 0),
        ("synthetic_classes", synthetic_classes, 1), ("synthetic_image_size", synthetic_image_size, 1),
        ("resize", resize or 1, 1), ("shuffle_seed", 0 if shuffle_seed is None else shuffle_seed, 0),
    ]:  # fmt: skip
        if value < least:
            raise ValueError(f"{name} must be at least {least}; got {value}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix may hold only letters, digits, '_' and '-'; got {prefix!r}")

    plan = plan_source(source, samples_per_shard, synthetic_samples, synthetic_classes, shuffle_seed)
    # An object store (s3://...): shards are written in a local staging folder, each uploaded as soon as
    # it is final and then removed there; the manifest goes last, so a listing with one is complete.
    remote = _RemoteOutput(str(out_dir), prefix) if not _is_local_path(str(out_dir)) else None
    staging = contextlib.ExitStack()
    if remote is not None:
        existing_remote = remote.existing()
        if existing_remote and not overwrite:
            raise FileExistsError(f"{out_dir} already holds shards or a manifest ({existing_remote[0]}, …); "
                                  "pass overwrite=True (--overwrite) to replace them")  # fmt: skip
        remote.remove(existing_remote)
        out_dir = Path(staging.enter_context(tempfile.TemporaryDirectory(prefix="make-shards-")))
    if urlparse(str(out_dir)).scheme == "file":
        out_dir = urlparse(str(out_dir)).path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = _existing_outputs(out_dir, prefix)
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shards or a manifest ({existing[0].name}, …); "
                              "pass overwrite=True (--overwrite) to replace them")  # fmt: skip
    for path in existing + list(out_dir.glob(f".{glob.escape(prefix)}-chunk*.tar.tmp")):
        path.unlink()
    with staging:
        summary = _write_shards(plan, out_dir, prefix, workers, progress, remote, _Options(
            image_format, resize, max_shard_bytes, len(plan.classes) if plan.classes else None,
            SyntheticOptions(synthetic_classes, synthetic_image_size, seed),
        ))  # fmt: skip
    if progress:
        print_summary(summary)
    return summary


def _write_shards(
    plan: Plan, out_dir: Path, prefix: str, workers: int, progress: bool, remote: _RemoteOutput | None,
    options: _Options,
) -> ShardSummary:  # fmt: skip

    records: list[ShardRecord] = []
    skipped = list(plan.skipped)
    finished: dict[int, _ChunkResult] = {}

    next_chunk = 0

    def place_finished_chunks_in_order() -> None:
        # Shard numbers follow the source order, whichever worker finishes first.
        nonlocal next_chunk
        while next_chunk in finished:
            result = finished.pop(next_chunk)
            for temporary, record in result.parts:
                final = f"{prefix}-{len(records):06d}.tar"
                os.replace(out_dir / temporary, out_dir / final)
                if remote is not None:
                    remote.upload(out_dir / final)
                records.append(dataclasses.replace(record, shard=final))
            skipped.extend(result.skipped)
            next_chunk += 1

    try:
        with contextlib.ExitStack() as stack:
            results = _run_chunks(plan, str(out_dir), prefix, options, workers, stack)
            bar = stack.enter_context(
                tqdm(total=plan.items, unit="img", desc=f"make-shards {prefix}", disable=not progress)
            )
            for result in results:
                finished[result.index] = result
                bar.update(result.items)
                place_finished_chunks_in_order()
    except BaseException:
        # Shards already renamed are complete and stay; chunks finished out of order are not renamed.
        for path in out_dir.glob(f".{glob.escape(prefix)}-chunk*.tar.tmp"):
            path.unlink(missing_ok=True)
        raise

    labels_seen = max((len(r.class_counts) for r in records), default=0)
    classes = plan.classes or [str(label) for label in range(labels_seen)]
    written = [write_classes(out_dir, classes)]
    if skipped:
        written.append(write_skipped(out_dir, skipped))
    manifest = write_manifest(out_dir, records, len(classes))
    samples = sum(r.samples for r in records)
    if remote is None:
        return ShardSummary(len(records), samples, skipped, out_dir, manifest, classes)
    for path in [*written, manifest]:
        remote.upload(path)
    return ShardSummary(len(records), samples, skipped, remote.url, remote.url_of(manifest.name), classes)


def _is_local_path(out_dir: str) -> bool:
    return urlparse(out_dir).scheme in ("", "file") or len(urlparse(out_dir).scheme) == 1  # C:\ paths


class _RemoteOutput:
    """The shard folder on an fsspec filesystem (an object store)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url.rstrip("/"), prefix
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def existing(self) -> list[str]:
        found = self.fs.glob(f"{glob.escape(self.root)}/{glob.escape(self.prefix)}-[0-9]*.tar")
        described = [f"{self.root}/{n}" for n in (MANIFEST_NAME, CLASSES_NAME, SKIPPED_NAME)]
        return sorted(found) + [path for path in described if self.fs.exists(path)]

    def remove(self, paths: list[str]) -> None:
        if paths:
            self.fs.rm(paths)

    def upload(self, path: Path) -> None:
        """Copy a finished local file up, then drop the local copy (the staging folder stays small)."""
        try:
            self.fs.put_file(str(path), f"{self.root}/{path.name}")
        except OSError as exc:
            raise OSError(f"could not upload {path.name} to {self.url}: {exc}") from exc
        path.unlink()


# ---------------------------------------------------------------- command line


def _byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 268435456, 256M, 1G)")
    return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-shards", help="write an ImageFolder tree, Parquet files or synthetic data as WebDataset shards",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "source", metavar="SRC", help=f"ImageFolder directory, Parquet file/dir/glob or {SYNTHETIC}"
    )
    parser.add_argument("out_dir", metavar="OUT", help="directory for the shards, manifest and class list")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=_byte_size, default=256 * 2**20, help="e.g. 256M (default)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    parser.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, …")
    parser.add_argument(
        "--format", dest="image_format", choices=sorted(FORMAT_OF_EXTENSION),
        help="re-encode images into this format (default: keep the original bytes)",
    )  # fmt: skip
    parser.add_argument("--resize", type=int, help="scale the shorter side to this many pixels")
    parser.add_argument("--synthetic-samples", type=int, default=10000)
    parser.add_argument("--synthetic-classes", type=int, default=10)
    parser.add_argument("--synthetic-image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic generator")
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the random order in which items are written (mixes the classes "
        "in every shard; default 0)",
    )
    parser.add_argument(
        "--no-shuffle",
        dest="shuffle_seed",
        action="store_const",
        const=None,
        help="write the items in source order (an ImageFolder tree class by class)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        summary = make_shards(
            args.source, args.out_dir, samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes, workers=args.workers, prefix=args.prefix,
            image_format=args.image_format, resize=args.resize, synthetic_samples=args.synthetic_samples,
            synthetic_classes=args.synthetic_classes, synthetic_image_size=args.synthetic_image_size,
            seed=args.seed, progress=args.progress, overwrite=args.overwrite, shuffle_seed=args.shuffle_seed,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"defocus-scale make-shards: error: {exc}", file=sys.stderr)
        return 1
    if not args.progress:
        print_summary(summary)
    if summary.samples == 0:
        print("defocus-scale make-shards: error: no usable samples in the source", file=sys.stderr)
        return 1
    return 0
