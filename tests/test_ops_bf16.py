"""The operators in the bf16 training configuration at real sequence lengths, against float64.

Production trains in bf16 (FSDP2 ``param_dtype=bf16``): activations (``u, B, C, z``; ``q, k, v``) are
bf16 while the models hand the bandpass/SSM scalars (``delta, A, freq, D``; ``log_decay, theta``;
``lambda_hat, theta``) to the operators in fp32. Here every operator runs that way at tiny widths but at
the real lengths 197 (224 px / 16 + cls) and 577 (384 px / 16 + cls), and its output and EVERY gradient
is compared with the naive definition run in float64 on the same values (bf16 and fp32 values are exact
in float64, so the reference sees exactly the inputs the operator saw).

Error metric, per tensor: ``max |got - ref| / max |ref|``. The cotangent is rounded to bf16 first (the
gradient reaching a bf16 output is bf16), so it is the same for both sides. bf16 keeps 8 significant
bits: its unit roundoff is ``U = 2^-8``, and one rounding to nearest errs by at most ``U |x|``, hence by at
most ``U max |x|`` over a tensor. Tolerances:

* ``FP32_KEPT = 2e-4``: gradients of the fp32 scalars when nothing between them and the loss is rounded
  to bf16 (both scans compute in fp32): only fp32 roundoff (``6e-8``) accumulated over hundreds of
  tokens and channels (measured <= 1e-4).
* ``BF16_ROUNDED = U + FP32_KEPT``: a tensor computed in fp32 and rounded once to bf16 (the scans'
  outputs and the gradients of their bf16 inputs): the rounding bound plus the fp32 allowance. One bf16
  intermediate in the wrong place (such as bf16 positions) costs 10-100x more.
* attention: the rotated ``q~, k~`` (and their gradients) are bf16 tensors, as the fused attention
  kernels take and return them in training, which the float64 reference does not round. Each logit
  then errs by about ``2 U |q~||k~| / sqrt(d)`` (a few ``U`` at unit-variance inputs), which softmax
  passes on to the output and every gradient: ``ATTENTION = 5 U`` (measured <= 2.8 U).
  The ``theta`` gradient is ill-conditioned on top: it is the sum of a query-side and a key-side term
  that grow with the absolute positions ``t`` and ``s`` (up to the length) and cancel down to the
  relative distances ``t - s`` the decay lets through (a few tokens), so the ``U``-sized rounding of
  ``q~, k~`` and ``dq~, dk~`` is amplified by about ``length / distance``: ``ATTENTION_THETA = 0.3``
  (measured 0.03-0.17, and a float64 computation that only rounds ``q~, k~, dq~, dk~`` to bf16 errs as
  much). To show that the operator adds nothing beyond those unavoidable roundings, each attention case
  also compares with exactly that reference (``_rotated_in_bf16``): every tensor, ``theta``'s
  gradient included, within ``ATTENTION_ROUNDED = 4 U`` (measured <= 2.1 U).
"""

from __future__ import annotations

import math

import pytest
import torch

from defocus_scale.kernels.attention.naive import defocus_attention_naive
from defocus_scale.kernels.ops import defocus_attention, retention_scan, selective_scan
from defocus_scale.kernels.retention.naive import retention_scan_naive
from defocus_scale.kernels.rotary import published_rotary, rotate_by_position
from defocus_scale.kernels.selective.naive import selective_scan_naive

LENGTHS = [197, 577]
BF16, F64 = torch.bfloat16, torch.float64
U = 2.0**-8  # bf16 unit roundoff
FP32_KEPT = 2e-4
BF16_ROUNDED = U + FP32_KEPT
ATTENTION = 5 * U
ATTENTION_THETA = 0.3
ATTENTION_ROUNDED = 4 * U


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|``."""
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _compare(fast, reference, inputs: dict[str, torch.Tensor], tolerances: dict[str, float]) -> dict:
    """Run ``fast`` on ``inputs`` and ``reference`` on them in float64; check the output (key
    ``"out"``) and each input's gradient against ``tolerances``; return the measured errors."""
    low = {n: v.detach().clone().requires_grad_() for n, v in inputs.items()}
    high = {n: v.detach().double().requires_grad_() for n, v in inputs.items()}
    out, ref = fast(**low), reference(**high)
    assert out.dtype == next(iter(inputs.values())).dtype
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(BF16)
    grads = torch.autograd.grad((out * weight).float().sum(), list(low.values()))
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), list(high.values()))
    errors = {"out": relative_error(out, ref)}
    for name, grad, ref_grad in zip(low, grads, ref_grads, strict=True):
        assert grad.dtype == inputs[name].dtype, name  # gradients come back in each input's dtype
        errors[name] = relative_error(grad, ref_grad)
    failed = {n: (e, tolerances[n]) for n, e in errors.items() if not e <= tolerances[n]}
    assert not failed, f"(error, tolerance) over tolerance: {failed}; all errors: {errors}"
    return errors


# --- rotary: the failure bf16 positions caused ----------------------------------------------------------


def _old_published_rotary(v: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """The previous formula: positions, angles, cos/sin and the rotation in ``v``'s dtype."""
    angles = torch.arange(v.shape[1], dtype=v.dtype)[:, None] * freq.to(v.dtype)
    swapped = torch.stack((-v[..., 1::2], v[..., 0::2]), dim=-1).flatten(-2)
    return v * torch.cos(angles) + swapped * torch.sin(angles)


def _old_rotate_by_position(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    angles = torch.arange(x.shape[1], dtype=x.dtype)[:, None, None] * theta.to(x.dtype)[None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("length", LENGTHS)
def test_rotary_angles_are_fp32(length):
    """bf16 ``arange(577)`` has 401 distinct values (spacing 4 above 512), so bf16 positions put angle
    errors of up to ``2 * freq`` radians into the rotary. Computed in fp32 and rounded once at the end,
    both rotaries are within one bf16 rounding of float64; the old bf16 formula is off by O(1)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, length, 8, generator=g).to(BF16)
    freq = torch.rand(8, generator=g)  # fp32, as the models pass it
    x = torch.randn(2, length, 2, 8, generator=g).to(BF16)
    theta = torch.rand(2, 4, generator=g)
    assert torch.arange(577, dtype=BF16).unique().numel() == 401

    new = relative_error(published_rotary(v, freq), published_rotary(v.double(), freq.double()))
    assert published_rotary(v, freq).dtype == BF16
    assert new <= BF16_ROUNDED, new
    new_pairs = relative_error(rotate_by_position(x, theta), rotate_by_position(x.double(), theta.double()))
    assert rotate_by_position(x, theta).dtype == BF16
    assert new_pairs <= BF16_ROUNDED, new_pairs

    old = relative_error(_old_published_rotary(v, freq), published_rotary(v.double(), freq.double()))
    pairs_ref = rotate_by_position(x.double(), theta.double())
    old_pairs = relative_error(_old_rotate_by_position(x, theta), pairs_ref)
    assert old > 10 * BF16_ROUNDED and old_pairs > 10 * BF16_ROUNDED, (old, old_pairs)


# --- selective scan -------------------------------------------------------------------------------------


def _scan_inputs(length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, channels, state = 2, 8, 4
    return dict(
        u=torch.randn(batch, length, channels, generator=g).to(BF16),
        delta=torch.rand(batch, length, channels, generator=g) * 0.2 + 0.01,
        A=-torch.rand(channels, state, generator=g) * 3 - 0.1,
        B=torch.randn(batch, length, state, generator=g).to(BF16),
        C=torch.randn(batch, length, state, generator=g).to(BF16),
        freq=torch.rand(state, generator=g),
        D=torch.randn(channels, generator=g),
        z=torch.randn(batch, length, channels, generator=g).to(BF16),
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("length", LENGTHS)
def test_selective_scan_bf16(length, backend):
    """Torch and numba CPU backends with the whole fused epilogue (rotary, group norm, ``+ D u``,
    ``* silu(z)``). Both compute in fp32, so the output and the bf16 inputs' gradients are one bf16
    rounding off and the fp32 scalars' gradients are fp32-accurate."""
    kw = dict(rope_scale=1.0, group_size=4)
    tolerances = dict(out=BF16_ROUNDED, u=BF16_ROUNDED, B=BF16_ROUNDED, C=BF16_ROUNDED, z=BF16_ROUNDED,
                      delta=FP32_KEPT, A=FP32_KEPT, freq=FP32_KEPT, D=FP32_KEPT)  # fmt: skip
    errors = _compare(
        lambda **t: selective_scan(**t, **kw, backend=backend),
        lambda **t: selective_scan_naive(**t, **kw),
        _scan_inputs(length),
        tolerances,
    )
    print(f"selective_scan {backend} L={length}: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))


# --- retention ------------------------------------------------------------------------------------------


def _retention_inputs(length: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, heads, dk, dv = 2, 2, 8, 8
    # RetNet's decays gamma = 1 - 2^(-5 - h) (long memories, the hard case at long lengths)
    gamma = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))
    return dict(
        q=torch.randn(batch, length, heads, dk, generator=g).to(BF16),
        k=(torch.randn(batch, length, heads, dk, generator=g) / math.sqrt(dk)).to(BF16),
        v=torch.randn(batch, length, heads, dv, generator=g).to(BF16),
        log_decay=torch.log(gamma).float(),
        theta=torch.rand(heads, dk // 2, generator=g),
    )


@pytest.mark.parametrize("length", LENGTHS)
def test_retention_scan_bf16(length):
    """Torch backend: rotary and chunked matrix form in fp32, so one bf16 rounding on the output and the
    q, k, v gradients and fp32 accuracy on ``log_decay`` and ``theta``."""
    tolerances = dict(out=BF16_ROUNDED, q=BF16_ROUNDED, k=BF16_ROUNDED, v=BF16_ROUNDED,
                      log_decay=FP32_KEPT, theta=FP32_KEPT)  # fmt: skip
    errors = _compare(
        lambda **t: retention_scan(**t, backend="torch"), retention_scan_naive, _retention_inputs(length),
        tolerances,
    )  # fmt: skip
    print(f"retention_scan L={length}: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))


# --- De-focus attention ---------------------------------------------------------------------------------


def _attention_inputs(length: int, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, heads, dim = 2, 2, 8
    return dict(
        q=torch.randn(batch, length, heads, dim, generator=g).to(BF16),
        k=torch.randn(batch, length, heads, dim, generator=g).to(BF16),
        v=torch.randn(batch, length, heads, dim, generator=g).to(BF16),
        lambda_hat=torch.linspace(-4, -1, heads),  # rates 0.018 and 0.37 per token
        theta=torch.rand(heads, dim // 2, generator=g),
    )


class _RoundToBf16(torch.autograd.Function):
    """Rounds a float64 tensor to bf16 values in the forward and its gradient in the backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.to(BF16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.to(BF16).to(grad.dtype)


def _rotated_in_bf16(q, k, v, lambda_hat, theta, decay_mode):
    """The float64 definition with the rotated ``q~, k~`` and their gradients rounded to bf16, the
    roundings a bf16 attention kernel cannot avoid."""
    q, k = (_RoundToBf16.apply(rotate_by_position(x, theta)) for x in (q, k))
    return defocus_attention_naive(q, k, v, lambda_hat, None, decay_mode=decay_mode)


@pytest.mark.parametrize("decay_mode", ["multiplicative", "additive"])
@pytest.mark.parametrize("length", LENGTHS)
def test_defocus_attention_bf16(length, decay_mode):
    """SDPA backend (CPU), against float64 and against float64 with the unavoidable roundings (see the
    module docstring). With the old bf16 positions the rotary alone put O(1) errors into ``q~, k~``
    at these lengths, far over either tolerance."""
    inputs = _attention_inputs(length)
    fast = lambda **t: defocus_attention(**t, decay_mode=decay_mode, backend="sdpa")  # noqa: E731
    tolerances = dict(out=ATTENTION, q=ATTENTION, k=ATTENTION, v=ATTENTION, lambda_hat=ATTENTION,
                      theta=ATTENTION_THETA)  # fmt: skip
    exact = lambda **t: defocus_attention_naive(**t, decay_mode=decay_mode)  # noqa: E731
    errors = _compare(fast, exact, inputs, tolerances)
    print(f"attention {decay_mode} L={length}: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
    rounded = _compare(
        fast, lambda **t: _rotated_in_bf16(**t, decay_mode=decay_mode), inputs,
        dict.fromkeys(tolerances, ATTENTION_ROUNDED),
    )  # fmt: skip
    print("  vs bf16-rotated reference: " + ", ".join(f"{n} {e:.2e}" for n, e in rounded.items()))
