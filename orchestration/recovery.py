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
ATTEMPTS = "attempts.parquet"
PREEMPTION = "preemption"  # the source of a failure note for a worker lost to a node preemption


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


ATTEMPT_KINDS = ("start", "failure", "preemption", "resize")


@dataclass(frozen=True)
class Attempt:
    """One start of a launch's worker group (rank 0 records it before the trainer runs)."""

    launch_id: str
    time: float  # unix seconds
    world_size: int
    # Why the group (re)started: "start" (the launch's first), "failure" (charged to the failure budget),
    # "preemption" (a node was preempted; counted apart) or "resize" (an elastic group grown or shrunk by
    # Ray with no worker failing: no failure note).
    kind: str


def is_preemption(error: BaseException) -> bool:
    """Whether Ray reports a worker's death as a node preemption: a dead actor (possibly wrapped in a failed
    health check) whose ``preempted`` flag is set."""
    error = getattr(error, "health_check_failure", None) or error
    return bool(getattr(error, "preempted", False))


def spend_failure_budget(
    storage: RunStorage, *, launch_id: str, world_size: int, max_failures: int, window_s: float | None,
    silent_restarts_failed: bool, now: float | None = None,
) -> tuple[str, str | None]:  # fmt: skip
    """Record this start of the worker group and charge the failure before it, if any, to the budget:
    at most ``max_failures`` failures within any ``window_s`` seconds (None: in the whole launch).

    A restart is a preemption when a failure note says so (Ray's controller notes every worker it loses),
    a failure when any other note exists, and, with no note at all, a failure if ``silent_restarts_failed``
    (torchrun restarts only on failure) else a resize (Ray's elastic groups restart to change size).
    Returns the kind of this start and why the launch must stop (or None). Called once per start, by
    rank 0, before the trainer."""
    now = time.time() if now is None else now
    earlier = [Attempt(**row) for row in storage.read_rows(FOLDER, ATTEMPTS) if row["launch_id"] == launch_id]
    notes = [note for _, note in read_failure_notes(storage)]
    if not earlier:
        kind = "start"
    elif any(n.source == PREEMPTION for n in notes):
        kind = "preemption"
    elif notes or silent_restarts_failed:
        kind = "failure"
    else:
        kind = "resize"
    attempt = Attempt(launch_id, now, world_size, kind)
    storage.append_rows([asdict(attempt)], FOLDER, ATTEMPTS)
    charged = [a for a in [*earlier, attempt]
               if a.kind == "failure" and (window_s is None or a.time > now - window_s)]  # fmt: skip
    if kind != "failure" or len(charged) <= max_failures:
        return kind, None
    span = "in this launch" if window_s is None else f"within {window_s:.0f} s (launcher.failure_window_s)"
    causes = "; ".join(dict.fromkeys(f"{n.source}: {n.cause}" for n in notes))
    last = causes or "the worker group died without a note (node loss or a killed process)"
    return kind, (f"failure budget spent: {len(charged)} failures {span}, launcher.max_failures="
                  f"{max_failures}; the last: {last}")


def read_attempts(run_dir: str) -> list[Attempt]:
    return [Attempt(**row) for row in RunStorage(run_dir).read_rows(FOLDER, ATTEMPTS)]


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

    def __init__(
        self, storage: RunStorage, *, rank: int, world_size: int, launch_id: str, start_kind: str = "start"
    ) -> None:
        self.storage, self.rank, self.world_size, self.launch_id = storage, rank, world_size, launch_id
        self.start_kind = start_kind  # this start's Attempt.kind (a resize restarts without a failure)
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
        elif self.start_kind == "resize":  # no failure: Ray restarted an elastic group to change its size
            failed_at, cause = float(progress["time"]), "elastic resize by Ray (no failure)"
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
