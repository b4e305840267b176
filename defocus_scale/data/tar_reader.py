"""Reading WebDataset tar shards: opening a URL, the samples of a shard, and a tar stream's regular files,
read fast for the plain ustar archives WebDataset writes.

``tarfile`` parses every 512-byte header in pure Python, some 30 us a member: two members a sample cost
as much as decoding and augmenting a 32 px image a tenth of the time. :func:`iter_members` reads the
three ustar fields a shard needs (name, size, type) itself and checks each header's checksum; at the
first header it does not handle (PAX or GNU long-name headers, links, sparse files, a compressed
archive, a bad checksum) it hands the rest of the stream to ``tarfile``, which reads it or raises. So
every archive ``tarfile`` reads is still read, and every one it rejects is still rejected.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import webdataset as wds
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext

BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(BLOCK)
_USTAR_MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX ustar, GNU
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EMPTY_CHECKSUM = 8 * ord(" ")  # the checksum field counts as spaces


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


class _CountingReader:
    """Counts the bytes read from a stream (tarfile cannot tell a clean end from a cut inside a header);
    ``head`` holds bytes already taken from the stream, read again first."""

    def __init__(self, raw: Any, head: bytes = b"") -> None:
        self.raw, self.head, self.count = raw, head, 0

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data = self.head if size < 0 else self.head[:size]
            self.head = self.head[len(data) :]
            if size < 0 or len(data) < size:
                data += self.raw.read(-1 if size < 0 else size - len(data))
        else:
            data = self.raw.read(size)
        self.count += len(data)
        return data


def _tarfile_members(stream: Any, url: str, head: bytes) -> Iterator[tuple[str, bytes]]:
    """The rest of the stream (after the already read ``head``), through tarfile's streaming reader."""
    counted = _CountingReader(stream, head)
    end = 0
    with tarfile.open(fileobj=counted, mode="r|*") as tar:
        for info in tar:
            end = info.offset_data + -(-info.size // BLOCK) * BLOCK
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # streaming: keep no history
        compressed = tar.fileobj.comptype != "tar"
    while counted.read(1 << 16):
        pass
    if not compressed and counted.count < end + 2 * BLOCK:
        raise tarfile.ReadError(f"{url} lacks the end-of-archive marker (truncated)")


def iter_members(stream: Any, url: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order; raises ``tarfile.ReadError`` (or
    tarfile's other errors) on a truncated or corrupt archive."""
    offset = 0
    while True:
        header = stream.read(BLOCK)
        parsed = _plain_header(header) if len(header) == BLOCK else None
        if parsed is None:
            if header == _ZERO_BLOCK:  # the end-of-archive marker: two zero blocks (tarfile accepts one)
                if not stream.read(BLOCK):
                    raise tarfile.ReadError(f"{url} lacks the end-of-archive marker after byte {offset}")
                while stream.read(1 << 16):
                    pass
                return
            if not header and offset > 0:
                raise tarfile.ReadError(f"{url} ends after byte {offset} without an end-of-archive marker "
                                        "(truncated)")
            yield from _tarfile_members(stream, url, header)
            return
        name, size, is_file = parsed
        padded = -(-size // BLOCK) * BLOCK
        data = stream.read(size)
        if len(data) < size or len(stream.read(padded - size)) < padded - size:
            raise tarfile.ReadError(f"{url} is cut inside member {name!r} (truncated)")
        offset += BLOCK + padded
        if is_file:
            yield name, data


def open_url(url: str) -> Any:
    """A readable binary stream: local paths and webdataset's schemes (pipe:, http, gs, ...), else fsspec."""
    scheme = urlparse(url).scheme
    if scheme == "":
        return open(url, "rb", buffering=1 << 20)  # few, large reads: tar headers come every few KiB
    if scheme == "file" or scheme in gopen_schemes:
        return wds.gopen(url)
    import fsspec  # object stores (s3://, az://, ...) through their fsspec drivers

    return fsspec.open(url, "rb").open()


def _split_member_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext`` (key: up to the first dot of the last path component), without its
    regular expression in the common case."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1:
        return name[:dot], name[dot + 1 :]
    return base_plus_ext(name)


def iter_shard(url: str, start: int = 0, stop: int | None = None, picks: Sequence[int] | None = None):
    """Yield ``(index, raw sample)`` for the samples of a tar with ``start <= index < stop`` (and in picks).

    A sample is a run of consecutive members sharing a key; earlier samples are skipped undecoded.
    """
    wanted = set(picks) if picks is not None else None
    if picks is not None:
        stop = max(picks) + 1 if picks else start
    stream = open_url(url)
    try:
        index, key, sample = -1, None, None
        for name, data in iter_members(stream, url):
            member_key, extension = _split_member_name(name)
            if member_key is None or member_key.startswith("__", member_key.rfind("/") + 1):
                continue  # not a sample member (webdataset's metadata convention)
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
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: reader closed early reports its killed child; nothing is lost
            pass
