"""The De-focus training loss: class-token CE plus an auxiliary CE on the patch tokens.

Released code: ``(CE(head(cls), y) + mean over patch tokens of CE(head2(token), y)) / 2``.
Paper: the aux head sees the average-pooled patch tokens instead. Both are ``ModelOutput``s here (the
model decides the aux logits' shape), so one function serves both. Targets are class indices or soft
targets ``(batch, classes)`` (Mixup/CutMix); label smoothing applies to index targets.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from defocus_scale.models.trunk import ModelOutput

_soft_target_ce = SoftTargetCrossEntropy()


class LossParts(NamedTuple):
    total: torch.Tensor
    main: torch.Tensor
    aux: torch.Tensor | None


def classification_loss(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean CE over all leading dims of ``logits``; ``target`` broadcasts over the token dim if any."""
    logits = logits.float()
    if target.ndim == 1:  # class indices
        target = target.view(-1, *([1] * (logits.ndim - 2))).expand(logits.shape[:-1])
        flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        return F.cross_entropy(flat_logits, flat_target, label_smoothing=label_smoothing)
    # Soft targets (already smoothed by Mixup): repeat over tokens for per-token logits.
    target = target.float().view(target.shape[0], *([1] * (logits.ndim - 2)), target.shape[-1])
    return _soft_target_ce(logits, target.expand_as(logits))


def defocus_loss(output: ModelOutput, target: torch.Tensor, label_smoothing: float = 0.0) -> LossParts:
    """``(main + aux) / 2`` when the model has an aux head, else the main loss alone."""
    main = classification_loss(output.logits, target, label_smoothing)
    if output.aux_logits is None:
        return LossParts(main, main, None)
    aux = classification_loss(output.aux_logits, target, label_smoothing)
    return LossParts((main + aux) / 2, main, aux)
