"""Typed schema of ``configs/train.yaml`` and its groups (model/, data/, optim/, schedule/, trainer/).

Hydra composes the YAML; :func:`to_train_config` merges it onto these dataclasses with OmegaConf, so an
unknown key or a wrongly typed value is an error that names the key. The values live in the YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from defocus_scale.data.config import DataConfig
from defocus_scale.orchestration.config import BATCH_ROUNDING, BatchPlan, plan_batch

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# Top-level keys of configs/train.yaml that belong to the launcher (defocus_scale.orchestration), not to
# the trainer: the trainer's schema leaves them out.
ORCHESTRATION_KEYS = ("launcher", "cluster", "faults", "storage_path", "run_name")


@dataclass
class ModelConfig:
    name: str = MISSING  # a registered variant (defocus_scale.models.list_models())
    overrides: dict[str, Any] = field(default_factory=dict)  # keyword arguments of create_model


@dataclass
class OptimConfig:
    """AdamW with the published parameter groups; ``lr`` is per ``lr_reference_batch`` images."""

    lr: float = MISSING
    lr_reference_batch: int = 512  # lr actually used = lr * global_batch / lr_reference_batch
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 10.0  # max global grad norm; 0 disables clipping (the norm is still logged)


@dataclass
class DropPathScheduleConfig:
    start: float = 0.1
    end: float = 0.75
    kind: str = "linear"  # linear (grows per step) | constant


@dataclass
class ScheduleConfig:
    """Warm-up then cosine for the lr (absolute ``warmup_lr`` and ``final_lr``, as in the recipe), and the
    drop-path rate of the last block per step."""

    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    final_lr: float = 5e-6
    drop_path: DropPathScheduleConfig = field(default_factory=DropPathScheduleConfig)


@dataclass
class SyntheticDataConfig:
    """Write synthetic shards to ``data.source`` (and ``data.eval_source``) first if they are missing."""

    train_samples: int = 2048
    eval_samples: int = 256
    samples_per_shard: int = 256


@dataclass
class TrainerConfig:
    run_dir: str = MISSING  # local path or fsspec URL; checkpoints and metrics go under it
    max_steps: int = MISSING  # optimizer steps; the lr and drop-path schedules span them
    stop_at_step: int | None = None  # end this process early (after a checkpoint), e.g. a job's time slot
    seed: int = 0
    # Batch: global = data.batch_size x world size x grad_accum_steps. With global_batch set, the micro-batch
    # (data.batch_size) and grad_accum_steps are derived from it for the current world size.
    global_batch: int | None = None
    max_micro_batch: int | None = None
    # When global_batch does not split over the ranks (an elastic group at 48 of 64 workers): "nearest"
    # takes the nearest multiple of the world size, the lr following by the linear scaling rule; "exact"
    # refuses the world size (the driver checks every size a launch may come up with).
    global_batch_rounding: str = "nearest"
    grad_accum_steps: int = 1
    # With accumulation, FSDP reduce-scatters each micro-batch's gradients into the sharded ones (memory:
    # one shard). True keeps full unsharded gradients until the step's last micro-batch instead (fewer
    # collectives, but a whole fp32 gradient per rank: 4 GB for a 1b model).
    defer_gradient_sync: bool = False
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    # HSDP: replicate across this many groups of consecutive ranks (e.g. nodes), shard within each; 1: FSDP
    # over all ranks. The world size must be a multiple.
    dp_replicate: int = 1
    # Free a unit's gathered parameters after its forward: default (all blocks but the last, not the
    # heads: torchtitan's choice) | always | never (fewer all-gathers, the memory of the full weights).
    reshard_after_forward: str = "default"
    threads: int | None = None  # torch intra-op threads per rank (None: leave torch's default)
    ema_decay: float = 0.9999  # 0 disables the EMA
    eval_every: int = 0  # steps; 0: only at the end
    max_eval_batches: int | None = None  # per rank; None: the whole validation set
    checkpoint_every: int = 1000  # steps, and always at the last step; 0: never (smoke runs, benchmarks)
    keep_last: int = 3
    async_save: bool = True
    resume: bool = True  # pick up the newest complete checkpoint in run_dir
    log_every: int = 10  # console lines; the Parquet table and TensorBoard get every step
    tensorboard: bool = True
    progress: bool = True  # rich console progress on rank 0
    peak_flops: float | None = None  # per device, for MFU; None: a table of known devices (see metrics)
    init_from: str | None = None  # an exported .safetensors to start from (fine-tuning); ignored on resume
    # Keep the key of every consumed sample in the checkpoints (trainer_state.json "consumed_keys"): an
    # exactly-once audit for tests and fault drills; the list grows with the run, so keep it off otherwise.
    audit_samples: bool = False
    # Non-finite safety: a step whose loss or gradient norm is NaN/inf is skipped (no optimizer step, no EMA
    # update); this many in a row stop the run with a message naming the steps and samples (0: never stop).
    max_nonfinite_steps: int = 3
    skip_steps: list[int] = field(default_factory=list)  # steps (1-based) whose batches are drawn and dropped
    inject_nonfinite_at: list[int] = field(default_factory=list)  # fault drill: NaN loss at these steps
    # A collective that waits longer than this fails its rank (a dead or hung peer) instead of stalling the
    # job; the slowest first step (compile), checkpoint load and eval must fit in it. torch's NCCL default.
    collective_timeout_s: float = 600.0
    # After the first step (compile and checkpoint load are behind), collectives get this shorter timeout
    # (torchtitan's pattern): a dead peer is noticed in minutes. It must still cover a synchronous
    # checkpoint save and an eval pass. null: keep collective_timeout_s.
    step_collective_timeout_s: float | None = 300.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    synthetic_data: SyntheticDataConfig | None = None


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def to_train_config(cfg: DictConfig | dict[str, Any]) -> TrainConfig:
    """Merge a composed config (or a plain dict, e.g. from the launcher) onto the typed schema."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"config key {key!r}: {exc.msg if hasattr(exc, 'msg') else exc}") from exc
    except (TypeError, ValueError) as exc:  # raised by a dataclass's own __post_init__ checks
        raise ConfigError(f"config: {exc}") from exc
    _check(result)
    return result  # type: ignore[return-value]


def _check(cfg: TrainConfig) -> None:
    trainer = cfg.trainer
    for key, value, least in [
        ("trainer.max_steps", trainer.max_steps, 1),
        ("trainer.grad_accum_steps", trainer.grad_accum_steps, 1),
        ("trainer.checkpoint_every", trainer.checkpoint_every, 0),
        ("trainer.keep_last", trainer.keep_last, 1),
        ("trainer.log_every", trainer.log_every, 1),
        ("trainer.dp_replicate", trainer.dp_replicate, 1),
        ("trainer.max_nonfinite_steps", trainer.max_nonfinite_steps, 0),
        ("optim.lr_reference_batch", cfg.optim.lr_reference_batch, 1),
    ]:  # fmt: skip
        if value < least:
            raise ConfigError(f"config key {key!r} must be >= {least}, got {value}")
    if trainer.reshard_after_forward not in ("default", "always", "never"):
        raise ConfigError("config key 'trainer.reshard_after_forward' must be default, always or never, got "
                          f"{trainer.reshard_after_forward!r}")  # fmt: skip
    if trainer.global_batch_rounding not in BATCH_ROUNDING:
        raise ConfigError(f"config key 'trainer.global_batch_rounding' must be one of {BATCH_ROUNDING}, "
                          f"got {trainer.global_batch_rounding!r}")  # fmt: skip
    if not 0.0 <= trainer.ema_decay < 1.0:
        raise ConfigError(f"config key 'trainer.ema_decay' must be in [0, 1), got {trainer.ema_decay}")
    if cfg.schedule.warmup_steps < 0:
        raise ConfigError(f"config key 'schedule.warmup_steps' must be >= 0, got {cfg.schedule.warmup_steps}")


def compose_train_config(overrides: list[str] | None = None, config_dir: Path | None = None) -> DictConfig:
    """``configs/train.yaml`` with Hydra's defaults list and ``key=value`` / ``group=option`` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(config_dir or CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides or []))
    except HydraException as exc:
        raise ConfigError(str(exc)) from exc


def split_orchestration(cfg: DictConfig | dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the launcher's part, the trainer's part) of a composed config, as plain containers; interpolations
    stay unresolved."""
    container = dict(OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg)
    launcher_part = {key: container.pop(key) for key in ORCHESTRATION_KEYS if key in container}
    return launcher_part, container


def load_train_config(overrides: list[str] | None = None, config_dir: Path | None = None) -> TrainConfig:
    return to_train_config(split_orchestration(compose_train_config(overrides, config_dir))[1])


def resolve_batch(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Micro-batch and accumulation for this world size. A fixed ``trainer.global_batch`` wins (so resuming
    on another world size keeps the optimisation the same); otherwise the configured values stand."""
    if cfg.trainer.global_batch is None:
        micro, accumulation = cfg.data.batch_size, cfg.trainer.grad_accum_steps
        return BatchPlan(micro * world_size * accumulation, world_size, micro, accumulation)
    try:
        trainer = cfg.trainer
        rounding = trainer.global_batch_rounding
        return plan_batch(trainer.global_batch, world_size, trainer.max_micro_batch, rounding)
    except ValueError as exc:
        raise ConfigError(f"config key 'trainer.global_batch': {exc}") from exc


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able containers (stored in every checkpoint)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def collective_timeout_s(trainer_cfg: dict) -> float:
    """``trainer.collective_timeout_s`` of an unresolved trainer config (a launcher's, before the workers
    resolve theirs), or its default."""
    default = next(f.default for f in dataclasses.fields(TrainerConfig) if f.name == "collective_timeout_s")
    value = (trainer_cfg.get("trainer") or {}).get("collective_timeout_s", default)
    return float(default if value is None else value)
