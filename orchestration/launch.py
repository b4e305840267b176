"""Launch the trainer through Ray Train (default) or torchrun, restart it on failure, report restarts.

Ray only launches, watches and restarts: the training processes run the plain torch.distributed
trainer (see ``worker.py``), which resumes from the newest complete DCP checkpoint in the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import ClusterConfig, LauncherConfig, OrchestrationConfig
from .recovery import (
    FOLDER,
    PREEMPTION,
    FailureNote,
    RestartRecord,
    is_preemption,
    read_restart_records,
    write_failure_note,
)
from .storage import RunStorage
from .trainer_adapter import TRAINER_ENTRY
from .worker import FATAL_KEY, WorkerJob, process_namespace, ray_train_loop, result_name

logger = logging.getLogger(__name__)

# Ray prints one line per worker per event; keep that readable and quiet by default. Set when this module
# is imported, before anything imports ray.train: Ray Train reads RAY_TRAIN_V2_ENABLED at its own import.
_RAY_ENV_DEFAULTS = {"RAY_DEDUP_LOGS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1"}
for _key, _value in _RAY_ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


@dataclass
class LaunchResult:
    launcher: str
    run_dir: str
    launch_id: str
    wall_s: float  # launch to return, including start-up and every restart
    summary: dict[str, Any]  # what the trainer's rank 0 returned
    restarts: list[RestartRecord]


def entry_spec(entry: str | Callable | None) -> tuple[str, list[str]]:
    """``"module:function"`` for an entry given by name or as a module-level function, and the folder to
    put on ``sys.path`` when that module is not installed (a script or a test file)."""
    if entry is None:
        return TRAINER_ENTRY, []
    if isinstance(entry, str):
        return entry, []
    module = sys.modules[entry.__module__]
    if entry.__module__ == "__main__" or "." in entry.__qualname__:
        raise ValueError(f"the trainer entry must be a module-level function of a module file: {entry}")
    folder = os.path.dirname(os.path.abspath(module.__file__)) if getattr(module, "__file__", None) else None
    return f"{entry.__module__}:{entry.__name__}", [folder] if folder else []


@contextlib.contextmanager
def ray_session(cluster: ClusterConfig) -> Iterator[None]:
    """Join ``cluster.address``, or start a small private Ray instance; an existing connection is reused
    (and left running)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if cluster.address is not None:
        ray.init(address=cluster.address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
            object_store_memory=cluster.object_store_memory,
            include_dashboard=cluster.include_dashboard,
            dashboard_host=cluster.dashboard_host,
            log_to_driver=True,
        )
    try:
        if cluster.include_dashboard:
            _wait_for_dashboard()
        yield
    finally:
        ray.shutdown()


def _wait_for_dashboard(timeout_s: float = 60.0) -> None:
    """Until the new instance's dashboard has registered its address: Ray Train's placement-group cleaner
    starts with the run and, if the state API's address is not there yet, its monitor thread dies (a
    traceback on the console, and no clean-up after a dead driver)."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                        namespace=ray_constants.KV_NAMESPACE_DASHBOARD):  # fmt: skip
            return
        time.sleep(0.2)
    logger.warning("Ray's dashboard did not come up within %.0f s: no state API", timeout_s)


def _recovery_callback(run_dir: str):
    """A Ray Train callback (runs in the controller) noting each worker failure where workers find it."""
    from ray.train import UserCallback

    class RecoveryCallback(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
            storage = RunStorage(run_dir)
            for rank, error in sorted(worker_exceptions.items()):
                cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                source = PREEMPTION if is_preemption(error) else "ray-controller"
                note = FailureNote(time.time(), cause[:500], source, rank=rank)
                try:
                    write_failure_note(storage, note)
                except Exception:  # noqa: BLE001 -- a note must never mask the failure (full disk...)
                    logging.getLogger(__name__).warning("could not record %s in %s", cause, run_dir,
                                                        exc_info=True)  # fmt: skip

    return RecoveryCallback()


def _launch_ray(job: WorkerJob) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from defocus_scale.train.config import collective_timeout_s
    from defocus_scale.train.parallel import worker_env

    orch = job.orchestration
    launcher = orch.launcher
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(launcher.health_check_interval_s)
    resources = {"CPU": launcher.cpus_per_worker}
    if launcher.gpus_per_worker:
        resources["GPU"] = launcher.gpus_per_worker
    workers = (launcher.min_workers, launcher.max_workers) if launcher.elastic else launcher.num_workers
    storage_path = orch.storage_path if "://" in orch.storage_path else os.path.abspath(orch.storage_path)
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"job": job},
        torch_config=TorchConfig(
            backend=launcher.backend, timeout_s=int(collective_timeout_s(job.trainer_cfg))
        ),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=launcher.gpus_per_worker > 0, resources_per_worker=resources,
            elastic_resize_monitor_interval_s=launcher.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=orch.run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(
                max_failures=_ray_max_failures(launcher), max_preemption_failures=launcher.max_preemptions
            ),
            callbacks=[_recovery_callback(orch.run_dir)],
            # Set before Ray Train's worker imports torch and builds the (NCCL) group: a timed-out
            # collective dumps its trace; OpenMP threads do not spin between regions.
            worker_runtime_env={"env_vars": worker_env(orch.run_dir)},
        ),
    )
    with ray_session(orch.cluster):
        try:
            result = trainer.fit()
        except Exception as exc:  # noqa: BLE001 -- Ray's TrainingFailedError family: one message, no traceback
            if not type(exc).__module__.startswith("ray."):
                raise
            raise RuntimeError(_ray_failure_message(exc, launcher.max_failures)) from None
    if result.error is not None:  # Ray Train v1 reports the failure here instead of raising
        raise RuntimeError(_ray_failure_message(result.error, launcher.max_failures))


def _ray_max_failures(launcher: LauncherConfig) -> int:
    """Ray's own budget is a count over the whole run. Under a time window the workers enforce the budget
    at every start (``recovery.spend_failure_budget``), so Ray is told to keep restarting (-1); with no
    window, or no restarts at all, Ray's count is the same rule and saves a start."""
    if launcher.failure_window_s is None or launcher.max_failures == 0:
        return launcher.max_failures
    return -1


def _ray_failure_message(exc: BaseException, max_failures: int) -> str:
    """The failure as the user needs it: the first failed worker's own error (its last line), or the
    controller's, rather than Ray's wrapper and its traceback."""
    causes: list[str] = []
    for rank, failure in sorted((getattr(exc, "worker_failures", None) or {}).items()):
        causes.append(f"worker {rank}: {_last_line(failure)}")
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        causes.append(f"Ray Train controller: {_last_line(controller)}")
    detail = "; ".join(causes[:3]) + (f" (and {len(causes) - 3} more)" if len(causes) > 3 else "")
    return (f"training failed (the worker group was restarted up to launcher.max_failures={max_failures} "
            f"times): {detail or _last_line(exc)}")  # fmt: skip


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:1000]


def _terminate_with_parent() -> None:
    """In the forked child before exec: ask Linux for SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _torchrun_max_restarts(launcher: LauncherConfig) -> int:
    """torchrun counts restarts over the whole run, like Ray; under a window the workers decide (a large
    count stands in for unlimited)."""
    return _ray_max_failures(launcher) if _ray_max_failures(launcher) >= 0 else 1_000_000


def _launch_torchrun(job: WorkerJob) -> None:
    launcher = job.orchestration.launcher
    with tempfile.TemporaryDirectory(prefix="defocus-launch-") as folder:
        job_file = os.path.join(folder, "job.pkl")
        with open(job_file, "wb") as handle:
            pickle.dump(job, handle)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={launcher.num_workers}", f"--max-restarts={_torchrun_max_restarts(launcher)}",
            "-m", "defocus_scale.orchestration.worker", job_file,
        ]  # fmt: skip
        from defocus_scale.train.parallel import worker_env

        env = {**worker_env(job.orchestration.run_dir), **os.environ}  # the user's settings win
        # torchrun's agent gets SIGTERM (and stops its workers) if this driver dies: no orphaned job.
        completed = subprocess.run(command, check=False, env=env, preexec_fn=_terminate_with_parent)
    if completed.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {completed.returncode}: {' '.join(command)}")


def launch(
    orchestration: OrchestrationConfig, trainer_cfg: dict[str, Any], entry: str | Callable | None = None
) -> LaunchResult:
    """Train with ``trainer_cfg`` under ``orchestration``; returns rank 0's summary and the restarts."""
    spec, extra_path = entry_spec(entry)
    driver = (process_namespace(), os.getpid())
    job = WorkerJob(spec, trainer_cfg, orchestration, uuid.uuid4().hex[:12], extra_path, driver)
    start = time.perf_counter()
    if orchestration.launcher.kind == "ray":
        _launch_ray(job)
    else:
        _launch_torchrun(job)
    wall = time.perf_counter() - start
    storage = RunStorage(orchestration.run_dir)
    summary = storage.read_json(FOLDER, result_name(job.launch_id), default={})
    if FATAL_KEY in summary:
        raise RuntimeError(f"training stopped (not retried): {summary[FATAL_KEY]}")
    restarts = [r for r in read_restart_records(orchestration.run_dir) if r.launch_id == job.launch_id]
    kind, run_dir = orchestration.launcher.kind, orchestration.run_dir
    return LaunchResult(kind, run_dir, job.launch_id, wall, summary, restarts)


def launch_from_hydra(cfg: Any, entry: str | Callable | None = None) -> LaunchResult:
    """Split a composed config into its orchestration part (launcher, cluster, faults, storage_path,
    run_name) and the trainer's part (everything else), then :func:`launch`."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    orchestration_keys = ("launcher", "cluster", "faults", "storage_path", "run_name")
    orchestration = OrchestrationConfig.from_mapping(
        {k: container.pop(k) for k in orchestration_keys if k in container}
    )
    return launch(orchestration, container, entry)
