"""What runs in every training process, whichever launcher started it.

Ray Train's ``TorchTrainer`` and ``torchrun`` both leave an initialised process group behind; this
module wires the fault injector, the loss guard and the restart tracker into the trainer's hooks and
calls the trainer entry. ``python -m defocus_scale.orchestration.worker JOB`` is torchrun's target.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .config import OrchestrationConfig
from .faults import FaultInjector
from .recovery import FOLDER, FailureNote, RecoveryTracker, spend_failure_budget, write_failure_note
from .storage import RunStorage
from .trainer_adapter import newest_complete_checkpoint, prepare_trainer_config, resolve_entry

logger = logging.getLogger(__name__)


@dataclass
class WorkerJob:
    """Everything a worker needs, picklable: the trainer is named, not shipped."""

    entry: str  # "module:function"
    trainer_cfg: dict[str, Any]
    orchestration: OrchestrationConfig
    launch_id: str
    extra_sys_path: list[str] = field(default_factory=list)  # the entry module's folder, if not installed
    driver: tuple[str, int] | None = None  # (process_namespace(), pid) of the launching process


def process_namespace() -> str:
    """Where a pid means the same process: host name, boot id and pid namespace (containers on one host
    may share a host name but not their pids)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: the host name alone
        boot, pid_namespace = "", 0
    return f"{socket.gethostname()}/{boot}/{pid_namespace}"


def watch_driver(driver: tuple[str, int] | None, *, interval_s: float = 1.0) -> threading.Thread | None:
    """Stop this worker soon after the launching driver dies (Ray's clean-up of a dead driver's job takes
    a minute or more, in which the workers would go on training and saving). Only where the driver's pid
    means the same process here (same host and pid namespace: :func:`process_namespace`); a daemon thread
    polls it and sends this process SIGTERM (the committed checkpoints stay valid; a save in flight stays
    uncommitted and is skipped)."""
    if driver is None or driver[0] != process_namespace() or driver[1] == os.getpid():
        return None
    host, pid = driver[0].split("/", 1)[0], driver[1]

    def poll() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.error("the driver (pid %d on %s) is gone: stopping this worker", pid, host)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:  # alive, another user's (a reused pid would be too)
                pass

    thread = threading.Thread(target=poll, name="driver-watchdog", daemon=True)
    thread.start()
    return thread


FATAL_KEY = "fatal_error"  # in a launch's result: the trainer stopped on a non-retryable error


def result_name(launch_id: str) -> str:
    return f"result-{launch_id}.json"


class OrchestrationHooks:
    """The trainer's hooks: guard the loss, record progress and restarts, then inject planned faults."""

    def __init__(
        self, storage: RunStorage, job: WorkerJob, *, rank: int, world_size: int, start_kind: str = "start"
    ) -> None:
        self.storage, self.rank = storage, rank
        self.tracker = RecoveryTracker(storage, rank=rank, world_size=world_size, launch_id=job.launch_id,
                                       start_kind=start_kind)  # fmt: skip
        faults = job.orchestration.faults
        self.injector = FaultInjector(
            faults, storage, rank=rank, launch_id=job.launch_id,
            restarts_so_far=self.tracker.restarts_so_far() if faults.enabled else 0,
            newest_checkpoint=lambda: newest_complete_checkpoint(storage), before_kill=self.tracker.flush,
        )  # fmt: skip
        self.step_times: list[float] = []

    def on_resume(self, step: int, checkpoint: str | None) -> None:
        self.tracker.on_resume(step)

    def on_step_end(self, step: int) -> None:
        # Non-finite losses are the trainer's: it skips such steps and stops (non-retryably) on a streak.
        self.step_times.append(time.time())
        self.tracker.on_step_end(step)
        self.injector.on_step_end(step)

    def close(self) -> None:
        self.tracker.close(timeout=5.0)


def run_worker(job: WorkerJob) -> dict[str, Any]:
    """Run the trainer in this process's (initialised) process group; rank 0 stores its summary."""
    for path in job.extra_sys_path:
        if path not in sys.path:
            sys.path.insert(0, path)
    from defocus_scale.train.parallel import prepare_flight_recorder

    watch_driver(job.driver)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    prepare_flight_recorder(job.orchestration.run_dir)  # the dump folder; the group read the variables
    storage = RunStorage(job.orchestration.run_dir)
    run_dir = job.orchestration.run_dir
    cfg, plan = prepare_trainer_config(job.trainer_cfg, run_dir=run_dir, world_size=world_size)
    if plan is not None and rank == 0:
        logger.info("global batch %d = %d workers x %d micro-batch x %d accumulation steps",
                    plan.global_batch, world_size, plan.micro_batch, plan.accumulation)
    launcher = job.orchestration.launcher
    decided: list[tuple[str, str | None]] = [("start", None)]
    if rank == 0:
        decided[0] = spend_failure_budget(storage, launch_id=job.launch_id, world_size=world_size,
                                       max_failures=launcher.max_failures, window_s=launcher.failure_window_s,
                                       silent_restarts_failed=launcher.kind != "ray")  # fmt: skip
    dist.broadcast_object_list(decided, src=0)
    start_kind, stop = decided[0]
    if stop is not None:  # ends the launch without another restart, with the budget's message
        if rank == 0:
            logger.error("%s", stop)
            stopped = {FATAL_KEY: stop, "world_size": world_size}
            storage.write_json(stopped, FOLDER, result_name(job.launch_id))
        return {FATAL_KEY: stop}
    hooks = OrchestrationHooks(storage, job, rank=rank, world_size=world_size, start_kind=start_kind)
    try:
        result = dict(resolve_entry(job.entry)(cfg, hooks) or {})
    except Exception as exc:
        from defocus_scale.train.cli import worth_a_restart

        cause, retry = f"{type(exc).__name__}: {exc}", worth_a_restart(exc)
        # The restart record and the failure budget's message name it. A non-retryable error is raised
        # alike on every rank (the trainer decides on all-reduced figures): rank 0 notes it.
        if retry or rank == 0:
            try:
                write_failure_note(storage, FailureNote(time.time(), cause[:2000], "trainer", rank=rank))
            except Exception:  # noqa: BLE001 -- the note must never replace the error itself
                logger.warning("could not record the failure in %s", storage.root, exc_info=True)
        if retry:
            raise
        # A failure a restart would only replay (a non-finite streak, a missing input, a bad config): end
        # this launch without a retry.
        result = {FATAL_KEY: cause}
    finally:
        hooks.close()  # the last progress record is written (a few seconds at most)
    if rank == 0:
        result["world_size"] = world_size
        storage.write_json(result, FOLDER, result_name(job.launch_id))
    return result


def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    run_worker(config["job"])


def torchrun_main(job_file: str) -> int:
    """The torchrun launcher's worker: the trainer's own process entry (signals, ordered shutdown; see
    ``defocus_scale.train.cli``) around :func:`run_worker`. Returns the exit status."""
    from rich.console import Console

    from defocus_scale.train.cli import run_guarded
    from defocus_scale.train.config import collective_timeout_s

    with open(job_file, "rb") as handle:
        job: WorkerJob = pickle.load(handle)
    launcher = job.orchestration.launcher
    on_gpu = torch.cuda.is_available() and launcher.gpus_per_worker > 0
    backend = launcher.backend or ("nccl" if on_gpu else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=collective_timeout_s(job.trainer_cfg))
    dist.init_process_group(backend, timeout=timeout)
    return run_guarded(lambda: run_worker(job), Console(stderr=True))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m defocus_scale.orchestration.worker JOB_FILE")
    from defocus_scale.train.cli import exit_now

    exit_now(torchrun_main(sys.argv[1]))
