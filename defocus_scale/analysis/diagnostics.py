"""The paper's over-focus diagnostics for one model on a batch of images.

Per layer (a residual block of the trunk):

* mixing: the token-mixing matrix of the block's mixer on its actual input (``mixing.layer_mixing``);
* gradient attention map: ``G[t, s] = || d ||block(x)_t|| / d x_s ||`` for every query ``t`` and key
  ``s`` of the block's input ``x`` (the paper back-propagates the norm of the query outputs of a layer
  to its input tokens); the diagonal is zeroed (the residual path dominates it) and the map is
  normalised by its maximum;
* receptive field: the class token's row of ``G`` (its own entry zeroed), normalised by its maximum;
* loss gradient: ``|| d loss / d x_s ||`` with ``x`` the block's input, where the loss is the
  cross-entropy of the main head against the model's own top-1 class (the images' folders need not
  be the model's classes); its summary covers the patch tokens, distances counted from the class token.

Each distribution ``p`` over keys (a row of ``|M|`` or of ``G``, or the loss gradient) is summarised by
its entropy ``H = -sum p log p``, its effective number of tokens ``exp(H)`` and its mean distance
``sum_s p_s |t - s|`` in tokens; over-focus shows as few effective tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from defocus_scale.analysis.mixing import layer_mixing


def distribution_summary(weights: torch.Tensor, query_positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy, effective tokens and mean distance of the rows of ``weights: (..., rows, keys)``
    (non-negative, normalised here) whose queries sit at ``query_positions: (rows,)``."""
    weights = weights.double()
    p = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    entropy = -(torch.xlogy(p, p)).sum(-1)
    keys = torch.arange(weights.shape[-1], device=weights.device, dtype=p.dtype)
    distance = (query_positions.to(p.dtype)[:, None] - keys[None, :]).abs()
    return {"entropy": entropy, "effective_tokens": entropy.exp(), "mean_distance": (p * distance).sum(-1)}


@dataclass
class LayerDiagnostics:
    """Per-image results for one layer. ``mixing_map``: ``|M|`` averaged over heads/channels with rows
    normalised, ``(images, L, L)``; ``attention_map``/``receptive_field``/``loss_gradient`` are ``None``
    for layers without gradient maps."""

    layer: int
    mixing_map: torch.Tensor
    mixing_summary: dict[str, dict[str, torch.Tensor]]  # query kind -> metric -> (images,)
    attention_map: torch.Tensor | None = None  # (images, L, L)
    receptive_field: torch.Tensor | None = None  # (images, L)
    loss_gradient: torch.Tensor | None = None  # (images, L)
    gradient_summary: dict[str, dict[str, torch.Tensor]] | None = None


def _summarise_rows(weights: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """``weights: (images, groups, L, L)`` -> class token (last row) and patch tokens (other rows), each
    metric averaged over groups (and over patch rows)."""
    length = weights.shape[-1]
    positions = torch.arange(length, device=weights.device)
    rows = distribution_summary(weights, positions)  # metric -> (images, groups, L)
    return {
        "class": {name: value[..., -1].mean(1) for name, value in rows.items()},
        "patch": {name: value[..., :-1].mean((1, 2)) for name, value in rows.items()},
    }


def block_inputs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eval-mode logits and every block's input, the latter retaining their gradients."""
    inputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        if args[0].requires_grad:
            args[0].retain_grad()
        inputs.append(args[0])

    handles = [block.register_forward_pre_hook(keep) for block in model.blocks]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs


def token_influence(block: nn.Module, hidden: torch.Tensor, query_chunk: int = 64) -> torch.Tensor:
    """``G[i, t, s] = || d ||block(hidden_i)_t|| / d hidden_i,s ||`` for ``hidden: (images, L, width)``.

    Each query needs its own backward pass; they run batched by replicating the sequence once per query
    (``query_chunk`` queries at a time), so one backward gives a chunk of rows.
    """
    images, length, _ = hidden.shape
    rows = []
    for image in range(images):
        image_rows = []
        for start in range(0, length, query_chunk):
            queries = torch.arange(start, min(start + query_chunk, length), device=hidden.device)
            replicas = hidden[image].detach().expand(len(queries), -1, -1).clone().requires_grad_(True)
            out = block(replicas)  # eval mode: no drop path
            objective = out[torch.arange(len(queries)), queries].norm(dim=-1).sum()
            (grad,) = torch.autograd.grad(objective, replicas)
            image_rows.append(grad.norm(dim=-1))
        rows.append(torch.cat(image_rows))
    return torch.stack(rows)


def _normalise_by_max(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).amax(1).clamp_min(torch.finfo(x.dtype).tiny)
    return x / flat.view(-1, *([1] * (x.dim() - 1)))


def diagnose(
    model: nn.Module, images: torch.Tensor, gradient_layers: Sequence[int], query_chunk: int = 64
) -> list[LayerDiagnostics]:
    """Mixing matrices of every layer and gradient maps of ``gradient_layers`` (0-based block indices)
    for normalised ``images: (n, 3, H, W)``."""
    depth = len(model.blocks)
    bad = [layer for layer in gradient_layers if not 0 <= layer < depth]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {depth} blocks (0..{depth - 1})")
    model.eval()
    mixer_inputs: list[torch.Tensor] = []
    handles = [
        block.mixer.register_forward_pre_hook(lambda _m, args: mixer_inputs.append(args[0].detach()))
        for block in model.blocks
    ]
    try:
        logits, inputs = block_inputs(model, images)
    finally:
        for handle in handles:
            handle.remove()
    loss = F.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
    loss.backward()

    results = []
    length = inputs[0].shape[1]
    positions = torch.arange(length, device=images.device)
    for layer, block in enumerate(model.blocks):
        with torch.no_grad():
            matrix = layer_mixing(block.mixer, mixer_inputs[layer]).matrix.abs().float()
        summary = _summarise_rows(matrix)
        row_sums = matrix.sum(-1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)
        result = LayerDiagnostics(layer, (matrix / row_sums).mean(1), summary)
        if layer in gradient_layers:
            influence = token_influence(block, inputs[layer], query_chunk).detach()
            attention = _normalise_by_max(influence * (1 - torch.eye(length, device=influence.device)))
            receptive = influence[:, -1].clone()
            receptive[:, -1] = 0.0
            grad = inputs[layer].grad
            if grad is None:
                raise RuntimeError(f"layer {layer}: no loss gradient reached the block input")
            loss_gradient = grad.norm(dim=-1)
            result.attention_map = attention
            result.receptive_field = _normalise_by_max(receptive)
            result.loss_gradient = _normalise_by_max(loss_gradient)
            rows = distribution_summary(attention, positions)
            result.gradient_summary = {
                "class": {k: v[:, -1] for k, v in rows.items()},
                "patch": {k: v[:, :-1].mean(1) for k, v in rows.items()},
                # Over the patches only: the class token's own entry carries the head's direct path.
                "loss": {
                    k: v[:, 0]
                    for k, v in distribution_summary(loss_gradient[:, None, :-1], positions[-1:]).items()
                },
            }
        results.append(result)
    model.zero_grad(set_to_none=True)
    return results
