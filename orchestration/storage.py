"""Small files beside a run's checkpoints, on a local directory or an object store (through pyarrow.fs).

Every worker and the Ray controller reach the run directory by its URL, so notes written here (failures,
progress, restart records) survive the processes that wrote them.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def _as_uri(location: str) -> str:
    """pyarrow wants absolute local paths; URLs (s3://, gs://, file://) pass unchanged."""
    return location if urlparse(location).scheme not in ("",) else os.path.abspath(location)


class RunStorage:
    """Files under ``root`` (a run directory). Writes go to a temporary name first, then move into place,
    so a reader never sees half a file (object stores write whole objects anyway)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self.base = pafs.FileSystem.from_uri(_as_uri(self.root))

    def __reduce__(self):  # rebuilt from the URL in the receiving process
        return (RunStorage, (self.root,))

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(temporary) as out:
            out.write(data)
        self.fs.move(temporary, target)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def write_json(self, value: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(value, sort_keys=True).encode(), *parts)

    def read_json(self, *parts: str, default: Any = None) -> Any:
        if not self.exists(*parts):
            return default
        return json.loads(self.read_bytes(*parts))

    def list_files(self, *parts: str) -> list[str]:
        """Names (not paths) of the plain files directly under ``parts``, sorted; [] if it does not exist."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        names = (i.base_name for i in infos if i.type == pafs.FileType.File)
        return sorted(name for name in names if ".tmp-" not in name)

    def delete(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_file(self.path(*parts))

    def append_rows(self, rows: list[dict], *parts: str) -> None:
        """Append rows to a Parquet table (read, concatenate, rewrite: these tables hold a few rows)."""
        table = pa.Table.from_pylist(rows)
        if self.exists(*parts):
            with self.fs.open_input_file(self.path(*parts)) as source:
                table = pa.concat_tables([pq.read_table(source), table], promote_options="default")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(sink.getvalue().to_pybytes(), *parts)

    def read_rows(self, *parts: str) -> list[dict]:
        if not self.exists(*parts):
            return []
        with self.fs.open_input_file(self.path(*parts)) as source:
            return pq.read_table(source).to_pylist()
