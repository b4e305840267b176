"""Per-step schedules: the growing drop-path rate and warm-up + cosine learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DropPathSchedule:
    """Drop-path rate of the last block at each step.

    ``linear`` grows from ``start`` to ``end`` over training, per step (the released recipe grows it per
    epoch, ``min + (max - min) * e / (E - 1)``; per step is its continuous form and reaches ``end`` at
    the last step). ``constant`` keeps ``end``. Depth scaling (0 at the first block) is the model's.
    """

    start: float = 0.1
    end: float = 0.75
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "constant"):
            raise ValueError(f"drop-path schedule kind must be 'linear' or 'constant', got {self.kind!r}")
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"drop-path {name} must be in [0, 1), got {getattr(self, name)}")

    def rate(self, step: int, total_steps: int) -> float:
        if self.kind == "constant" or total_steps <= 1:
            return self.end
        progress = min(max(step, 0), total_steps - 1) / (total_steps - 1)
        return self.start + (self.end - self.start) * progress


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``warmup_start`` to ``peak``, then cosine down to ``final``."""

    peak: float
    warmup_steps: int
    total_steps: int
    final: float = 0.0
    warmup_start: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (self.peak - self.warmup_start) * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.final + 0.5 * (self.peak - self.final) * (1 + math.cos(math.pi * progress))
