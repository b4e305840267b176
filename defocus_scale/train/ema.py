"""Exponential moving average of the weights, sharded exactly like the model (one DTensor per parameter)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedEMA:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step, on each rank's shard only.

    ``state_dict()`` holds DTensors, so DCP saves and reshards it like the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone().float() for name, p in model.named_parameters() if p.requires_grad
        }
        self._params = [p for name, p in model.named_parameters() if name in self.shadow]

    @torch.no_grad()
    def update(self, gate: torch.Tensor | None = None) -> None:
        """One EMA step; ``gate`` (a boolean tensor on the device) turns it into a no-op where false
        without a host sync (a skipped non-finite step)."""
        shadow = [_local(t) for t in self.shadow.values()]
        params = [_local(p).float() for p in self._params]
        if gate is None:
            torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
            return
        weight = gate.to(dtype=torch.float32) * (1.0 - self.decay)
        torch._foreach_lerp_(shadow, params, [weight.to(t.device) for t in shadow])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for name, tensor in self.shadow.items():
            if state[name] is not tensor:
                _local(tensor).copy_(_local(state[name]))

    def _reshard(self) -> None:
        """Free every FSDP unit's gathered copy, so the next forward gathers the shards written here.

        FSDP2 keeps the root unit (and any unit with ``reshard_after_forward=False``) gathered after a
        no-grad forward; writing the shards then changes nothing the next forward reads."""
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (e.g. to evaluate them), then the live ones back.

        Only each rank's shards are copied (no full copy of the model anywhere)."""
        self._reshard()
        with torch.no_grad():
            live = [_local(p).clone() for p in self._params]
            torch._foreach_copy_([_local(p) for p in self._params], [_local(t) for t in self.shadow.values()])
        try:
            yield
        finally:
            self._reshard()
            with torch.no_grad():
                torch._foreach_copy_([_local(p) for p in self._params], live)
