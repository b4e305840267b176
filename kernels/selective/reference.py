"""The selective bandpass scan in fast PyTorch: one autograd node with a hand-written backward.

Why a time loop: the recurrence ``s_t = a_t s_{t-1} + x_t`` is elementwise over
``(batch, channels, state)`` with a decay that differs per channel AND state, so no matrix form
exists (unlike retention). Each step works on one cache-sized slice and the loop costs a handful of
kernel launches per token, with no autograd graph. The alternative without a token loop, a log-depth
(Hillis-Steele) scan over whole ``(length, batch, channels, state)`` tensors (``method="doubling"``),
moves ``log2(length)`` times more memory; ``benchmarks/bench_ops_cpu.py`` measures both against the
naive loop, and the sequential form is the default because it measured fastest on CPU. The GPU path
is the Triton kernel, not this.

Backward is the adjoint recurrence run in reverse, ``g_t = C'_t dy_t + a_{t+1} g_{t+1}``, from which
every gradient is a vectorised reduction. Memory: the states ``(length, batch, channels, state)`` are
kept for backward (the Triton kernel recomputes them instead).
"""

from __future__ import annotations

import torch

from ..rotary import published_rotary
from .naive import mamba_epilogue


def _doubling_scan(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """States of ``s_t = decay_t * s_{t-1} + inputs_t`` along dim 0, ``s_{-1} = 0``, in log2(length)
    whole-tensor steps (Hillis-Steele: after the step of span k, states[t] covers (t-2k, t])."""
    states, decay = inputs.clone(), decay.clone()
    span = 1
    while span < inputs.shape[0]:
        states[span:] = torch.addcmul(states[span:], decay[span:], states[:-span])
        decay[span:] = decay[span:] * decay[:-span]
        span *= 2
    return states


def _doubling_scan_reverse(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``g_t = inputs_t + decay_{t+1} g_{t+1}``: the adjoint recurrence, run backwards in time."""
    shifted = torch.zeros_like(decay)
    shifted[:-1] = decay[1:]
    return _doubling_scan(shifted.flip(0), inputs.flip(0)).flip(0)


class _SelectiveScan(torch.autograd.Function):
    """Only the recurrences loop over time, on one cache-sized ``(batch, channels, state)`` slice
    per token; the forward's products and read-out run once over all tokens."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # type: ignore[override]
        # time-major so that every step of the loop reads and writes contiguous memory
        u_t, delta_t = u.transpose(0, 1).contiguous(), delta.transpose(0, 1).contiguous()
        B_t, C_t = B.transpose(0, 1).contiguous(), C.transpose(0, 1).contiguous()
        states = (delta_t * u_t)[..., None] * B_t[:, :, None, :]  # the inputs x_t, scanned in place
        for t in range(1, states.shape[0]):
            decay = torch.mul(delta_t[t][..., None], A).exp_()
            states[t].addcmul_(decay, states[t - 1])
        ctx.save_for_backward(u_t, delta_t, A, B_t, C_t, states)
        return torch.einsum("lben,lbn->lbe", states, C_t).transpose(0, 1)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        u_t, delta_t, A, B_t, C_t, states = ctx.saved_tensors
        dy_t = dy.transpose(0, 1)
        delta_u = delta_t * u_t
        grad_C = torch.einsum("lben,lbe->lbn", states, dy_t)
        grad_x = torch.empty_like(u_t)  # d loss / d(delta_t u_t)
        grad_B = torch.empty_like(B_t)
        grad_delta = torch.zeros_like(delta_t)
        grad_A = torch.zeros_like(A)
        # The adjoint recurrence g_t = C'_t dy_t + a_{t+1} g_{t+1} runs backwards; the gradients that
        # need g_t are reduced inside the loop while the slice is still in cache (measured faster
        # at the base shapes than storing all g_t and reducing afterwards).
        grad_state = next_decay = None
        for t in range(u_t.shape[0] - 1, -1, -1):
            from_output = dy_t[t][..., None] * C_t[t][:, None, :]
            if grad_state is None:
                grad_state = from_output
            else:
                grad_state = torch.addcmul(from_output, next_decay, grad_state)
            torch.matmul(grad_state, B_t[t][..., None], out=grad_x[t][..., None])
            torch.matmul(grad_state.transpose(1, 2), delta_u[t][..., None], out=grad_B[t][..., None])
            decay = torch.mul(delta_t[t][..., None], A).exp_()
            if t > 0:
                # d loss / d(delta_t A) = g_t * s_{t-1} * decay_t
                grad_log_decay = grad_state * states[t - 1] * decay
                grad_delta[t] = (grad_log_decay * A).sum(-1)
                grad_A += torch.einsum("ben,be->en", grad_log_decay, delta_t[t])
            next_decay = decay
        grad_delta += grad_x * u_t
        return (
            (grad_x * delta_t).transpose(0, 1),
            grad_delta.transpose(0, 1),
            grad_A,
            grad_B.transpose(0, 1),
            grad_C.transpose(0, 1),
        )


class _SelectiveScanDoubling(torch.autograd.Function):
    """Log-depth (Hillis-Steele) scan over whole ``(length, batch, channels, state)`` tensors."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # type: ignore[override]
        u_t, delta_t = u.transpose(0, 1), delta.transpose(0, 1)
        B_t, C_t = B.transpose(0, 1), C.transpose(0, 1)
        decay = torch.exp(delta_t[..., None] * A)
        states = _doubling_scan(decay, (delta_t * u_t)[..., None] * B_t[:, :, None, :])
        ctx.save_for_backward(u, delta, A, B, C, states)
        return torch.einsum("lben,lbn->lbe", states, C_t).transpose(0, 1)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        u, delta, A, B, C, states = ctx.saved_tensors
        u_t, delta_t = u.transpose(0, 1), delta.transpose(0, 1)
        B_t, C_t, dy_t = B.transpose(0, 1), C.transpose(0, 1), dy.transpose(0, 1)
        decay = torch.exp(delta_t[..., None] * A)
        grad_states = _doubling_scan_reverse(decay, dy_t[..., None] * C_t[:, :, None, :])
        previous = torch.zeros_like(states)
        previous[1:] = states[:-1]
        grad_log_decay = grad_states * previous * decay
        grad_x = torch.einsum("lben,lbn->lbe", grad_states, B_t)
        grad_delta = torch.einsum("lben,en->lbe", grad_log_decay, A) + grad_x * u_t
        grad_A = torch.einsum("lben,lbe->en", grad_log_decay, delta_t)
        grad_B = torch.einsum("lben,lbe->lbn", grad_states, delta_t * u_t)
        grad_C = torch.einsum("lben,lbe->lbn", states, dy_t)
        return (
            (grad_x * delta_t).transpose(0, 1),
            grad_delta.transpose(0, 1),
            grad_A,
            grad_B.transpose(0, 1),
            grad_C.transpose(0, 1),
        )


_METHODS = {"sequential": _SelectiveScan, "doubling": _SelectiveScanDoubling}


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    freq: torch.Tensor | None = None,
    rope_scale: float = 1.0,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    group_size: int = 0,
    method: str = "sequential",
) -> torch.Tensor:
    """Same contract as ``selective_scan_naive``; the rotary and the epilogue stay in autograd so the
    gradients reach ``freq``, ``D`` and ``z`` through the chain rule."""
    if freq is not None:
        B = published_rotary(B, freq, rope_scale)
        C = published_rotary(C, freq, rope_scale)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    y = _METHODS[method].apply(u, delta, A, B, C)
    return mamba_epilogue(y, u, D, z, group_size)
