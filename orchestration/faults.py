"""Config-driven fault injection for tests and drills (the non-finite-loss guard is the trainer's:
``trainer.max_nonfinite_steps``).

The injector runs inside each worker, after every optimizer step. It kills its *own* process with
SIGKILL -- no clean-up, no exception, exactly what a crashed or preempted worker looks like to the
launcher -- and it can damage the newest complete checkpoint so that the trainer's fallback to the
previous one is exercised. Each planned fault fires once per launch: a marker in the run directory
keeps the replayed steps after the restart from firing it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time

from .config import FaultConfig
from .recovery import FOLDER, FailureNote, write_failure_note
from .storage import RunStorage

logger = logging.getLogger(__name__)


def corrupt_checkpoint(storage: RunStorage, checkpoint: str) -> str:
    """Truncate the largest data file of ``checkpoint`` (a folder under ``storage``) to half its size.

    Truncation, unlike flipping bytes, cannot go unnoticed when the tensors are read back. Returns the
    damaged file's path."""
    folder = storage.path(checkpoint)
    files = storage.fs.find(folder, detail=True) if storage.fs.isdir(folder) else {}
    sizes = {path: int(info["size"]) for path, info in files.items() if info["type"] == "file"}
    data_files = [p for p in sizes if not p.rsplit("/", 1)[-1].startswith(".")] or list(sizes)
    if not data_files:
        raise FileNotFoundError(f"checkpoint {checkpoint!r} under {storage.root} has no files to corrupt")
    victim = max(data_files, key=lambda p: (sizes[p], p))
    head = storage.fs.cat_file(victim, start=0, end=sizes[victim] // 2)
    with storage.fs.open(victim, "wb") as out:
        out.write(head)
    return victim


class FaultInjector:
    """Call :meth:`on_step_end` after every completed step on every rank."""

    def __init__(
        self,
        cfg: FaultConfig,
        storage: RunStorage,
        *,
        rank: int,
        launch_id: str,
        restarts_so_far: int,
        newest_checkpoint,
        before_kill=None,
    ) -> None:
        """``newest_checkpoint()`` returns the newest complete checkpoint's folder relative to ``storage``;
        ``before_kill()`` runs before a kill (the progress record is flushed: the drill kills "after
        step N" once step N is on record, as a real crash between steps would find it)."""
        self.cfg, self.storage, self.rank, self.launch_id = cfg, storage, rank, launch_id
        self.before_kill = before_kill
        self.restarts_so_far = restarts_so_far  # varies the random kills between attempts
        self.newest_checkpoint = newest_checkpoint

    def _once(self, name: str) -> bool:
        """True the first time this launch asks for ``name``: the marker keeps replays from repeating it."""
        marker = (FOLDER, "faults", f"{self.launch_id}-{name}.done")
        if self.storage.exists(*marker):
            return False
        self.storage.write_json({"time": time.time()}, *marker)
        return True

    def _draw(self, step: int) -> float:
        words = repr((self.cfg.seed, self.rank, step, self.restarts_so_far)).encode()
        return int.from_bytes(hashlib.blake2b(words, digest_size=8).digest(), "little") / 2**64

    def on_step_end(self, step: int) -> None:
        cfg = self.cfg
        if not cfg.enabled:
            return
        if (
            self.rank == 0
            and cfg.corrupt_checkpoint_at_step is not None
            and step >= cfg.corrupt_checkpoint_at_step
        ):
            checkpoint = self.newest_checkpoint()
            if checkpoint is not None and self._once(f"corrupt-{cfg.corrupt_checkpoint_at_step}"):
                damaged = corrupt_checkpoint(self.storage, checkpoint)
                logger.warning("fault injector: corrupted checkpoint %s (truncated %s)", checkpoint, damaged)
        if cfg.kill_rank == self.rank and cfg.kill_step == step and self._once(f"kill-r{self.rank}-s{step}"):
            self.kill(step, f"injected SIGKILL of rank {self.rank} at step {step}")
        if cfg.kill_probability > 0 and self._draw(step) < cfg.kill_probability:
            self.kill(step, f"injected SIGKILL of rank {self.rank} at step {step} (p={cfg.kill_probability})")

    def kill(self, step: int, cause: str) -> None:
        if self.before_kill is not None:
            self.before_kill()
        note = FailureNote(time=time.time(), cause=cause, source="injector", rank=self.rank, step=step)
        write_failure_note(self.storage, note)
        logger.warning("fault injector: %s", cause)
        os.kill(os.getpid(), signal.SIGKILL)
