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
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .config import OrchestrationConfig
from .faults import FaultInjector
from .recovery import FOLDER, FailureNote, RecoveryTracker, write_failure_note
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


FATAL_KEY = "fatal_error"  # in a launch's result: the trainer stopped on a non-retryable error


def result_name(launch_id: str) -> str:
    return f"result-{launch_id}.json"


class OrchestrationHooks:
    """The trainer's hooks: guard the loss, record progress and restarts, then inject planned faults."""

    def __init__(self, storage: RunStorage, job: WorkerJob, *, rank: int, world_size: int) -> None:
        self.storage, self.rank = storage, rank
        self.tracker = RecoveryTracker(storage, rank=rank, world_size=world_size, launch_id=job.launch_id)
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
    rank, world_size = dist.get_rank(), dist.get_world_size()
    storage = RunStorage(job.orchestration.run_dir)
    run_dir = job.orchestration.run_dir
    cfg, plan = prepare_trainer_config(job.trainer_cfg, run_dir=run_dir, world_size=world_size)
    if plan is not None and rank == 0:
        logger.info("global batch %d = %d workers x %d micro-batch x %d accumulation steps",
                    plan.global_batch, world_size, plan.micro_batch, plan.accumulation)
    hooks = OrchestrationHooks(storage, job, rank=rank, world_size=world_size)
    try:
        result = dict(resolve_entry(job.entry)(cfg, hooks) or {})
    except Exception as exc:
        from defocus_scale.train.cli import worth_a_restart

        if worth_a_restart(exc):
            raise
        # A failure a restart would only replay (a non-finite streak, a missing input, a bad config): end
        # this launch without a retry.
        # Every rank raises it (the trainer decides on all-reduced figures); rank 0 records why.
        note = FailureNote(time.time(), str(exc)[:2000], "trainer", rank=rank)
        write_failure_note(storage, note)
        result = {FATAL_KEY: f"{type(exc).__name__}: {exc}"}
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
