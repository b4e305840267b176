"""The one seam between orchestration and the plain torch.distributed trainer.

Orchestration needs four things from the trainer, named here so that plugging the trainer in is a
one-line change (``TRAINER_ENTRY`` and, if its layout differs, ``CHECKPOINT_FOLDER`` / the config keys):

* an entry function ``entry(cfg: dict, hooks: TrainingHooks) -> dict`` that runs inside an already
  initialised process group (Ray Train and torchrun both set it up) and returns a JSON-able summary;
* calls to ``hooks.on_resume(step, checkpoint)`` once after loading (step 0, None on a fresh start) and
  ``hooks.on_step_end(step)`` on every rank after each optimizer step (queued, not awaited: the host
  does not wait for the device there);
* complete DCP checkpoints as folders ``<run_dir>/<CHECKPOINT_FOLDER>/<name ending in the step>``, holding
  ``COMPLETE_MARKER``, which the trainer writes only after every rank finished (and which lists every file
  with its size, so the trainer itself also catches a damaged one);
* config keys for the run directory and the batch (see ``*_KEY``), so the launcher can keep the global
  batch fixed at any worker count.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

from .config import BatchPlan, plan_batch
from .storage import RunStorage

# The trainer's entry point, "module:function".
TRAINER_ENTRY = "defocus_scale.train:train_in_process_group"
CHECKPOINT_FOLDER = "checkpoints"
COMPLETE_MARKER = "COMMITTED.json"  # defocus_scale.train.checkpoint.COMMIT_MARKER
# Dotted keys of the trainer config the launcher reads or sets.
RUN_DIR_KEY = "trainer.run_dir"
GLOBAL_BATCH_KEY = "trainer.global_batch"
MAX_MICRO_BATCH_KEY = "trainer.max_micro_batch"
BATCH_ROUNDING_KEY = "trainer.global_batch_rounding"
MICRO_BATCH_KEY = "data.batch_size"  # per rank, per forward pass (DataConfig.batch_size)
ACCUMULATION_KEY = "trainer.grad_accum_steps"
# Keys holding paths the workers open: a relative one would be resolved against each worker's own working
# directory (Ray's is a per-session folder), so the driver makes them absolute.
PATH_KEYS = ("data.source", "data.eval_source", "trainer.init_from", RUN_DIR_KEY)


class TrainingHooks(Protocol):
    def on_resume(self, step: int, checkpoint: str | None) -> None: ...

    def on_step_end(self, step: int) -> None: ...


TrainerEntry = Callable[[dict[str, Any], TrainingHooks], dict[str, Any]]


def resolve_entry(spec: str) -> TrainerEntry:
    """Import ``"module:function"``; a missing trainer is a clear error, not an AttributeError."""
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise ValueError(f"trainer entry must look like 'module:function'; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ImportError(f"trainer entry {spec!r}: module {module_name!r} not found ({exc})") from exc
    entry = getattr(module, function_name, None)
    if not callable(entry):
        raise ImportError(f"trainer entry {spec!r}: {module_name} has no function {function_name!r}")
    return entry


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def prepare_trainer_config(
    trainer_cfg: dict, *, run_dir: str, world_size: int
) -> tuple[dict, BatchPlan | None]:
    """A copy of ``trainer_cfg`` with the run directory and, when a global batch is set, the micro-batch
    and accumulation steps for ``world_size`` workers."""
    cfg = copy.deepcopy(trainer_cfg)
    _set(cfg, RUN_DIR_KEY, run_dir)
    global_batch = _get(cfg, GLOBAL_BATCH_KEY)
    if global_batch is None:
        return cfg, None
    rounding = _get(cfg, BATCH_ROUNDING_KEY) or "nearest"
    plan = plan_batch(int(global_batch), world_size, _get(cfg, MAX_MICRO_BATCH_KEY), rounding)
    _set(cfg, MICRO_BATCH_KEY, plan.micro_batch)
    _set(cfg, ACCUMULATION_KEY, plan.accumulation)
    return cfg, plan


def absolute_paths(trainer_cfg: dict, base: str) -> dict[str, str]:
    """Make every relative local path under :data:`PATH_KEYS` absolute against ``base`` (the driver's
    working directory), in place; URLs, absolute paths and interpolations (``${...}``, resolved later from
    values that are themselves made absolute) are left as they are. Returns {key: new value}."""
    changed = {}
    for key in PATH_KEYS:
        value = _get(trainer_cfg, key)
        if not isinstance(value, str) or not value or "://" in value or "${" in value:
            continue
        if not os.path.isabs(os.path.expanduser(value)):
            changed[key] = os.path.normpath(os.path.join(base, value))
            _set(trainer_cfg, key, changed[key])
        elif value.startswith("~"):
            changed[key] = os.path.expanduser(value)
            _set(trainer_cfg, key, changed[key])
    return changed


def check_batch_plans(trainer_cfg: dict, world_sizes: range | list[int]) -> list[BatchPlan]:
    """The batch plan of every world size a launch may come up with (one size, or an elastic range), or
    ``ValueError`` naming the sizes that have none (``trainer.global_batch_rounding=exact``). Run on the
    driver before launching: a group must never meet a batch it cannot plan."""
    global_batch = _get(trainer_cfg, GLOBAL_BATCH_KEY)
    if global_batch is None:
        return []
    plans, failing = [], []
    for world_size in world_sizes:
        try:
            plans.append(prepare_trainer_config(trainer_cfg, run_dir="", world_size=world_size)[1])
        except ValueError:
            failing.append(world_size)
    if failing:
        raise ValueError(
            f"trainer.global_batch={global_batch} does not split over {failing} workers, which this launch "
            f"may come up with, and trainer.global_batch_rounding=exact; allow rounding (nearest) or "
            f"choose the worker counts"
        )
    return plans


def _trailing_number(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else -1


def list_complete_checkpoints(storage: RunStorage) -> list[str]:
    """Complete checkpoint folders (relative to the run directory), oldest first."""
    folders = storage.list_entries(CHECKPOINT_FOLDER, kind="directory")
    complete = [f for f in folders if storage.exists(CHECKPOINT_FOLDER, f, COMPLETE_MARKER)]
    return [f"{CHECKPOINT_FOLDER}/{f}" for f in sorted(complete, key=_trailing_number)]


def newest_complete_checkpoint(storage: RunStorage) -> str | None:
    checkpoints = list_complete_checkpoints(storage)
    return checkpoints[-1] if checkpoints else None
