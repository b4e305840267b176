"""Restart records: when a worker group died, why, which step training resumed from, and what it cost.

Three kinds of evidence meet in the run directory's ``orchestration/`` folder:

* failure notes, written at the moment of death where someone sees it: the fault injector just before
  it kills its own process, the non-finite-loss monitor before it raises, and Ray Train's controller
  (``RecoveryCallback``) when it finds failed workers;
* ``progress.json``, rank 0's last completed step (and its time) in this launch, written behind the
  training thread (a step never waits for storage; on an object store, steps coalesce into one request);
* the resumed step, reported by the trainer on start.

At the first completed step after a resume, rank 0 turns them into one :class:`RestartRecord` in
``restarts.parquet``. Recovery time runs from death (the earliest note; the last progress time when
nothing left a note) to that first step, so it includes detection, restart, checkpoint load and a step.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .storage import RunStorage

logger = logging.getLogger(__name__)

FOLDER = "orchestration"
FAILURES = "failures"
PROGRESS = "progress.json"
RESTARTS = "restarts.parquet"


@dataclass(frozen=True)
class FailureNote:
    time: float  # unix seconds
    cause: str
    source: str  # injector | loss-monitor | ray-controller
    rank: int | None = None
    step: int | None = None


@dataclass(frozen=True)
class RestartRecord:
    restart: int  # 1 for the first restart of this launch
    launch_id: str
    failed_at: float  # unix seconds of death (see module docstring)
    cause: str
    last_step: int  # last step completed before the failure
    resumed_from_step: int
    steps_lost: int  # completed steps that had to be redone
    recovery_s: float  # death to the first completed step after resume
    world_size_before: int
    world_size_after: int


def write_failure_note(storage: RunStorage, note: FailureNote) -> None:
    rank = note.rank if note.rank is not None else "x"
    name = f"{note.time:.6f}-{note.source}-{rank}-{uuid.uuid4().hex[:6]}"
    storage.write_json(asdict(note), FOLDER, FAILURES, f"{name}.json")


def read_failure_notes(storage: RunStorage) -> list[tuple[str, FailureNote]]:
    notes = []
    for name in storage.list_files(FOLDER, FAILURES):
        data = storage.read_json(FOLDER, FAILURES, name)
        if data is not None:
            notes.append((name, FailureNote(**data)))
    return notes


def read_restart_records(run_dir: str) -> list[RestartRecord]:
    return [RestartRecord(**row) for row in RunStorage(run_dir).read_rows(FOLDER, RESTARTS)]


class WriteBehind:
    """Writes the newest value handed to :meth:`put` from a daemon thread, so the caller never waits for
    storage; values handed over while a write is in flight coalesce into the next write. A failed write
    is logged (once) and does not stop training: progress records are evidence, not state."""

    def __init__(self, write: Callable[[Any], None], name: str) -> None:
        self._write, self._name = write, name
        self._cond = threading.Condition()
        self._value: Any = None
        self._handed = self._written = 0
        self._closed, self._warned = False, False
        self._thread: threading.Thread | None = None

    def put(self, value: Any) -> None:
        with self._cond:
            self._value, self._handed = value, self._handed + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the newest value is written (or ``timeout``); True if it was."""
        with self._cond:
            return self._cond.wait_for(lambda: self._written >= self._handed, timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._handed > self._written)
                if self._handed <= self._written:
                    return
                value, handed = self._value, self._handed
            try:
                self._write(value)
            except Exception as exc:  # noqa: BLE001 -- any storage error; training goes on
                if not self._warned:
                    logger.warning("%s: writing failed (%s: %s); retried with the next value", self._name,
                                   type(exc).__name__, exc)  # fmt: skip
                    self._warned = True
            with self._cond:
                self._written = handed
                self._cond.notify_all()


class RecoveryTracker:
    """Lives in every worker; only rank 0 writes. Call ``on_resume`` once, then ``on_step_end`` per step,
    and ``close`` at the end (``flush`` before a deliberate kill, so the record shows the last step)."""

    def __init__(self, storage: RunStorage, *, rank: int, world_size: int, launch_id: str) -> None:
        self.storage, self.rank, self.world_size, self.launch_id = storage, rank, world_size, launch_id
        self.resumed_step: int | None = None
        self._first_step_pending = False
        self._progress = WriteBehind(
            lambda value: storage.write_json(value, FOLDER, PROGRESS), name="progress-writer"
        )

    def flush(self) -> None:
        self._progress.flush()

    def close(self, timeout: float = 30.0) -> None:
        self._progress.close(timeout)

    def on_resume(self, step: int) -> None:
        self.resumed_step = step
        self._first_step_pending = True

    def restarts_so_far(self) -> int:
        return sum(1 for r in self.storage.read_rows(FOLDER, RESTARTS) if r["launch_id"] == self.launch_id)

    def on_step_end(self, step: int) -> RestartRecord | None:
        if self.rank != 0:
            return None
        record = None
        if self._first_step_pending:
            self._first_step_pending = False
            record = self._record_restart(now=time.time())
        self._progress.put(
            {"step": step, "time": time.time(), "world_size": self.world_size, "launch_id": self.launch_id}
        )
        return record

    def _record_restart(self, now: float) -> RestartRecord | None:
        progress = self.storage.read_json(FOLDER, PROGRESS)
        notes = read_failure_notes(self.storage)
        if progress is None or progress["launch_id"] != self.launch_id:
            # A new launch (fresh start or a deliberate resume, maybe with another worker count): notes
            # left by an earlier launch that never recovered are reported, not turned into restarts.
            for name, note in notes:
                logger.warning("failure of an earlier launch, not recovered then: %s", note)
                self.storage.delete(FOLDER, FAILURES, name)
            return None
        if notes:
            failed_at = min(note.time for _, note in notes)
            causes = list(dict.fromkeys(f"{note.source}: {note.cause}" for _, note in notes))
            cause = "; ".join(causes)
        else:  # died without a word (torchrun restart, node loss): the last sign of life bounds the death
            failed_at, cause = float(progress["time"]), "worker group restarted (no failure note)"
        resumed = self.resumed_step if self.resumed_step is not None else 0
        record = RestartRecord(
            restart=self.restarts_so_far() + 1,
            launch_id=self.launch_id,
            failed_at=failed_at,
            cause=cause[:2000],
            last_step=int(progress["step"]),
            resumed_from_step=resumed,
            steps_lost=max(0, int(progress["step"]) - resumed),
            recovery_s=now - failed_at,
            world_size_before=int(progress["world_size"]),
            world_size_after=self.world_size,
        )
        self.storage.append_rows([asdict(record)], FOLDER, RESTARTS)
        for name, _ in notes:
            self.storage.delete(FOLDER, FAILURES, name)
        logger.warning(
            "restart %d: %s; resumed from step %d, %d steps lost, recovered in %.1f s",
            record.restart, record.cause, record.resumed_from_step, record.steps_lost, record.recovery_s,
        )  # fmt: skip
        return record
