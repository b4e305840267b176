"""Typed configuration of launching, the cluster and fault drills (Hydra groups launcher/, cluster/, faults/).

Also the batch plan that keeps the global batch fixed when a job resumes with another worker count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

LAUNCHERS = ("ray", "torchrun")


@dataclass
class LauncherConfig:
    """How the trainer's processes are started and restarted."""

    kind: str = "ray"  # ray: Ray Train TorchTrainer; torchrun: torch.distributed.run
    num_workers: int = 2
    # Elastic worker group (Ray only): both set means ScalingConfig(num_workers=(min, max)).
    min_workers: int | None = None
    max_workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # The failure budget: at most max_failures restarts of the worker group within any failure_window_s
    # seconds (null: over the whole launch). Restarts after a node preemption (Ray reports them) are not
    # charged to it; max_preemptions caps them apart (-1: no cap).
    max_failures: int = 3
    failure_window_s: float | None = 3600.0
    max_preemptions: int = -1
    backend: str | None = None  # None: nccl with GPUs, else gloo
    # Seconds between Ray Train's worker health polls; lower detects a dead worker sooner.
    health_check_interval_s: float = 2.0
    # Elastic groups: how often Ray considers growing (or shrinking) a healthy group to the workers the
    # cluster can give; each resize restarts the group from the newest checkpoint.
    elastic_resize_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ValueError(f"launcher.kind must be one of {', '.join(LAUNCHERS)}; got {self.kind!r}")
        if self.num_workers < 1:
            raise ValueError(f"launcher.num_workers must be >= 1; got {self.num_workers}")
        if (self.min_workers is None) != (self.max_workers is None):
            raise ValueError("launcher.min_workers and launcher.max_workers: set both or neither")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"launcher: need 1 <= min_workers <= max_workers; got {self.min_workers}, {self.max_workers}"
            )
        if self.min_workers is not None and self.kind != "ray":
            raise ValueError("launcher.min_workers/max_workers (elastic groups) need launcher.kind=ray")
        if self.max_failures < 0:
            raise ValueError(f"launcher.max_failures must be >= 0; got {self.max_failures}")
        if self.failure_window_s is not None and self.failure_window_s <= 0:
            raise ValueError(f"launcher.failure_window_s must be > 0 or null; got {self.failure_window_s}")
        if self.max_preemptions < -1:
            raise ValueError(f"launcher.max_preemptions must be >= -1; got {self.max_preemptions}")

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None


@dataclass
class ClusterConfig:
    """Where Ray runs: ``address`` None starts a private instance; ``auto``, ``ray://host:port`` join one."""

    address: str | None = None
    # Local instance only (ignored when joining a cluster):
    num_cpus: int | None = None  # None: Ray counts the machine's cores
    num_gpus: int | None = None
    object_store_memory: int | None = 128 * 2**20  # small: the trainer moves no data through Ray
    # Ray's state API lives in the dashboard: without it Ray Train's placement-group cleaner cannot tell
    # whether the run's controller lives (it warns every second and never cleans up after a dead driver).
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"  # the dashboard, when on, listens on loopback only

    def __post_init__(self) -> None:
        if self.address not in (None, "auto") and not str(self.address).startswith("ray://"):
            raise ValueError(
                f"cluster.address must be null, 'auto' or 'ray://host:port'; got {self.address!r}"
            )


@dataclass
class FaultConfig:
    """The fault injector for tests and drills; nothing happens unless ``enabled``."""

    enabled: bool = False
    kill_rank: int | None = None  # SIGKILL this rank's own process once, right after step ``kill_step``
    kill_step: int | None = None
    kill_probability: float = 0.0  # per rank and step: SIGKILL with this probability
    # Once training reaches this step, rank 0 damages the newest complete checkpoint (a drill for the
    # trainer's corrupt-checkpoint fallback); pair it with a kill so the damage is read back.
    corrupt_checkpoint_at_step: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.kill_rank is None) != (self.kill_step is None):
            raise ValueError("faults.kill_rank and faults.kill_step must be set together (or neither)")
        if not 0.0 <= self.kill_probability <= 1.0:
            raise ValueError(f"faults.kill_probability must lie in [0, 1]; got {self.kill_probability}")


@dataclass
class OrchestrationConfig:
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    storage_path: str = "runs"  # local directory or object-store URL shared by all workers
    run_name: str = "defocus"

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @classmethod
    def from_mapping(cls, mapping: Any) -> OrchestrationConfig:
        """From a Hydra/OmegaConf node or dict with keys launcher, cluster, faults, storage_path, run_name.

        Unknown keys are an error naming the key, so a misspelt override does not pass silently."""
        data = dict(mapping)
        groups = {"launcher": LauncherConfig, "cluster": ClusterConfig, "faults": FaultConfig}
        kwargs: dict[str, Any] = {}
        for name, kind in groups.items():
            section = dict(data.pop(name, None) or {})
            known = {f.name for f in fields(kind)}
            unknown = sorted(set(section) - known)
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}")
            kwargs[name] = kind(**section)
        known_top = {"storage_path", "run_name"}
        unknown_top = sorted(set(data) - known_top)
        if unknown_top:
            raise ValueError(f"unknown orchestration key(s) {', '.join(unknown_top)}")
        return cls(**kwargs, **data)


BATCH_ROUNDING = ("nearest", "exact")


@dataclass(frozen=True)
class BatchPlan:
    """Per-rank micro-batch and gradient-accumulation steps giving ``global_batch`` at ``world_size``;
    ``requested`` is the configured global batch (they differ when it does not split over the ranks)."""

    global_batch: int
    world_size: int
    micro_batch: int
    accumulation: int
    requested: int | None = None

    @property
    def rounded(self) -> bool:
        return self.requested is not None and self.requested != self.global_batch


def plan_batch(
    global_batch: int, world_size: int, max_micro_batch: int | None = None, rounding: str = "nearest"
) -> BatchPlan:
    """The fewest accumulation steps whose micro-batch fits ``max_micro_batch``, for ``world_size`` ranks.

    The rule when ``global_batch`` does not split evenly over the ranks (an elastic group that came up
    with 48 of 64 workers): with ``rounding="nearest"`` the global batch becomes the nearest multiple of
    the world size (``world_size * max(1, round(global_batch / world_size))``, halves rounding up), and
    the trainer's learning rate follows it by the linear scaling rule (``optim.lr`` is quoted per
    ``optim.lr_reference_batch`` images); the step count and schedules stay as configured. With
    ``rounding="exact"`` it is an error naming the worker counts that keep the batch."""
    if global_batch < 1 or world_size < 1:
        raise ValueError(f"global_batch and world_size must be >= 1; got {global_batch}, {world_size}")
    if rounding not in BATCH_ROUNDING:
        raise ValueError(f"batch rounding must be one of {', '.join(BATCH_ROUNDING)}; got {rounding!r}")
    if max_micro_batch is not None and max_micro_batch < 1:
        raise ValueError(f"max_micro_batch must be >= 1; got {max_micro_batch}")
    per_rank, remainder = divmod(global_batch, world_size)
    if remainder:
        if rounding == "exact":
            usable = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
            raise ValueError(
                f"global batch {global_batch} does not split over {world_size} workers; worker counts "
                f"that keep it: {usable[:12]} (or trainer.global_batch_rounding=nearest)"
            )
        per_rank = max(1, (2 * global_batch + world_size) // (2 * world_size))  # round half up
    limit = max_micro_batch or per_rank
    for accumulation in range(math.ceil(per_rank / limit), per_rank + 1):
        if per_rank % accumulation == 0:
            return BatchPlan(
                per_rank * world_size, world_size, per_rank // accumulation, accumulation, global_batch
            )
    raise AssertionError("unreachable: accumulation == per_rank always divides")


def plan_batches(
    global_batch: int, world_sizes: range | list[int], max_micro_batch: int | None = None,
    rounding: str = "nearest",
) -> list[BatchPlan]:
    """:func:`plan_batch` for every world size a launch may come up with (an elastic range): the driver
    checks them all before launching, so no group meets a batch it cannot plan."""
    return [plan_batch(global_batch, w, max_micro_batch, rounding) for w in world_sizes]
