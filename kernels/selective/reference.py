"""The selective bandpass scan in fast PyTorch: one autograd node (a ``torch.library`` custom op,
``defocus::selective_scan_fwd``) with a hand-written backward (``defocus::selective_scan_bwd``).

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


# --- the sequential scan as torch.library custom ops -----------------------------------------------------
#
# ``torch.compile`` must see the scan as one node: traced, its Python loop over tokens would be unrolled
# (one set of ops per token, recompiled per length) or break the graph. The forward op also returns the
# states the backward needs (``(length, batch, channels, state)``, the only thing kept); the backward is
# a second op. Both run eagerly inside compiled graphs; ``register_fake`` gives their output shapes.
# Inputs: ``u, delta: (batch, length, channels)``, ``A: (channels, state)``, ``B, C: (batch, length,
# state)``, all of one floating dtype (``ops.selective_scan`` casts them to at least float32).


@torch.library.custom_op("defocus::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, states)``: ``y: (batch, length, channels)`` and the states ``(length, batch, channels, state)``.

    Only the recurrence loops over time, on one cache-sized ``(batch, channels, state)`` slice per token;
    the inputs' products and the read-out run once over all tokens."""
    # time-major so that every step of the loop reads and writes contiguous memory
    u_t, delta_t = u.transpose(0, 1).contiguous(), delta.transpose(0, 1).contiguous()
    B_t, C_t = B.transpose(0, 1).contiguous(), C.transpose(0, 1).contiguous()
    states = (delta_t * u_t)[..., None] * B_t[:, :, None, :]  # the inputs x_t, scanned in place
    for t in range(1, states.shape[0]):
        decay = torch.mul(delta_t[t][..., None], A).exp_()
        states[t].addcmul_(decay, states[t - 1])
    y = torch.einsum("lben,lbn->lbe", states, C_t).transpose(0, 1).contiguous()
    return y, states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C):
    batch, length, channels = u.shape
    return u.new_empty(batch, length, channels), u.new_empty(length, batch, channels, A.shape[1])


@torch.library.custom_op("defocus::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    dy: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    states: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(du, ddelta, dA, dB, dC)`` of the scan from ``dy`` and the forward's ``states``."""
    u_t, delta_t = u.transpose(0, 1).contiguous(), delta.transpose(0, 1).contiguous()
    B_t, C_t = B.transpose(0, 1).contiguous(), C.transpose(0, 1).contiguous()
    dy_t = dy.transpose(0, 1).to(u.dtype)
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
        (grad_x * delta_t).transpose(0, 1).contiguous(),
        grad_delta.transpose(0, 1).contiguous(),
        grad_A,
        grad_B.transpose(0, 1).contiguous(),
        grad_C.transpose(0, 1).contiguous(),
    )


@selective_scan_bwd.register_fake
def _(dy, u, delta, A, B, C, states):
    return u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), \
        B.new_empty(B.shape), C.new_empty(C.shape)  # fmt: skip


def _scan_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C = inputs
    ctx.mark_non_differentiable(output[1])  # the states are for the backward only
    ctx.save_for_backward(u, delta, A, B, C, output[1])


def _scan_backward(ctx, dy, _dstates):
    u, delta, A, B, C, states = ctx.saved_tensors
    return selective_scan_bwd(dy, u, delta, A, B, C, states)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def _sequential_scan(u, delta, A, B, C):
    return selective_scan_fwd(u, delta, A, B, C)[0]


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


_METHODS = {"sequential": _sequential_scan, "doubling": _SelectiveScanDoubling.apply}


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
    gradients reach ``freq``, ``D`` and ``z`` through the chain rule. ``u, delta, A, B, C`` must share
    one dtype (the scan's); ``method="doubling"`` is the log-depth variant (benchmarks only, an
    ``autograd.Function`` that ``torch.compile`` traces through)."""
    if freq is not None:
        B = published_rotary(B, freq, rope_scale)
        C = published_rotary(C, freq, rope_scale)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    y = _METHODS[method](u, delta, A, B, C)
    return mamba_epilogue(y, u, D, z, group_size)
