"""Sharded checkpoints with ``torch.distributed.checkpoint``: async save, commit marker, keep-last-k,
automatic resume from the newest complete checkpoint, partial or damaged ones reported and skipped.

Layout under ``<run_dir>/checkpoints/step_<step>/``: DCP's shard files and ``.metadata``,
``trainer_state.json`` (step, epoch, run id, world size, the resolved config; written by rank 0),
``rank_states/rank_<r>.json`` (rank r's data-stream and RNG states, written and, at an unchanged world size,
read by rank r alone) and, last, ``COMMITTED.json`` listing every file with its size. Only a folder whose
marker exists and whose files all match it (and DCP's own metadata) counts; truncation or a missing shard is
caught before DCP reads a byte.

Every checkpoint carries its run's id: a fresh run draws one, a resume continues the id of the checkpoint it
loads. Pruning only ever removes the run's own checkpoints, and a run directory holding complete checkpoints
of two runs is refused rather than resumed from whichever is newer."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from defocus_scale.train.ema import ShardedEMA

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "checkpoints"  # the orchestration's trainer_adapter.CHECKPOINT_FOLDER
COMMIT_MARKER = "COMMITTED.json"
TRAINER_STATE = "trainer_state.json"
RANK_STATES = "rank_states"
_STEP_FOLDER = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or damaged."""


class TrainState(Stateful):
    """Model, optimizer and EMA as one DCP state (FQN-keyed, sharded DTensors)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA | None) -> None:
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def _fsspec_storage() -> Any:
    """DCP's fsspec writer and reader (object stores): a private module in torch 2.14, re-exported from
    ``torch.distributed.checkpoint`` by some releases."""
    try:
        from torch.distributed.checkpoint import _fsspec_filesystem as storage
    except ImportError:  # pragma: no cover - releases that moved it
        import torch.distributed.checkpoint as storage
    return storage


def step_folder(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_name(rank: int) -> str:
    """A rank's own state file inside a checkpoint folder."""
    return f"{RANK_STATES}/rank_{rank:05d}.json"


def _missing_rank_states(trainer_state: dict[str, Any], files: dict[str, int] | set[str]) -> list[str]:
    """The rank state files a checkpoint written by ``trainer_state["world_size"]`` ranks lacks (none for
    the older format that kept every rank's state inside ``trainer_state.json``)."""
    if "loader_states" in trainer_state or "world_size" not in trainer_state:
        return []
    names = (rank_state_name(r) for r in range(int(trainer_state["world_size"])))
    return [name for name in names if name not in files]


class CheckpointStore:
    """The checkpoint folders of one run on a local disk or any fsspec filesystem (``s3://...``)."""

    def __init__(self, run_dir: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = f"{root.rstrip('/')}/{CHECKPOINT_FOLDER}"
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self.url = run_dir.rstrip("/") + f"/{CHECKPOINT_FOLDER}"  # as the user named it

    def path(self, step: int) -> str:
        return f"{self.root}/{step_folder(step)}"

    def checkpoint_id(self, step: int) -> str:
        """What DCP's readers and writers take: a local path, or the URL for fsspec."""
        return self.path(step) if self.is_local else f"{self.url}/{step_folder(step)}"

    def writer(self, step: int) -> Any:
        if self.is_local:
            return FileSystemWriter(self.path(step))
        return _fsspec_storage().FsspecWriter(self.checkpoint_id(step))

    def reader(self, step: int) -> Any:
        if self.is_local:
            return FileSystemReader(self.path(step))
        return _fsspec_storage().FsspecReader(self.checkpoint_id(step))

    def steps(self) -> list[int]:
        """Steps that have a folder, complete or not, oldest first."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for entry in self.fs.ls(self.root, detail=False):
            match = _STEP_FOLDER.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def _files(self, step: int) -> dict[str, int]:
        folder = self.path(step)
        found = self.fs.find(folder, detail=True)
        return {name[len(folder) + 1 :]: int(info["size"]) for name, info in found.items()}

    def write_json(self, step: int, name: str, data: dict[str, Any]) -> None:
        target = f"{self.path(step)}/{name}"
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(target, "w") as handle:
            json.dump(data, handle)

    def read_json(self, step: int, name: str) -> dict[str, Any]:
        with self.fs.open(f"{self.path(step)}/{name}", "r") as handle:
            return json.load(handle)

    def commit(self, step: int) -> None:
        """Write the marker: called once every rank's shards and DCP's ``.metadata`` are written."""
        files = self._files(step)
        files.pop(COMMIT_MARKER, None)
        for needed in (".metadata", TRAINER_STATE):
            if needed not in files:
                raise CheckpointError(f"checkpoint {self.path(step)} lacks {needed}; not committing it")
        trainer_state = self.read_json(step, TRAINER_STATE)
        missing = _missing_rank_states(trainer_state, files)
        if missing:
            raise CheckpointError(f"checkpoint {self.path(step)} lacks {', '.join(missing[:3])}"
                                  f"{' ...' if len(missing) > 3 else ''}; not committing it")  # fmt: skip
        self.write_json(step, COMMIT_MARKER, {"step": step, "committed_at": time.time(), "files": files,
                                              "run_id": trainer_state.get("run_id")})  # fmt: skip

    def run_id(self, step: int) -> str | None:
        """The id of the run that wrote ``step`` (None: unreadable, or written before runs had ids)."""
        try:
            return self.read_json(step, TRAINER_STATE).get("run_id")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def problem(self, step: int) -> str | None:
        """Why the checkpoint at ``step`` cannot be used, or None if it is complete and intact."""
        try:
            marker = self.read_json(step, COMMIT_MARKER)
        except FileNotFoundError:
            return "no commit marker (the save did not finish)"
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"unreadable commit marker ({exc})"
        found = self._files(step)
        for name, size in marker.get("files", {}).items():
            if name not in found:
                return f"file {name} is missing"
            if found[name] != size:
                return f"file {name} has {found[name]} bytes, {size} were written"
        try:
            trainer_state = self.read_json(step, TRAINER_STATE)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"unreadable {TRAINER_STATE} ({exc})"
        missing = _missing_rank_states(trainer_state, found)
        if missing:
            return f"file {missing[0]} is missing ({len(missing)} rank state file(s) in all)"
        # The marker is a plain file anyone can edit: DCP's own metadata says which files hold the tensors.
        if ".metadata" not in found:
            return "DCP's .metadata is missing"
        try:
            storage = self.reader(step).read_metadata().storage_data or {}
        except Exception as exc:  # noqa: BLE001 -- DCP raises several types for a damaged .metadata
            return f"unreadable DCP .metadata ({type(exc).__name__}: {exc})"
        for info in storage.values():
            name = getattr(info, "relative_path", None)
            if name is not None and name not in found:
                return f"file {name}, which DCP's .metadata names, is missing"
        return None

    def newest_complete(self) -> tuple[int | None, list[tuple[int, str]]]:
        """The newest usable step and the (step, reason) of every newer one that was skipped."""
        skipped = []
        for step in reversed(self.steps()):
            reason = self.problem(step)
            if reason is None:
                return step, skipped
            skipped.append((step, reason))
        return None, skipped

    def remove(self, step: int) -> None:
        if self.fs.exists(self.path(step)):
            self.fs.rm(self.path(step), recursive=True)

    def prune(self, keep_last: int, run_id: str | None = None) -> list[int]:
        """Keep the newest ``keep_last`` complete checkpoints; drop older ones and unfinished saves older
        than the newest complete one (they can never finish). Damaged ones are left for inspection. With
        ``run_id``, only that run's checkpoints are considered: another run's are never touched."""
        steps = [s for s in self.steps() if run_id is None or self.run_id(s) in (run_id, None)]
        complete = [s for s in steps if self.problem(s) is None]
        if not complete:
            return []
        keep = set(complete[-keep_last:])
        newest = complete[-1]
        removed = []
        for step in steps:
            if step in keep or step > newest:
                continue
            if step in complete or not self.fs.exists(f"{self.path(step)}/{COMMIT_MARKER}"):
                self.remove(step)
                removed.append(step)
        return removed


@dataclass
class _PendingSave:
    step: int
    future: Future


class Checkpointer:
    """Saves (async or not) and loads :class:`TrainState` plus the JSON trainer state; rank 0 commits and
    prunes. Async saves use their own gloo group so the writer thread's collectives never interleave with
    training's."""

    def __init__(
        self, store: CheckpointStore, *, keep_last: int, async_save: bool, rank: int, cuda: bool = False,
        world_size: int | None = None,
    ) -> None:  # fmt: skip
        self.store, self.keep_last, self.async_save, self.rank = store, keep_last, async_save, rank
        self.world_size = world_size if world_size is not None else dist.get_world_size()
        self.run_id: str | None = None  # drawn by open_run (or the first save), or the resumed checkpoint's
        self._group = dist.new_group(backend="gloo") if async_save else None
        # On GPUs the copy to (pinned) host memory runs in the background too; the state must not change
        # until it is done (wait_for_staging before the optimizer step). On CPU the copy happens in save().
        # One stager for the whole run: it keeps its (pinned) host buffers from one save to the next.
        self._stager = DefaultStager(StagingOptions(cuda, False, cuda, cuda)) if async_save else None
        self._staging: Future | None = None
        self._pending: _PendingSave | None = None
        self.last_committed: int | None = None

    def save(
        self, step: int, state: TrainState, trainer_state: dict[str, Any],
        rank_state: dict[str, Any] | None = None,
    ) -> float:  # fmt: skip
        """Start (async) or do (sync) a save of ``step``: ``trainer_state`` is the same on every rank (rank 0
        writes it, with the run id and world size added), ``rank_state`` this rank's own (it writes it).
        Returns the seconds training was blocked."""
        start = time.perf_counter()
        self.wait()
        if self.run_id is None:
            self.open_run(resume=False, refuse_existing=False)
        if self.rank == 0:
            self.store.remove(step)  # a leftover of an earlier, interrupted attempt at this step
            shared = {**trainer_state, "run_id": self.run_id, "world_size": self.world_size}
            with _naming_failures(self.store.path(step)):
                self.store.write_json(step, TRAINER_STATE, shared)
        dist.barrier()
        # Before this rank's DCP write: rank 0 writes .metadata (and then commits) only after every rank's
        # DCP write has reported back, so a committed folder has every rank's file.
        with _naming_failures(self.store.path(step)):
            self.store.write_json(step, rank_state_name(self.rank), {"rank": self.rank, **(rank_state or {})})
        if self.async_save:
            response = dcp.async_save(
                {"train": state}, storage_writer=self.store.writer(step), process_group=self._group,
                async_stager=self._stager,
            )  # fmt: skip
            future = getattr(response, "upload_completion", response)
            self._staging = getattr(response, "staging_completion", None)
            self._pending = _PendingSave(step, future)
        else:
            with _naming_failures(self.store.path(step)):
                dcp.save({"train": state}, storage_writer=self.store.writer(step))
            self._finish(step)
        return time.perf_counter() - start

    def wait_for_staging(self) -> float:
        """Block until the pending save has its own copy of the state; call before changing the weights.
        Returns the seconds waited."""
        if self._staging is None:
            return 0.0
        start = time.perf_counter()
        self._staging.result()
        self._staging = None
        return time.perf_counter() - start

    def poll(self) -> None:
        """Commit the pending async save if its writing finished (cheap; call every step)."""
        if self._pending is not None and self._pending.future.done():
            self.wait()

    def wait(self, timeout: float | None = None) -> None:
        """Finish the pending async save: its copy, its writing (a failed write is re-raised), the commit
        (rank 0). DCP's writer thread for the save is joined as well: it holds the checkpoint group until it
        ends, and no thread of a save may outlive the call. Past ``timeout`` seconds of writing,
        ``TimeoutError`` is raised and the save stays pending."""
        import threading
        from concurrent import futures

        self.wait_for_staging()
        if self._pending is None:
            return
        pending = self._pending
        if not futures.wait([pending.future], timeout).done:
            raise TimeoutError(f"the checkpoint of step {pending.step} is still being written")
        self._pending = None
        try:
            with _naming_failures(self.store.path(pending.step)):
                pending.future.result()  # re-raises a failed write
        finally:
            # DCP's executor thread ends right after the future's callbacks (its executor shuts down then).
            writers = [t for t in threading.enumerate() if t.name.startswith("AsyncCheckpointExecutor")]
            for thread in writers:
                if thread is not threading.current_thread():
                    thread.join(timeout=60)
        self._finish(pending.step)

    def _finish(self, step: int) -> None:
        # DCP's coordinator (rank 0) writes .metadata only after gathering every rank's write results, so
        # when rank 0's save has returned, all shards are on storage.
        if self.rank == 0:
            self.store.commit(step)
            removed = self.store.prune(self.keep_last, run_id=self.run_id)
            if removed:
                logger.info("pruned checkpoints of steps %s", removed)
        self.last_committed = step

    def open_run(self, *, resume: bool, refuse_existing: bool = True) -> int | None:
        """Decide, on rank 0, what this run is; every rank gets the same answer (one broadcast) and raises
        alike. ``resume``: the newest complete checkpoint's step (reporting skipped ones) and its run id,
        or a new id and None if there is none. Otherwise a new id; with ``refuse_existing``, a run directory
        that already holds checkpoints raises :class:`CheckpointError` (a fresh run there would make a later
        resume ambiguous). A directory holding complete checkpoints of two runs is refused either way."""
        decision: list[Any] = [None]
        if self.rank == 0:
            try:
                decision[0] = ("ok", *self._decide(resume, refuse_existing))
            except CheckpointError as exc:
                decision[0] = ("error", str(exc), None)
        dist.broadcast_object_list(decision, src=0)
        outcome, first, second = decision[0]
        if outcome == "error":
            raise CheckpointError(first)
        self.run_id = second
        return first

    def _decide(self, resume: bool, refuse_existing: bool) -> tuple[int | None, str]:
        fresh = uuid.uuid4().hex[:12]
        steps = self.store.steps()
        where = self.store.url
        if not resume:
            if refuse_existing and steps:
                shown = ", ".join(str(s) for s in steps[-5:]) + (", ..." if len(steps) > 5 else "")
                raise CheckpointError(
                    f"trainer.resume=false, but {where} already holds checkpoints of an earlier run (steps "
                    f"{shown}); a fresh run there would make a later resume ambiguous. Continue that run "
                    "(trainer.resume=true), choose another trainer.run_dir, or delete those checkpoints"
                )
            return None, fresh
        step, skipped = self.store.newest_complete()
        for skipped_step, reason in skipped:
            logger.warning("skipping checkpoint %s: %s", self.store.path(skipped_step), reason)
        if step is None:
            return None, fresh
        runs: dict[str, list[int]] = {}
        for other in steps:
            run = self.store.run_id(other)
            if run is not None and other <= step and self.store.problem(other) is None:
                runs.setdefault(run, []).append(other)
        if len(runs) > 1:
            listed = "; ".join(f"run {run}: steps {found[0]}..{found[-1]}" for run, found in runs.items())
            raise CheckpointError(
                f"{where} holds complete checkpoints of {len(runs)} runs ({listed}); resuming would continue "
                "whichever saved the highest step. Move the other run's step folders away, or choose "
                "another trainer.run_dir"
            )
        return step, self.store.run_id(step) or fresh

    def read_rank_states(self, step: int, trainer_state: dict[str, Any]) -> list[dict[str, Any]]:
        """The per-rank states a resume needs: at an unchanged world size this rank's own (read by this rank
        alone), else every old rank's, read by rank 0 and broadcast (an elastic resume re-splits them)."""
        saved_world = int(trainer_state["world_size"])
        if "loader_states" in trainer_state:  # the older format: every rank's state in trainer_state.json
            pairs = zip(trainer_state["loader_states"], trainer_state["rng_states"], strict=True)
            states = [{"rank": r, "loader": loader, "rng": rng} for r, (loader, rng) in enumerate(pairs)]
            return [states[self.rank]] if saved_world == self.world_size else states
        if saved_world == self.world_size:
            return [self.store.read_json(step, rank_state_name(self.rank))]
        gathered: list[Any] = [None]
        if self.rank == 0:
            gathered[0] = [self.store.read_json(step, rank_state_name(r)) for r in range(saved_world)]
        dist.broadcast_object_list(gathered, src=0)
        return gathered[0]

    def load(self, step: int, state: TrainState) -> dict[str, Any]:
        with _naming_failures(self.store.path(step), "loading"):
            dcp.load({"train": state}, storage_reader=self.store.reader(step))
        return self.store.read_json(step, TRAINER_STATE)

    def close(self, *, abandon: bool = False, timeout: float = 10.0) -> None:
        """Finish the pending save and destroy the checkpoint group; a second call does nothing.

        Every rank calls it at the same point of a run that went well: the pending save is awaited and
        committed, then the ranks meet at a barrier on the group before it goes (gloo aborts a process whose
        peer tears a group down while it is still in use). ``abandon`` is for the error and termination
        paths, where the other ranks may be dead or elsewhere: no collective at all; the pending save gets
        ``timeout`` seconds to finish by itself (every rank's writer thread carries on without its main
        thread) and is committed if it did, else left uncommitted -- skipped on resume -- with its writer
        thread left to the process's exit. Abandoning never raises: problems are logged."""
        if not abandon:
            self.wait()
            self._close_stager()
            if self._group is not None:
                group, self._group = self._group, None
                dist.barrier(group=group)
                dist.destroy_process_group(group)
            return
        pending = self._pending
        try:
            self.wait(timeout=timeout)
            self._close_stager()  # only now: a save still being written goes on reading its buffers
        except TimeoutError:
            logger.warning("abandoning the checkpoint of step %s: still being written; it stays uncommitted",
                           pending.step if pending else "?")  # fmt: skip
            self._pending = self._staging = None
        except Exception:  # noqa: BLE001 -- abandoning: the run is failing anyway
            logger.warning("the pending checkpoint failed; it stays uncommitted", exc_info=True)
            self._pending = self._staging = None
        if self._group is not None:
            group, self._group = self._group, None
            try:
                if dist.is_initialized():
                    dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001
                logger.warning("destroying the checkpoint process group failed", exc_info=True)

    def _close_stager(self) -> None:
        stager, self._stager = getattr(self, "_stager", None), None
        if stager is not None:
            stager.close()


@contextlib.contextmanager
def _naming_failures(folder: str, doing: str = "saving") -> Iterator[None]:
    """A failed save or load as one ordinary error naming the checkpoint folder. DCP reports a rank's error
    as a ``CheckpointException`` (a BaseException, which ``except Exception`` misses) wrapping the original.
    An OSError keeps its errno, so that a full disk or a denied write stays an error the user must fix (not
    retried) and a storage hiccup is retried; anything else is a RuntimeError when saving (retried) and a
    :class:`CheckpointError` when loading (a checkpoint of another model, say: not retried)."""
    try:
        yield
    except (OSError, CheckpointException) as exc:
        failures = getattr(exc, "failures", None) or {}
        inner = next(iter(failures.values()))[0] if failures else exc
        ranks = f" (ranks {sorted(failures)})" if failures else ""
        if isinstance(inner, OSError):
            reason = inner.strerror or str(inner)
            raise OSError(inner.errno, f"{reason} while {doing} checkpoint {folder}{ranks}",
                          inner.filename or folder) from None  # fmt: skip
        error = RuntimeError if doing == "saving" else CheckpointError
        raise error(f"{doing} checkpoint {folder} failed{ranks}: {type(inner).__name__}: {inner}") from None


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON (torch CPU and CUDA as byte lists)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
