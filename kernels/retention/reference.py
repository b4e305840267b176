"""The retention bandpass scan in its chunked matrix form (fast PyTorch, autograd end to end).

With rotated ``q~_t = R(t theta) q_t`` and ``k~_s = R(s theta) k_s`` (exact pair rotations), the
complex product of the definition is a real dot product, ``Re[q~ conj(k~)] = q~ . k~``, so retention
is linear attention with a decay mask. The sequence is cut into chunks of ``chunk_size`` tokens:

* inside a chunk: ``(q~ k~^T * M) v`` with ``M[i, j] = gamma^(i-j)`` for ``i >= j``;
* across chunks: each chunk's summary ``K_c = sum_j gamma^(T-1-j) k~_j^T v_j`` reaches later chunks
  through ``gamma^(T (c-1-c'))``, and query ``i`` reads it with ``gamma^(i+1)``.

Every exponent is ``>= 0`` times ``log_decay < 0``, so nothing can overflow at any length (no
``gamma^(-s)``). All chunks are handled at once with einsums: no Python loop over tokens or chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rotary import rotary_dtype, rotate_by_position


def retention_scan_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Same contract as ``retention_scan_naive``: ``q, k: (b, L, H, dk)``, ``v: (b, L, H, dv)``,
    ``log_decay: (H,)``, ``theta: (H, dk // 2)`` or None -> ``(b, L, H, dv)``."""
    if theta is not None:
        q, k = rotate_by_position(q, theta), rotate_by_position(k, theta)
    batch, length, heads, _ = q.shape
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:  # zero keys/values add nothing; padded queries are cut off at the end
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    # (b, H, chunks, T, d)
    q, k, v = (x.unflatten(1, (chunks, chunk)).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    # positions, distances and decay exponents in at least float32 (``ops.retention_scan`` already hands
    # this float32 or float64 tensors); the masks are cast to the activations' dtype for the einsums
    compute = rotary_dtype(q.dtype, log_decay.dtype)
    log_decay = log_decay.to(compute)
    position = torch.arange(chunk, device=q.device, dtype=compute)
    distance = position[:, None] - position[None, :]
    intra_mask = torch.where(
        distance >= 0, torch.exp(log_decay[:, None, None] * distance.clamp(min=0)), distance.new_zeros(())
    ).to(q.dtype)  # (H, T, T)
    scores = torch.einsum("bhcid,bhcjd->bhcij", q, k) * intra_mask[:, None]
    out = torch.einsum("bhcij,bhcjv->bhciv", scores, v)
    if chunks > 1:
        key_weight = torch.exp(log_decay[:, None] * (chunk - 1 - position)).to(q.dtype)  # (H, T)
        summaries = torch.einsum("bhcjd,hj,bhcjv->bhcdv", k, key_weight, v)
        index = torch.arange(chunks, device=q.device, dtype=compute)
        hops = index[:, None] - 1 - index[None, :]  # chunk c reads chunk c' < c after c-1-c' whole chunks
        carry = torch.where(
            hops >= 0, torch.exp(log_decay[:, None, None] * chunk * hops.clamp(min=0)), hops.new_zeros(())
        ).to(q.dtype)  # (H, chunks, chunks)
        states = torch.einsum("hce,bhedv->bhcdv", carry, summaries)
        query_weight = torch.exp(log_decay[:, None] * (position + 1)).to(q.dtype)  # (H, T)
        out = out + torch.einsum("bhcid,hi,bhcdv->bhciv", q, query_weight, states)
    out = out.permute(0, 2, 3, 1, 4).flatten(1, 2)  # (b, chunks*T, H, dv)
    return out[:, :length]
