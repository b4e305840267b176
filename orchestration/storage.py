"""Small files beside a run's checkpoints, on a local directory or an object store (through fsspec).

Every worker and the Ray controller reach the run directory by its URL, so notes written here (failures,
progress, restart records) survive the processes that wrote them.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class RunStorage:
    """Files under ``root`` (a run directory: a local path or any fsspec URL, the same layer the trainer's
    checkpoints and the data use, with the same credentials). Writes go to a temporary name first, then
    move into place, so a reader never sees half a file (object stores write whole objects anyway)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, base = fsspec.core.url_to_fs(self.root)
        self.base = base.rstrip("/")

    def __reduce__(self):  # rebuilt from the URL in the receiving process
        return (RunStorage, (self.root,))

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open(temporary, "wb") as out:
                out.write(data)
            self.fs.mv(temporary, target)
        except OSError as exc:  # a full or read-only disk: name the file, leave no temporary behind
            with contextlib.suppress(OSError):
                self.fs.rm_file(temporary)
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror or str(exc), target) from None
            raise

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_json(self, value: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(value, sort_keys=True).encode(), *parts)

    def read_json(self, *parts: str, default: Any = None) -> Any:
        if not self.exists(*parts):
            return default
        return json.loads(self.read_bytes(*parts))

    def list_entries(self, *parts: str, kind: str = "file") -> list[str]:
        """Names (not paths) of the entries of ``kind`` ("file" or "directory") directly under ``parts``,
        sorted; [] if it does not exist. Temporary files are left out."""
        folder = self.path(*parts)
        if not self.fs.isdir(folder):
            return []
        names = (info["name"].rstrip("/").rsplit("/", 1)[-1]
                 for info in self.fs.ls(folder, detail=True) if info["type"] == kind)  # fmt: skip
        return sorted(name for name in names if ".tmp-" not in name)

    def list_files(self, *parts: str) -> list[str]:
        """Names (not paths) of the plain files directly under ``parts``, sorted; [] if it does not exist."""
        return self.list_entries(*parts, kind="file")

    def delete(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm_file(self.path(*parts))

    def append_rows(self, rows: list[dict], *parts: str) -> None:
        """Append rows to a Parquet table (read, concatenate, rewrite: these tables hold a few rows)."""
        table = pa.Table.from_pylist(rows)
        if self.exists(*parts):
            table = pa.concat_tables([self._read_table(*parts), table], promote_options="default")
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.write_bytes(sink.getvalue(), *parts)

    def read_rows(self, *parts: str) -> list[dict]:
        if not self.exists(*parts):
            return []
        return self._read_table(*parts).to_pylist()

    def _read_table(self, *parts: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(*parts)))
