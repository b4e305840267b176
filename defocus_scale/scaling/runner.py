"""Run a scaling-law sweep: every planned trial is one training job of the real trainer, launched through
the orchestration (Ray Train, or torchrun) with one worker, several at once, each in its own run directory.

The sweep's folders:

* ``out_dir``: ``trials.parquet`` (one :class:`TrialRecord` per trial), and the fit and plots;
* ``runs_dir`` (default ``out_dir/runs``): one run directory per trial (``<trial_id>/``: metrics,
  checkpoints, ``sweep_trial.json``) and the synthetic shards all trials share.

Resuming: trials whose record says ``finished`` are skipped; the others (failed, never started, or cut off)
run again, picking up their newest checkpoint if they left one. A trial that raises is recorded as
``failed`` with its error, one whose losses are not finite as ``diverged``, and the sweep goes on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from defocus_scale.orchestration.config import OrchestrationConfig
from defocus_scale.orchestration.launch import launch, ray_session
from defocus_scale.scaling.records import TrialRecord, append_record, finished_trial_ids
from defocus_scale.scaling.sweep_plan import SweepConfig, TrialSpec, plan_trials
from defocus_scale.train.config import ConfigError, compose_train_config, split_orchestration, to_train_config

log = logging.getLogger(__name__)

TABLE_NAME = "trials.parquet"
TRIAL_FILE = "sweep_trial.json"
# Trainer keys each trial's plan decides; a sweep's ``train`` section setting one would be overruled.
SWEEP_OWNED_KEYS = (
    "model", "optim.lr", "optim.lr_reference_batch", "trainer.max_steps", "trainer.global_batch",
    "trainer.seed", "trainer.run_dir", "schedule.warmup_steps",
)  # fmt: skip
ERROR_CHARS = 2000  # the end of a long error is kept: a worker's traceback ends with the cause


class SweepConfigError(ValueError):
    """A sweep whose trials cannot be configured (the message names the key or the path)."""


@dataclass(frozen=True)
class SweepLayout:
    out_dir: Path
    runs_dir: Path

    @classmethod
    def at(cls, out_dir: str | Path, runs_dir: str | Path | None = None) -> SweepLayout:
        out = Path(out_dir).resolve()
        return cls(out, Path(runs_dir).resolve() if runs_dir is not None else out / "runs")

    @property
    def table(self) -> Path:
        return self.out_dir / TABLE_NAME

    def run_dir(self, trial_id: str) -> Path:
        return self.runs_dir / trial_id


@dataclass(frozen=True)
class PreparedTrial:
    spec: TrialSpec
    trainer_cfg: dict[str, Any]  # the complete, resolved trainer config of the trial
    orchestration: OrchestrationConfig


@dataclass(frozen=True)
class SyntheticSet:
    """Synthetic shards a sweep's trials share, written once before any trial starts."""

    out_dir: str
    samples: int
    classes: int
    image_size: int
    samples_per_shard: int
    seed: int


@dataclass
class SweepOutcome:
    planned: list[TrialSpec]
    skipped: list[str]  # finished before this invocation
    records: list[TrialRecord]  # of the trials run now, in completion order


# -- configuring trials ----------------------------------------------------------------------------


def _has_key(mapping: dict[str, Any], dotted: str) -> bool:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def trial_overrides(spec: TrialSpec) -> dict[str, Any]:
    """The trainer settings a trial's plan decides: its model, lr (as used: the reference batch is the
    trial's batch), steps, warm-up, batch and seed."""
    return {
        "model": {"name": spec.model, "overrides": dict(spec.model_kwargs)},
        "optim": {"lr": spec.lr, "lr_reference_batch": spec.batch_size},
        "schedule": {"warmup_steps": spec.warmup_steps},
        "trainer": {"max_steps": spec.steps, "global_batch": spec.batch_size, "seed": spec.seed},
    }


def _absolute_source(source: str | None, key: str, sweep: str) -> str | None:
    """A local shard source relative to the working directory made absolute (trial workers may run
    elsewhere); it must exist. URLs and brace patterns pass as they are."""
    if source is None or "://" in source or "{" in source:
        return source
    path = Path(source).resolve()
    if not path.exists():
        raise SweepConfigError(f"sweep {sweep}: {key} {source} does not exist (make the shards first)")
    return str(path)


def compose_trial_config(
    spec: TrialSpec, run_dir: Path, base: dict[str, Any], synthetic_root: Path
) -> tuple[dict[str, Any], list[SyntheticSet]]:
    """The trial's complete trainer config: ``base`` (configs/train.yaml with the sweep's data option),
    the sweep's ``train`` settings, then the trial's own; checked against the trainer's schema. Synthetic
    data moves to ``synthetic_root`` so that all trials read the same shards, written once."""
    for key in SWEEP_OWNED_KEYS:
        if _has_key(spec.train, key):
            raise SweepConfigError(
                f"sweep {spec.sweep}: train.{key} is set per trial by the sweep; remove it"
            )
    # The model section is the trial's alone (a merge would keep another model's overrides).
    base = {key: value for key, value in base.items() if key != "model"}
    try:
        merged = OmegaConf.merge(
            base, spec.train, trial_overrides(spec), {"trainer": {"run_dir": str(run_dir)}}
        )
        typed = to_train_config(merged)
    except (ConfigError, OmegaConfBaseException) as exc:
        raise SweepConfigError(f"sweep {spec.sweep}: trainer settings (train: ...): {exc}") from exc
    for model_key, data_key in (("img_size", "image_size"), ("num_classes", "num_classes")):
        wanted, given = spec.model_kwargs.get(model_key), getattr(typed.data, data_key)
        if wanted is not None and wanted != given:
            raise SweepConfigError(
                f"sweep {spec.sweep}: model_overrides.{model_key}={wanted} but the data has "
                f"{data_key}={given}; set train.data.{data_key} to match"
            )
    cfg: dict[str, Any] = OmegaConf.to_container(merged, resolve=True)  # type: ignore[assignment]
    synthetic: list[SyntheticSet] = []
    if typed.synthetic_data is not None:
        spec_data = typed.synthetic_data
        folder = synthetic_root / (
            f"synthetic-{typed.data.image_size}px-{typed.data.num_classes}c-"
            f"{spec_data.train_samples}+{spec_data.eval_samples}"
        )
        cfg["data"]["source"] = str(folder / "train")
        cfg["data"]["eval_source"] = str(folder / "val")
        cfg["synthetic_data"] = None
        splits = (("train", spec_data.train_samples, 0), ("val", spec_data.eval_samples, 1))
        synthetic = [
            SyntheticSet(str(folder / split), samples, typed.data.num_classes, typed.data.image_size,
                         spec_data.samples_per_shard, seed)
            for split, samples, seed in splits
        ]  # fmt: skip
    else:
        cfg["data"]["source"] = _absolute_source(cfg["data"]["source"], "data.source", spec.sweep)
        cfg["data"]["eval_source"] = _absolute_source(
            cfg["data"]["eval_source"], "data.eval_source", spec.sweep
        )
    return cfg, synthetic


def orchestration_for(
    cfg: SweepConfig, layout: SweepLayout, trial_id: str, launcher: str
) -> OrchestrationConfig:
    """The sweep's launcher settings with one worker, this trial's run directory and ``launcher`` kind."""
    mapping = copy.deepcopy(cfg.orchestration)
    unknown = sorted(set(mapping) - {"launcher", "cluster", "faults"})
    if unknown:
        raise SweepConfigError(f"sweep {cfg.name}: orchestration has unknown section(s) {unknown}")
    one_worker = {"kind": launcher, "num_workers": 1, "min_workers": None, "max_workers": None}
    mapping["launcher"] = {**mapping.get("launcher", {}), **one_worker}
    mapping.update(storage_path=str(layout.runs_dir), run_name=trial_id)
    try:
        return OrchestrationConfig.from_mapping(mapping)
    except (TypeError, ValueError) as exc:
        raise SweepConfigError(f"sweep {cfg.name}: orchestration: {exc}") from exc


def prepare_trials(
    cfg: SweepConfig, trials: Iterable[TrialSpec], layout: SweepLayout, launcher: str = "ray"
) -> tuple[list[PreparedTrial], list[SyntheticSet]]:
    """Configure every trial before any runs, so a bad setting fails the sweep at once, naming the key."""
    try:
        base = split_orchestration(compose_train_config([f"data={cfg.data}"]))[1]
    except ConfigError as exc:
        raise SweepConfigError(f"sweep {cfg.name}: data={cfg.data!r}: {exc}") from exc
    prepared, synthetic_sets = [], {}
    for spec in trials:
        trainer_cfg, synthetic = compose_trial_config(
            spec, layout.run_dir(spec.trial_id), base, layout.runs_dir
        )
        synthetic_sets.update({s.out_dir: s for s in synthetic})
        prepared.append(
            PreparedTrial(spec, trainer_cfg, orchestration_for(cfg, layout, spec.trial_id, launcher))
        )
    return prepared, list(synthetic_sets.values())


def write_synthetic_sets(sets: Iterable[SyntheticSet]) -> None:
    """Write the shared synthetic shards that are not there yet (``manifest.parquet`` is written last, so
    its presence means complete)."""
    from defocus_scale.data.make_shards import make_shards

    for s in sets:
        if not (Path(s.out_dir) / "manifest.parquet").exists():
            make_shards(
                "synthetic", s.out_dir, synthetic_samples=s.samples, synthetic_classes=s.classes,
                synthetic_image_size=s.image_size, samples_per_shard=s.samples_per_shard, seed=s.seed,
                progress=False,
            )  # fmt: skip


# -- running trials --------------------------------------------------------------------------------

# The workers' entry: a trial's config is complete and checked, so it is trained as it is rather than
# merged onto configs/train.yaml again (a merge would mix the default model's overrides into the trial's).
TRIAL_ENTRY = "defocus_scale.scaling.runner:train_trial"


def train_trial(cfg: dict[str, Any], hooks: Any = None) -> dict[str, Any]:
    """Run the trainer on a complete trial config, inside the launcher's process group."""
    from defocus_scale.train import train

    return train(to_train_config(cfg), hooks=hooks)


def error_cause(error: str) -> str:
    """The last non-empty line of an error (where a worker's traceback names the actual cause)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _metric(summary: dict[str, Any], key: str) -> float:
    value = summary.get(key)
    return float(value) if isinstance(value, int | float) else math.nan


def trial_record(
    spec: TrialSpec, summary: dict[str, Any] | None, wall_time_s: float, error: str = ""
) -> TrialRecord:
    """A trial's record from the trainer's summary (rank 0's dict), or a failed one with ``error``.

    ``train_loss`` is the trainer's ``loss_last`` (mean of the last steps' training objective, Mixup
    and aux head included); ``val_*`` are the final evaluation of the live weights; the trainer does
    not measure training accuracy, so ``train_acc`` is NaN."""
    summary = summary or {}
    steps = int(summary.get("final_step", 0))
    batch = int(summary.get("global_batch", spec.batch_size))
    images = steps * batch
    if not error and not summary:
        error = "the trainer returned no summary"
    elif not error and steps != spec.steps:
        error = f"the trainer stopped at step {steps} of {spec.steps}"
    train_loss, val_loss = _metric(summary, "loss_last"), _metric(summary, "eval/loss")
    if error:
        status = "failed"
    elif not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        status = "diverged"
    else:
        status = "finished"
    return TrialRecord(
        trial_id=spec.trial_id, sweep=spec.sweep, family=spec.family, model=spec.model, width=spec.width,
        depth=spec.depth, params=spec.params, flops_per_image=spec.flops_per_image, images_seen=images,
        tokens_seen=images * spec.tokens_per_image, compute=3.0 * spec.flops_per_image * images, lr=spec.lr,
        train_loss=train_loss, train_acc=math.nan, val_loss=val_loss, val_acc=_metric(summary, "eval/top1"),
        wall_time_s=wall_time_s, status=status, error=error[-ERROR_CHARS:],
    )  # fmt: skip


def run_trial(trial: PreparedTrial) -> TrialRecord:
    """Train one trial through the launcher; any error becomes a failed record instead of propagating."""
    run_dir = Path(trial.orchestration.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TRIAL_FILE).write_text(
        json.dumps({"spec": asdict(trial.spec), "trainer_config": trial.trainer_cfg}, indent=2, default=str)
    )
    start = time.perf_counter()
    try:
        result = launch(trial.orchestration, trial.trainer_cfg, entry=TRIAL_ENTRY)
    except Exception as exc:  # a trial's failure is data for the sweep, not the end of it
        log.warning("trial %s failed: %s", trial.spec.trial_id, error_cause(str(exc)))
        return trial_record(trial.spec, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return trial_record(trial.spec, result.summary, result.wall_s)


def default_concurrency(launcher: str, cpus_per_worker: float) -> int:
    """Trials that fit at once: the Ray cluster's CPUs (or this machine's) over each worker's CPUs."""
    cpus: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if launcher == "ray":
        import ray

        if ray.is_initialized():
            cpus = ray.cluster_resources().get("CPU", cpus)
    return max(1, int(cpus // max(cpus_per_worker, 1e-9)))


def run_sweep(
    cfg: SweepConfig,
    layout: SweepLayout,
    *,
    concurrent: int | None = None,
    launcher: str = "ray",
    on_record: Callable[[TrialRecord], None] | None = None,
) -> SweepOutcome:
    """Plan ``cfg``, skip the trials finished in ``layout.table``, run the others ``concurrent`` at a time
    (default: as many as the CPUs hold) and append each one's record as it completes."""
    trials = plan_trials(cfg)
    done = finished_trial_ids(layout.table)
    # Biggest first (compute, then images: small models are bound by the input pipeline), so that the
    # longest trials do not start last and leave the other slots idle.
    pending = sorted((t for t in trials if t.trial_id not in done), key=lambda t: (-t.compute, -t.images))
    skipped = [t.trial_id for t in trials if t.trial_id in done]
    outcome = SweepOutcome(trials, skipped, [])
    if not pending:
        return outcome
    prepared, synthetic_sets = prepare_trials(cfg, pending, layout, launcher)
    write_synthetic_sets(synthetic_sets)
    cluster = prepared[0].orchestration.cluster
    cpus_per_worker = prepared[0].orchestration.launcher.cpus_per_worker
    lock = threading.Lock()

    def finish(record: TrialRecord) -> None:
        with lock:
            append_record(layout.table, record)
            outcome.records.append(record)
            if on_record is not None:
                on_record(record)

    def run_all() -> None:
        workers = concurrent or default_concurrency(launcher, cpus_per_worker)
        workers = max(1, min(workers, len(prepared)))
        log.info("sweep %s: %d trials to run, %d at a time", cfg.name, len(prepared), workers)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trial")
        try:
            futures = [pool.submit(run_trial, trial) for trial in prepared]
            for future in as_completed(futures):
                finish(future.result())
        finally:
            # On Ctrl-C, queued trials never start and the running ones end with the Ray session; their
            # records stay unwritten, so the next invocation runs them (resuming from their checkpoints).
            pool.shutdown(wait=False, cancel_futures=True)

    if launcher == "ray":
        with ray_session(cluster):  # one Ray instance for every trial; the launches reuse it
            run_all()
    else:
        run_all()
    return outcome
