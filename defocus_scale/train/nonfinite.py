"""Non-finite safety: a step whose loss or all-reduced gradient norm is NaN/inf changes nothing (no
optimizer step, no EMA update), a checkpoint never holds non-finite state, and a run that keeps producing
non-finite steps stops with a message naming the steps and their samples, instead of replaying them.

Every rank takes the same decision: it rests on all-reduced figures only."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

RECORD = "nonfinite_steps.json"  # under the run directory
KEYS_SHOWN = 8  # sample keys per step in the message (the record holds them all)


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite steps for too long. Restarting from the last checkpoint would replay
    the same batches into the same failure, so launchers must not retry it (``retryable = False``)."""

    retryable = False


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises :class:`NonFiniteTrainingError` after ``max_consecutive`` in a row
    (0: never stop, only skip)."""

    max_consecutive: int
    run_dir: str
    is_main: bool
    total: int = 0
    streak: list[tuple[int, list[str]]] = field(default_factory=list)  # (step, sample keys) in a row

    def observe(self, step: int, finite: bool, keys: list[str], last_checkpoint: int | None) -> None:
        """``step``: the step just done (1-based, as logged); ``keys``: its samples on every rank."""
        if finite:
            self.streak.clear()
            return
        self.total += 1
        self.streak.append((step, keys))
        logger.warning("step %d: non-finite loss or gradient norm; skipped (%d so far)", step, self.total)
        if self.max_consecutive and len(self.streak) >= self.max_consecutive:
            raise NonFiniteTrainingError(self._stop_message(last_checkpoint))

    def _stop_message(self, last_checkpoint: int | None) -> str:
        steps = [s for s, _ in self.streak]
        record = f"{self.run_dir.rstrip('/')}/{RECORD}"
        if self.is_main:
            try:
                with fsspec.open(record, "w") as handle:
                    json.dump({"steps": [{"step": s, "keys": k} for s, k in self.streak]}, handle, indent=1)
            except OSError as exc:  # the message must still reach the user
                record = f"(not written: {exc})"
        samples = "; ".join(
            f"step {s}: {', '.join(k[:KEYS_SHOWN])}{' ...' if len(k) > KEYS_SHOWN else ''}"
            for s, k in self.streak
        )
        resume = (
            f"resume from step {last_checkpoint} with trainer.skip_steps=[{','.join(map(str, steps))}]"
            if last_checkpoint is not None
            else f"restart with trainer.skip_steps=[{','.join(map(str, steps))}]"
        )
        return (
            f"stopped at step {steps[-1]}: the loss or gradient norm was not finite for {len(steps)} "
            f"consecutive steps ({', '.join(map(str, steps))}; trainer.max_nonfinite_steps="
            f"{self.max_consecutive}). Those steps changed no weights, optimizer state or EMA, and no "
            f"checkpoint holds them. Samples: {samples or 'unknown (the loader gives no keys)'}; all keys in "
            f"{record}. To go on past these batches, {resume} (their batches are drawn and dropped), or "
            "lower optim.lr / check the data."
        )


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    """Whether every tensor (each rank's shards of DTensors) is finite on every rank (one all-reduce)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    flags = [torch.isfinite(t).all() for t in local if t.is_floating_point() and t.numel()]
    ok = torch.stack(flags).all() if flags else torch.tensor(True)
    flag = ok.to(device=device, dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_keys(keys: list[str], world_size: int) -> list[str]:
    """Every rank's sample keys of this step, in rank order (only called on a non-finite step)."""
    gathered: list[list[str] | None] = [None] * world_size
    dist.all_gather_object(gathered, keys)
    return [key for part in gathered for key in (part or [])]
