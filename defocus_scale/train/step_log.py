"""Per-step figures kept on the device and read back in one transfer every ``log_every`` steps, so that
no step waits for the device (on a GPU, the host then runs ahead of it and keeps it fed)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Order of the figures in a step's device vector.
STEP_FIGURES = ("loss", "loss_main", "loss_aux", "grad_norm", "finite")


@dataclass
class StepRow:
    step: int
    figures: dict[str, float]  # STEP_FIGURES, read back from the device
    host: dict[str, float]  # known on the host at the step: lr, drop path, epoch, ...
    keys: list[str]  # this rank's sample keys of the step (named if the step was not finite)
    seconds: float  # wall time per step over the window read back with it

    @property
    def finite(self) -> bool:
        return self.figures["finite"] > 0.5


class DeferredSteps:
    """Collects each step's device vector (see ``STEP_FIGURES``); :meth:`read` syncs once for all."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, torch.Tensor, dict[str, float], list[str]]] = []
        self._window_start = time.perf_counter()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, step: int, figures: torch.Tensor, host: dict[str, float], keys: list[str]) -> None:
        if figures.shape != (len(STEP_FIGURES),):
            raise ValueError(f"a step's figures are {len(STEP_FIGURES)} values {STEP_FIGURES}")
        self._pending.append((step, figures.detach(), host, keys))

    def read(self) -> list[StepRow]:
        """The collected steps, oldest first, after one device-to-host transfer; starts a new window.
        The per-step time is the window's wall time (device work included, as it ends with the sync)
        divided by its steps: per-step host times mean little when the host runs ahead."""
        if not self._pending:
            return []
        values = torch.stack([figures for _, figures, _, _ in self._pending]).double().tolist()
        now = time.perf_counter()
        seconds = (now - self._window_start) / len(self._pending)
        rows = [
            StepRow(step, dict(zip(STEP_FIGURES, figures)), host, keys, seconds)
            for (step, _, host, keys), figures in zip(self._pending, values)
        ]
        self._pending, self._window_start = [], now
        return rows

    def restart_clock(self) -> None:
        """Exclude what happens between steps (a checkpoint, an evaluation) from the next window."""
        if not self._pending:
            self._window_start = time.perf_counter()
