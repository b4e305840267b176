"""``defocus-scale train [group=option ...] [key=value ...]``: the trainer launched through Ray (default) or
torchrun, with fault recovery, from one Hydra config (``configs/train.yaml``).

The composed config splits in two: ``launcher``/``cluster``/``faults`` (and optionally ``storage_path`` and
``run_name``) for the orchestration, everything else for the trainer, which is checked here before any
worker starts so that a config error names its key at once. The run directory is ``trainer.run_dir``
unless ``storage_path`` and ``run_name`` are given. Under torchrun (``torchrun -m defocus_scale.train``) the
trainer runs plainly in each process instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from .config import OrchestrationConfig
from .launch import LaunchResult, launch
from .trainer_adapter import absolute_paths, check_batch_plans

logger = logging.getLogger(__name__)


@dataclass
class PreparedLaunch:
    orchestration: OrchestrationConfig
    trainer_cfg: dict[str, Any]  # unresolved: interpolations follow the run directory the launcher sets


def prepare_launch(overrides: list[str]) -> PreparedLaunch:
    """Compose ``configs/train.yaml`` with ``overrides`` and split it; raises the trainer's ``ConfigError``
    (naming the key) for a bad trainer config and ``ValueError`` for a bad launcher/cluster/faults one."""
    from defocus_scale.train.config import compose_train_config, split_orchestration, to_train_config
    from defocus_scale.train.preflight import check_run_inputs

    launcher_part, trainer_part = split_orchestration(compose_train_config(overrides))
    for key, path in absolute_paths(trainer_part, os.getcwd()).items():
        logger.info("%s resolved to %s", key, path)
    checked = to_train_config(trainer_part)  # resolves a copy; the workers resolve their own
    check_run_inputs(checked)  # before any worker: a missing input is not retried as a worker failure
    run_dir = checked.trainer.run_dir.rstrip("/")
    if "storage_path" not in launcher_part and "run_name" not in launcher_part:
        storage_path, run_name = posixpath.split(run_dir)
        launcher_part.update(storage_path=storage_path or ".", run_name=run_name)
    storage_path = str(launcher_part.get("storage_path", "runs"))
    if "://" not in storage_path:  # Ray's workers do not share the launcher's working directory
        launcher_part["storage_path"] = os.path.abspath(storage_path)
    launcher_part = OmegaConf.to_container(OmegaConf.create(launcher_part), resolve=True)
    orchestration = OrchestrationConfig.from_mapping(launcher_part)
    launcher = orchestration.launcher
    elastic = launcher.elastic
    sizes = range(launcher.min_workers, launcher.max_workers + 1) if elastic else [launcher.num_workers]
    resolved = OmegaConf.to_container(OmegaConf.structured(checked), resolve=True)
    for plan in check_batch_plans(resolved, sizes):  # every size the group may come up with has a plan
        if plan.rounded:
            logger.warning(
                "at %d workers the global batch is %d, not %d (nearest multiple; lr rescaled with it)",
                plan.world_size, plan.global_batch, plan.requested,
            )  # fmt: skip
    return PreparedLaunch(orchestration, trainer_part)


def print_launch_summary(result: LaunchResult, console: Console) -> None:
    console.print_json(json.dumps(result.summary, default=str))
    if result.restarts:
        table = Table(title=f"Restarts ({result.run_dir}/orchestration/restarts.parquet)")
        for column in ("#", "cause", "last step", "resumed from", "steps lost", "recovery s", "workers"):
            table.add_column(column, justify="left" if column == "cause" else "right")
        for r in result.restarts:
            table.add_row(str(r.restart), r.cause[:80], str(r.last_step), str(r.resumed_from_step),
                          str(r.steps_lost), f"{r.recovery_s:.1f}",
                          f"{r.world_size_before} -> {r.world_size_after}")  # fmt: skip
        console.print(table)
    console.print(f"{result.launcher}: {result.wall_s:.1f} s wall, {len(result.restarts)} restart(s); run in "
                  f"{result.run_dir}")  # fmt: skip


def run_train(overrides: list[str]) -> LaunchResult:
    """Launch training as configured; returns the launch result (rank 0's summary and the restarts)."""
    prepared = prepare_launch(overrides)
    return launch(prepared.orchestration, prepared.trainer_cfg)


def _train(args: argparse.Namespace) -> int:
    from defocus_scale.train.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    try:
        prepared = prepare_launch(args.overrides)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]config error:[/] {exc}")
        return 2
    try:
        result = launch(prepared.orchestration, prepared.trainer_cfg)
    except RuntimeError as exc:
        console.print(f"[red]training failed:[/] {exc}")
        return 1
    print_launch_summary(result, Console())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (FSDP2) through Ray or torchrun, with fault recovery",
        description="Compose configs/train.yaml with Hydra overrides (group=option, key=value) "
        "and launch it: "
        "launcher=ray (default; cluster=local starts a private Ray, cluster=auto or "
        "cluster.address=ray://host:port joins one) or launcher=torchrun. "
        "e.g. defocus-scale train model=defocus_mamba_small launcher.num_workers=2 trainer.max_steps=100",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="e.g. model=defocus_mamba_small")
    parser.set_defaults(func=_train)
