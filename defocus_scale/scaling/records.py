"""One Parquet table of scaling-sweep trial records: one row per trial, rewritten atomically on append.

The table is small (one row per training run), so each append reads it, adds or replaces the row of the
trial, writes a temporary file beside it and renames it over the old one: a crash mid-write leaves the
previous table intact, and a lock file serialises writers on the same machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TRIAL_STATUSES = ("finished", "failed", "diverged")


@dataclass(frozen=True)
class TrialRecord:
    """What one finished (or failed) sweep trial leaves behind.

    ``params`` counts non-embedding parameters (see ``sweep_plan.non_embedding_params``);
    ``flops_per_image`` is one forward pass in training mode; ``compute`` is the training FLOPs,
    ``3 * flops_per_image * images_seen`` (forward + backward), i.e. about ``6 N D`` in tokens.
    A metric the trainer does not measure (e.g. ``train_acc`` under Mixup) or a failed trial's
    metrics are NaN.
    """

    trial_id: str
    sweep: str
    family: str
    model: str
    width: int
    depth: int
    params: int
    flops_per_image: float
    images_seen: int
    tokens_seen: int
    compute: float
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    wall_time_s: float
    status: str
    error: str = ""  # why a failed trial failed (the exception's type and message); empty otherwise

    def __post_init__(self) -> None:
        if self.status not in TRIAL_STATUSES:
            raise ValueError(
                f"trial {self.trial_id}: status must be one of {TRIAL_STATUSES}, got {self.status!r}"
            )


# Field annotations are strings under ``from __future__ import annotations``.
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
RECORD_SCHEMA = pa.schema(
    [pa.field(f.name, _ARROW_TYPES[f.type], nullable=False) for f in dataclasses.fields(TrialRecord)]
)

_COLUMN_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(TrialRecord) if f.default is not dataclasses.MISSING
}


class RecordTableError(ValueError):
    """A trial table that cannot be read or does not have the trial-record columns."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_table(path: str | Path) -> pa.Table:
    """The trial table at ``path`` as an Arrow table (empty with the record schema if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return RECORD_SCHEMA.empty_table()
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RecordTableError(
            f"trial table {path} could not be read (corrupt or not Parquet): {exc}"
        ) from exc
    for name, default in _COLUMN_DEFAULTS.items():  # tables written before the column existed
        if name not in table.column_names:
            table = table.append_column(
                name, pa.array([default] * table.num_rows, RECORD_SCHEMA.field(name).type)
            )
    missing = [name for name in RECORD_SCHEMA.names if name not in table.column_names]
    if missing:
        raise RecordTableError(f"trial table {path} lacks the columns {missing}")
    return table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)


def read_records(path: str | Path) -> list[TrialRecord]:
    """Every record in the table at ``path``, in table order (none if the file does not exist)."""
    return [TrialRecord(**row) for row in read_table(path).to_pylist()]


def append_record(path: str | Path, record: TrialRecord) -> None:
    """Add ``record`` to the table at ``path`` (created if absent), replacing an earlier row of the same
    trial id (a rerun of a failed trial). The rewrite is atomic: readers see the old or the new table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        rows = [row for row in read_table(path).to_pylist() if row["trial_id"] != record.trial_id]
        rows.append(dataclasses.asdict(record))
        table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would make the table private to its writer
        try:
            pq.write_table(table, tmp_name)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise


def finished_trial_ids(path: str | Path) -> set[str]:
    """Ids of the trials whose record says ``finished`` (the ones a resumed sweep skips)."""
    table = read_table(path)
    rows = table.select(["trial_id", "status"]).to_pylist()
    return {row["trial_id"] for row in rows if row["status"] == "finished"}
