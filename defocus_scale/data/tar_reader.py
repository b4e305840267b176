"""Reading WebDataset tar shards: opening a URL, the samples of a shard (from its start, or seeking to
them with the byte offsets a manifest records), a header-only scan of a shard, and a tar stream's regular
files, read fast for the plain ustar archives WebDataset writes.

``tarfile`` parses every 512-byte header in pure Python, some 30 us a member: two members a sample cost
as much as decoding and augmenting a 32 px image a tenth of the time. :func:`iter_members` reads the
three ustar fields a shard needs (name, size, type) itself and checks each header's checksum; at the
first header it does not handle (PAX or GNU long-name headers, links, sparse files, a compressed
archive, a bad checksum) it hands the rest of the stream to ``tarfile``, which reads it or raises. So
every archive ``tarfile`` reads is still read, and every one it rejects is still rejected.

Every stream opened here counts the bytes it takes from storage in :data:`READS` (see
:class:`ReadCounter`), so tests and benchmarks can see what a read costs.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from .manifest import ShardRecord

BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(BLOCK)
_USTAR_MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX ustar, GNU
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EMPTY_CHECKSUM = 8 * ord(" ")  # the checksum field counts as spaces
_STREAM_BUFFER = 1 << 20  # few, large reads: tar headers come every few KiB
# Ranged (offset) reads go through a 1 MiB buffer: on an object store every refill is one ranged request
# (~10-30 ms on S3), which 1 MiB amortises (>= 30 MB/s a stream), while the first sample after a seek comes
# soon and open shards x DataLoader workers hold a few MiB each. Refills never go past the end of the
# samples asked for (_CountedFile.limit), so a short range or a single pick costs its own bytes, not a
# block; fsspec's readahead cache (block_size=...) would fetch a whole block past every seek instead.
_RANGE_BUFFER = 1 << 20
_PEEK = 8  # data bytes a scan reads with each header: a whole `.cls` label, so that member costs one read
_MAX_LABEL = 1 << 20  # class indices a scan counts (a larger .cls value is not a class index)


# ---------------------------------------------------------------- byte accounting


@dataclass
class ReadMeasurement:
    """Bytes read from storage inside a :meth:`ReadCounter.measure` block (set when the block ends)."""

    bytes: int = 0


class ReadCounter:
    """Bytes read from storage by the streams this module opens, all threads of the process together:
    for local files and ranged (offset) reads the bytes the file returned; for fsspec streams opened by
    :func:`open_url` the bytes its cache fetched. Measure a call in a process doing nothing else in
    parallel for an exact figure (DataLoader workers count in their own processes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, count: int) -> None:
        with self._lock:
            self._total += count

    @property
    def total(self) -> int:
        """Bytes read since the process started."""
        return self._total

    @contextlib.contextmanager
    def measure(self) -> Iterator[ReadMeasurement]:
        """``with READS.measure() as reads: ...``, then ``reads.bytes``."""
        measurement, start = ReadMeasurement(), self._total
        try:
            yield measurement
        finally:
            measurement.bytes = self._total - start


READS = ReadCounter()


class _CountedFile(io.RawIOBase):
    """A binary file whose reads are counted in :data:`READS`; reads stop at ``limit`` (an absolute offset,
    None: the end of the file), so that a buffer over it fetches nothing past the bytes asked for."""

    def __init__(self, file: Any, size: int | None = None, seekable: bool = True) -> None:
        super().__init__()
        self.file, self.size, self.limit, self.pos, self._seekable = file, size, None, 0, seekable
        self._readinto = getattr(file, "readinto", None)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = self.file.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _allowed(self, size: int) -> int:
        if self.limit is None:
            return size
        left = max(0, self.limit - self.pos)
        return left if size < 0 else min(size, left)

    def read(self, size: int = -1) -> bytes:
        size = self._allowed(size)
        if size == 0:
            return b""
        data = self.file.read(size)
        self.pos += len(data)
        READS.add(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        size = self._allowed(len(view))
        if size == 0:
            return 0
        if self._readinto is not None:
            count = self._readinto(view[:size]) or 0
        else:
            data = self.file.read(size)
            count = len(data)
            view[:count] = data
        self.pos += count
        READS.add(count)
        return count

    def close(self) -> None:
        if not self.closed:
            try:
                self.file.close()
            finally:
                super().close()


def _count_fetches(file: Any) -> bool:
    """Count what an fsspec file's cache fetches from storage (True), if it has the usual cache."""
    cache = getattr(file, "cache", None)
    fetch = getattr(cache, "fetcher", None)
    if not callable(fetch):
        return False

    def counted(start: int, end: int) -> bytes:
        data = fetch(start, end)
        READS.add(len(data))
        return data

    cache.fetcher = counted
    return True


def _local_path(url: str) -> str | None:
    scheme = urlparse(url).scheme
    if scheme == "":
        return url
    if scheme == "file":
        return urlparse(url).path
    return None


def _through_fsspec(url: str) -> bool:
    """Whether ``url`` is read through fsspec, the one storage layer of shards, manifests, checkpoints and
    run records (s3://, gs://, az://, http(s)://, ...): all but local paths and ``pipe:`` commands; http(s)
    falls back to webdataset's ``curl`` when fsspec's HTTP driver (aiohttp) is not installed."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file", "pipe"):
        return False
    if scheme in ("http", "https"):
        try:
            import aiohttp  # noqa: F401 - fsspec's HTTP driver
        except ImportError:
            return False
    return True


def open_url(url: str) -> Any:
    """A readable binary stream: local paths, ``pipe:`` commands (and http without aiohttp) through
    webdataset's ``gopen``, every other URL through its fsspec driver (``s3fs``, ``gcsfs``, ...)."""
    scheme = urlparse(url).scheme
    if scheme == "":
        return io.BufferedReader(_CountedFile(io.FileIO(url)), _STREAM_BUFFER)
    if not _through_fsspec(url):
        return io.BufferedReader(_CountedFile(wds.gopen(url), seekable=False), _STREAM_BUFFER)
    import fsspec

    try:
        file = fsspec.open(url, "rb").open()
    except ImportError as exc:  # e.g. gs:// without gcsfs
        raise ImportError(f"{url}: no fsspec driver for {scheme}:// is installed ({exc}); install the "
                          "matching extra, e.g. defocus-scale[s3] or defocus-scale[gcs]") from exc
    return file if _count_fetches(file) else io.BufferedReader(_CountedFile(file), _STREAM_BUFFER)


def can_seek(url: str) -> bool:
    """Whether :func:`open_seekable` opens ``url``: a local path or an fsspec URL (not pipe:)."""
    return urlparse(url).scheme in ("", "file") or _through_fsspec(url)


def open_seekable(url: str) -> _CountedFile:
    """An unbuffered, seekable, counted binary file with a ``size``: a local file, or an fsspec file whose
    every read is one ranged request of exactly the bytes read (no cache of its own: the caller buffers)."""
    path = _local_path(url)
    if path is not None:
        file = io.FileIO(path)
        return _CountedFile(file, os.fstat(file.fileno()).st_size)
    if not can_seek(url):
        raise ValueError(f"{url}: {urlparse(url).scheme}: streams cannot seek")
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    file = fs.open(path, "rb", cache_type="none")  # a seek is free; each read is a ranged GET of its bytes
    size = getattr(file, "size", None)
    return _CountedFile(file, fs.size(path) if size is None else size)


# ---------------------------------------------------------------- tar members


def _plain_header(header: bytes) -> tuple[str, int, bool] | None:
    """``(name, size, is_file)`` of a plain ustar member header, or None: let tarfile judge it."""
    if header[257:265] not in _USTAR_MAGICS:
        return None
    kind = header[156:157]
    if kind not in _FILE_TYPES and kind != tarfile.DIRTYPE:
        return None
    try:
        size = int(header[124:136].rstrip(b"\x00 ") or b"0", 8)  # base-256 sizes fail here: tarfile's
        checksum = int(header[148:156].rstrip(b"\x00 ") or b"0", 8)
    except ValueError:
        return None
    # Zero bytes add nothing to the sum: dropping them first (in C) leaves ~100 of the 512 to add up.
    if checksum != sum(header.translate(None, b"\x00")) - sum(header[148:156]) + _EMPTY_CHECKSUM:
        return None  # corrupt, or a signed-sum writer: tarfile decides
    name = header[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
    prefix = header[345:500].split(b"\x00", 1)[0]
    if prefix:  # as tarfile: a ustar name longer than 100 bytes is split into prefix / name
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    is_file = kind != tarfile.DIRTYPE and not (kind == tarfile.AREGTYPE and name.endswith("/"))
    return name, size, is_file


def _is_header(block: bytes) -> bool:
    """Whether ``block`` is a tar header of any format (its checksum matches), not data or a zero block."""
    if len(block) != BLOCK or block == _ZERO_BLOCK:
        return False
    try:
        return int(block[148:156].rstrip(b"\x00 ") or b"0", 8) in tarfile.calc_chksums(block)
    except ValueError:
        return False


class _CountingReader:
    """Counts the bytes read from a stream (tarfile cannot tell a clean end from a cut inside a header);
    ``head`` holds bytes already taken from the stream, read again first; no more than ``limit`` bytes
    (head included) are read."""

    def __init__(self, raw: Any, head: bytes = b"", limit: int | None = None) -> None:
        self.raw, self.head, self.count, self.limit = raw, head, 0, limit

    def read(self, size: int = -1) -> bytes:
        if self.limit is not None:
            left = max(0, self.limit - self.count)
            size = left if size < 0 else min(size, left)
        if self.head:
            data = self.head if size < 0 else self.head[:size]
            self.head = self.head[len(data) :]
            if size < 0 or len(data) < size:
                data += self.raw.read(-1 if size < 0 else size - len(data))
        else:
            data = self.raw.read(size)
        self.count += len(data)
        return data


def _tarfile_members(
    stream: Any, url: str, head: bytes, offset: int, end: int | None
) -> Iterator[tuple[str, bytes]]:
    """The rest of the stream (after the already read ``head``, which starts at byte ``offset``), through
    tarfile's streaming reader; up to byte ``end`` if given."""
    counted = _CountingReader(stream, head, None if end is None else end - offset)
    last = 0
    with tarfile.open(fileobj=counted, mode="r|*") as tar:
        for info in tar:
            last = info.offset_data + -(-info.size // BLOCK) * BLOCK
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # streaming: keep no history
        compressed = tar.fileobj.comptype != "tar"
    if end is not None:  # a range: it ends at a member boundary, before the end-of-archive marker
        if counted.count < end - offset:
            raise tarfile.ReadError(f"{url} ends before byte {end} (truncated)")
        return
    while counted.read(1 << 16):
        pass
    if not compressed and counted.count < last + 2 * BLOCK:
        raise tarfile.ReadError(f"{url} lacks the end-of-archive marker (truncated)")


def iter_members(
    stream: Any, url: str, start: int = 0, end: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order; raises ``tarfile.ReadError`` (or
    tarfile's other errors) on a truncated or corrupt archive.

    ``start``: the byte of the tar at which ``stream`` stands (a member header; 0: the archive's start).
    ``end``: stop at this byte, a member boundary before the end of the archive, without reading or
    checking what follows (None: read to the end-of-archive marker and check it)."""
    offset = start
    while True:
        if end is not None and offset >= end:
            if offset > end:
                raise tarfile.ReadError(f"{url}: a member runs from before byte {end} to byte {offset}, "
                                        f"so byte {end} does not start a member")  # fmt: skip
            return
        header = stream.read(BLOCK)
        parsed = _plain_header(header) if len(header) == BLOCK else None
        if parsed is None:
            if header == _ZERO_BLOCK and end is None:  # the end-of-archive marker: two zero blocks
                if not stream.read(BLOCK):  # (tarfile accepts one)
                    raise tarfile.ReadError(f"{url} lacks the end-of-archive marker after byte {offset}")
                while stream.read(1 << 16):
                    pass
                return
            if header == _ZERO_BLOCK:
                raise tarfile.ReadError(f"{url} has its end-of-archive marker at byte {offset}, before byte "
                                        f"{end} where a sample should start")  # fmt: skip
            if not header and offset > 0:
                raise tarfile.ReadError(f"{url} ends after byte {offset} without an end-of-archive marker "
                                        "(truncated)")
            yield from _tarfile_members(stream, url, header, offset, end)
            return
        name, size, is_file = parsed
        padded = -(-size // BLOCK) * BLOCK
        data = stream.read(size)
        if len(data) < size or len(stream.read(padded - size)) < padded - size:
            raise tarfile.ReadError(f"{url} is cut inside member {name!r} (truncated)")
        offset += BLOCK + padded
        if is_file:
            yield name, data


# ---------------------------------------------------------------- samples


def _split_member_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext`` (key: up to the first dot of the last path component), without its
    regular expression in the common case."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1:
        return name[:dot], name[dot + 1 :]
    return base_plus_ext(name)


def _is_metadata(key: str | None) -> bool:
    """Not a sample member: no key, or webdataset's ``__``-prefixed metadata convention."""
    return key is None or key.startswith("__", key.rfind("/") + 1)


def _samples(
    members: Iterable[tuple[str, bytes]], index: int, start: int, stop: int | None, wanted: set[int] | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Group members into samples (runs sharing a key), numbered from ``index + 1``; yield those with
    ``start <= index < stop`` (and in ``wanted``), skipping the others undecoded."""
    key, sample = None, None
    for name, data in members:
        member_key, extension = _split_member_name(name)
        if member_key is None or member_key.startswith("__", member_key.rfind("/") + 1):
            continue  # not a sample member (webdataset's metadata convention); inline: ~2 calls a sample
        if member_key != key:
            if sample is not None:
                yield index, sample
            index, key = index + 1, member_key
            if stop is not None and index >= stop:
                return
            keep = index >= start and (wanted is None or index in wanted)
            sample = {"__key__": member_key} if keep else None
        if sample is not None:
            sample[extension.lower()] = data
    if sample is not None:
        yield index, sample


def _runs(start: int, stop: int | None, picks: Sequence[int] | None, samples: int) -> list[tuple[int, int]]:
    """The wanted sample indices as ``[(first, stop)]`` runs of consecutive indices, within the shard."""
    if picks is None:
        stop = samples if stop is None else min(stop, samples)
        return [(start, stop)] if start < stop else []
    runs: list[tuple[int, int]] = []
    for index in sorted({int(p) for p in picks if start <= p < samples}):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:  # a pipe: reader closed early reports its killed child; nothing is lost
        pass


def iter_shard(
    url: str,
    start: int = 0,
    stop: int | None = None,
    picks: Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(index, raw sample)`` for the samples of a tar with ``start <= index < stop`` (and in picks;
    ``stop`` is then ignored), in index order.

    A sample is a run of consecutive members sharing a key. Without ``offsets`` the shard is read from its
    start and earlier samples are skipped undecoded. With ``offsets`` (the byte offset of each sample's
    first member header, as the manifest records them; ``len(offsets)`` = the shard's samples) the shard
    is opened seekably and only the wanted samples are read: one seek per run of consecutive wanted
    samples, reading stopping where the run ends. Both yield the same pairs. Streams that cannot seek
    (``pipe:``, http) are read from the start either way.
    """
    if offsets is not None and can_seek(url):
        yield from _iter_shard_ranges(url, _runs(start, stop, picks, len(offsets)), offsets)
        return
    wanted = set(picks) if picks is not None else None
    if picks is not None:
        stop = max(picks) + 1 if picks else start
    stream = open_url(url)
    try:
        yield from _samples(iter_members(stream, url), -1, start, stop, wanted)
    finally:
        _close_quietly(stream)


def _iter_shard_ranges(
    url: str, runs: list[tuple[int, int]], offsets: Sequence[int]
) -> Iterator[tuple[int, dict[str, Any]]]:
    if not runs:
        return
    raw = open_seekable(url)
    stream = io.BufferedReader(raw, _RANGE_BUFFER)
    try:
        for first, stop in runs:
            begin = int(offsets[first])
            end = int(offsets[stop]) if stop < len(offsets) else None  # None: to the end of the archive
            raw.limit = end
            stream.seek(begin)
            head = stream.read(BLOCK)
            stream.seek(begin)  # within the buffer: no second read
            if not _is_header(head):
                raise tarfile.ReadError(
                    f"{url} has no tar header at byte {begin}, where its offsets put sample {first}: the "
                    "offsets do not fit the shard (rebuild its manifest with `defocus-scale index-shards`)"
                )
            yield from _samples(iter_members(stream, url, begin, end), first - 1, first, stop, None)
    finally:
        _close_quietly(stream)


# ---------------------------------------------------------------- header-only scan


def _scan_members(
    file: _CountedFile, url: str, want: Callable[[str], bool]
) -> Iterator[tuple[int, str, bytes | None]]:
    """``(header offset, name, data)`` of the regular files of a seekable tar, reading only the headers
    (and the data of the members ``want`` names; None for the others), with iter_members' checks."""
    size, pos = file.size, 0
    while True:
        file.seek(pos)
        block = file.read(BLOCK + _PEEK)
        header = block[:BLOCK]
        parsed = _plain_header(header) if len(header) == BLOCK else None
        if parsed is None:
            if header == _ZERO_BLOCK:
                if size < pos + 2 * BLOCK:
                    raise tarfile.ReadError(f"{url} lacks the end-of-archive marker after byte {pos}")
                return
            if not header and pos > 0:
                raise tarfile.ReadError(f"{url} ends after byte {pos} without an end-of-archive marker "
                                        "(truncated)")  # fmt: skip
            yield from _scan_with_tarfile(file, url, pos, want)
            return
        name, length, is_file = parsed
        padded = -(-length // BLOCK) * BLOCK
        if pos + BLOCK + padded > size:
            raise tarfile.ReadError(f"{url} is cut inside member {name!r} (truncated)")
        if is_file:
            data = None
            if want(name):
                if length <= _PEEK:
                    data = block[BLOCK : BLOCK + length]
                else:
                    file.seek(pos + BLOCK)
                    data = file.read(length)
            yield pos, name, data
        pos += BLOCK + padded


def _scan_with_tarfile(
    file: _CountedFile, url: str, pos: int, want: Callable[[str], bool]
) -> Iterator[tuple[int, str, bytes | None]]:
    """The rest of a scan from byte ``pos``, through tarfile's random-access reader (it reads each header,
    extended ones too, and seeks past the data); then a check that an end-of-archive marker stopped it."""
    file.seek(pos)
    try:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for info in tar:
                if info.isreg():  # info.offset: the member's first header (a PAX or long-name one)
                    yield info.offset, info.name, tar.extractfile(info).read() if want(info.name) else None
                tar.members = []
            stopped = tar.offset
    except tarfile.TarError as exc:
        raise tarfile.ReadError(f"{url}: {exc}") from exc
    file.seek(stopped)
    if file.read(BLOCK) != _ZERO_BLOCK:
        raise tarfile.ReadError(f"{url} has no readable tar header at byte {stopped}")
    if file.size < stopped + 2 * BLOCK:
        raise tarfile.ReadError(f"{url} lacks the end-of-archive marker after byte {stopped}")


def _is_label(name: str) -> bool:
    extension = _split_member_name(name)[1]
    return extension is not None and extension.lower() == "cls"


def scan_shard(url: str) -> ShardRecord:
    """The manifest row of a shard (``shard`` = ``url``), from its tar headers alone: samples, bytes (the
    file's size), each sample's offset and the class counts of its ``.cls`` labels (a label that is not a
    class index is not counted). Member data is seeked past except the few bytes of each ``.cls``, so a
    scan reads two headers a sample (~1 KiB). Raises ``tarfile.ReadError`` naming ``url`` on a truncated or
    corrupt shard."""
    file = open_seekable(url)
    offsets: list[int] = []
    counts: list[int] = []
    key = None
    try:
        for offset, name, data in _scan_members(file, url, _is_label):
            member_key, _ = _split_member_name(name)
            if _is_metadata(member_key):
                continue
            if member_key != key:
                offsets.append(offset)
                key = member_key
            if data is not None:
                try:
                    label = int(data)
                except ValueError:
                    continue
                if 0 <= label < _MAX_LABEL:
                    counts.extend([0] * (label + 1 - len(counts)))
                    counts[label] += 1
    finally:
        file.close()
    return ShardRecord(url, len(offsets), file.size, tuple(counts), tuple(offsets))
