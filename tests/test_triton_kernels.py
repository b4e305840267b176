"""Triton bandpass-scan kernels against their naive definitions: every output and every gradient.

On a CUDA machine the kernels run compiled. Without one they run in the Triton interpreter on CPU
tensors, which needs ``TRITON_INTERPRET=1`` before triton is first imported (torch imports it), so a
normal test session runs this module again in a child pytest with the variable set
(``test_kernels_in_the_interpreter``) and skips the kernel tests in the parent.

Tolerances, as max |error| / max(1, max |reference|) over each tensor:
* fp32 inputs: 2e-5 (only summation order differs from the fp32 reference);
* bf16 inputs: 2e-2 for the selective scan (fp32 state, bf16 outputs and gradients), 5e-2 for
  retention (its matrix products run in bf16), against the fp32 reference on the same bf16 values.

Each kernel also runs at a real length (197 tokens, tiny widths), the bf16 training configuration
(activations bf16, the SSM / decay scalars fp32) is covered, the ``torch.library`` ops pass ``opcheck``
and the Triton backends compile whole (``fullgraph=True``) through the public dispatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defocus_scale.kernels.ops import retention_scan, selective_scan
from defocus_scale.kernels.retention.naive import retention_scan_naive
from defocus_scale.kernels.retention.triton import retention_scan_triton
from defocus_scale.kernels.selective import triton as selective_triton
from defocus_scale.kernels.selective.naive import selective_scan_naive
from defocus_scale.kernels.selective.triton import selective_scan_triton
from defocus_scale.models import create_model

# ``ops`` rather than ``defocus_scale.kernels``: once the ``selective_scan`` subpackage is imported,
# the package attribute of that name is the subpackage, not the function.

ON_GPU = torch.cuda.is_available()
INTERPRETED = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
kernels_run_here = pytest.mark.skipif(
    not (ON_GPU or INTERPRETED),
    reason="runs in the interpreter child session (test_kernels_in_the_interpreter)",
)
REPO = Path(__file__).resolve().parents[1]
FP32_TOL = 2e-5
BF16_TOL = {"selective": 2e-2, "retention": 5e-2}
REAL_LENGTH = 197  # 224 px / 16 patches + cls
# the scalars the models hand the operators in fp32 in bf16 training
TRAINING_SCALARS = {"selective": ("delta", "A", "freq", "D"), "retention": ("log_decay", "theta")}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual.float() - expected.float()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol:g} x {scale:.3g}"


def _compare(
    fast, reference, inputs: dict[str, torch.Tensor | None], dtype: torch.dtype, tol: float, keep=()
) -> None:
    """``fast`` on ``inputs`` cast to ``dtype`` (except those named in ``keep``, left in fp32, as
    parameters are under autocast) vs ``reference`` on the same values in fp32."""
    names = [name for name, value in inputs.items() if value is not None]
    low = {n: None if v is None else (v if n in keep else v.to(dtype)) for n, v in inputs.items()}
    low = {n: None if v is None else v.detach().clone().requires_grad_() for n, v in low.items()}
    high = {n: None if v is None else v.detach().float().requires_grad_() for n, v in low.items()}
    out = fast(**low)
    expected = reference(**high)
    assert out.dtype == low[names[0]].dtype
    _assert_close(out, expected, tol, "output")
    weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad((out.float() * weight).sum(), [low[n] for n in names])
    expected_grads = torch.autograd.grad((expected * weight).sum(), [high[n] for n in names])
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert grad.dtype == low[name].dtype, name
        _assert_close(grad, expected_grad, tol, f"grad of {name}")


def _scan_inputs(batch, length, channels, state, *, freq=True, D=True, z=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = dict(
        u=torch.randn(batch, length, channels, generator=g),
        delta=torch.rand(batch, length, channels, generator=g) * 0.5 + 0.01,
        A=-torch.rand(channels, state, generator=g) * 3 - 0.1,
        B=torch.randn(batch, length, state, generator=g),
        C=torch.randn(batch, length, state, generator=g),
        freq=torch.rand(state, generator=g) if freq else None,
        D=torch.randn(channels, generator=g) if D else None,
        z=torch.randn(batch, length, channels, generator=g) if z else None,
    )
    return {n: v.to(DEVICE) if v is not None else None for n, v in values.items()}


def _retention_inputs(batch, length, heads, dk, dv, *, theta=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = dict(
        q=torch.randn(batch, length, heads, dk, generator=g),
        k=torch.randn(batch, length, heads, dk, generator=g) / dk**0.5,
        v=torch.randn(batch, length, heads, dv, generator=g),
        log_decay=-torch.rand(heads, generator=g) * 0.5 - 0.02,
        theta=torch.rand(heads, dk // 2, generator=g) if theta else None,
    )
    return {n: v.to(DEVICE) if v is not None else None for n, v in values.items()}


# --- selective scan ------------------------------------------------------------------------------------

# (length, epilogue): lengths around the chunk of 4 used here (1, a boundary, odd ones over several chunks)
SCAN_CASES = [
    (1, "fused"),
    (4, "fused"),
    (5, "scan"),
    (8, "rotary"),
    (13, "fused"),
    (9, "gate_only"),
]
EPILOGUES = {
    "scan": dict(freq=False, D=False, z=False, group_size=0),
    "rotary": dict(freq=True, D=False, z=False, group_size=0),
    "gate_only": dict(freq=True, D=True, z=True, group_size=0),
    "fused": dict(freq=True, D=True, z=True, group_size=4),
}


def _selective_case(length: int, epilogue: str, channels: int = 8, state: int = 4):
    options = dict(EPILOGUES[epilogue])
    group_size = options.pop("group_size")
    inputs = _scan_inputs(2, length, channels, state, **options)

    def fast(**t):
        return selective_scan_triton(
            **t, rope_scale=2.0, group_size=group_size, chunk_size=4, block_channels=4
        )

    def reference(**t):
        return selective_scan_naive(**t, rope_scale=2.0, group_size=group_size)

    return fast, reference, inputs


@kernels_run_here
@pytest.mark.parametrize("length,epilogue", SCAN_CASES)
def test_selective_scan_fp32(length, epilogue):
    fast, reference, inputs = _selective_case(length, epilogue)
    _compare(fast, reference, inputs, torch.float32, FP32_TOL)


@kernels_run_here
@pytest.mark.parametrize(
    "length,epilogue,keep",
    [(7, "fused", ()), (6, "rotary", ()), (5, "fused", ("A", "freq", "D")), (9, "fused", "training")],
)
def test_selective_scan_bf16(length, epilogue, keep):
    """bf16 inputs; the third case keeps the parameters in fp32, as in a model under autocast, the last
    the bf16 training configuration (``delta``, ``A``, ``freq``, ``D`` fp32, as the models pass them)."""
    keep = TRAINING_SCALARS["selective"] if keep == "training" else keep
    fast, reference, inputs = _selective_case(length, epilogue)
    _compare(fast, reference, inputs, torch.bfloat16, BF16_TOL["selective"], keep)


@kernels_run_here
def test_selective_scan_uneven_tiles_and_odd_state():
    """Channels not a multiple of the tile, a non-power-of-two group and state (masked lanes)."""
    inputs = _scan_inputs(1, 6, 12, 6)
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=6, chunk_size=4),
        lambda **t: selective_scan_naive(**t, group_size=6),
        inputs, torch.float32, FP32_TOL,
    )  # fmt: skip
    no_group = _scan_inputs(1, 3, 10, 4, D=False, z=False)
    _compare(
        lambda **t: selective_scan_triton(**t, block_channels=4),
        lambda **t: selective_scan_naive(**t),
        no_group, torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
def test_selective_scan_wide_groups_use_the_pytorch_epilogue(monkeypatch):
    monkeypatch.setattr(selective_triton, "MAX_FUSED_GROUP", 2)
    inputs = _scan_inputs(1, 5, 8, 4)
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=4, chunk_size=2, block_channels=4),
        lambda **t: selective_scan_naive(**t, group_size=4),
        inputs, torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
def test_selective_scan_public_dispatch_and_strided_inputs():
    """``backend="triton"`` reaches the kernel; transposed (non-contiguous) inputs give the same answer."""
    inputs = _scan_inputs(2, 5, 8, 4)
    strided = {n: v.transpose(0, 1).contiguous().transpose(0, 1) if v is not None and v.dim() == 3 else v
               for n, v in inputs.items()}  # fmt: skip
    assert not strided["u"].is_contiguous()
    out = selective_scan(**strided, group_size=4, backend="triton")
    expected = selective_scan_naive(**inputs, group_size=4)
    _assert_close(out, expected, FP32_TOL, "output")
    # the states kept for the backward every 2 tokens instead of the default: the same function
    kept = selective_scan(**inputs, group_size=4, backend="triton", state_every=2)
    _assert_close(kept, expected, FP32_TOL, "output, states every 2 tokens")
    with pytest.raises(ValueError, match="state_every"):
        selective_scan(**inputs, backend="triton", state_every=-1)


@kernels_run_here
def test_selective_scan_without_grad_keeps_no_state():
    inputs = _scan_inputs(1, 3, 4, 2)
    with torch.no_grad():
        out = selective_scan_triton(**inputs, group_size=2)
    _assert_close(out, selective_scan_naive(**inputs, group_size=2), FP32_TOL, "output")


@kernels_run_here
def test_selective_scan_rejects_bad_inputs(monkeypatch):
    inputs = _scan_inputs(1, 3, 4, 2)
    with pytest.raises(ValueError, match="group_size"):
        selective_scan_triton(**inputs, group_size=3)
    with pytest.raises(ValueError, match="freq"):
        selective_scan_triton(**{**inputs, "freq": inputs["freq"][:1]})
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_triton(**{**inputs, "B": inputs["B"][:, :2]})
    with pytest.raises(ValueError, match="float64"):
        selective_scan_triton(**{**inputs, "u": inputs["u"].double()})
    if not ON_GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            selective_scan_triton(**inputs)
    else:
        with pytest.raises(ValueError, match="one device"):
            selective_scan_triton(**{**inputs, "D": inputs["D"].cpu()})


@kernels_run_here
def test_selective_scan_at_a_real_length():
    """197 tokens through 7 chunks, fused epilogue, fp32 (the tight tolerance: positions and angles at
    real lengths; the bf16 training configuration is ``test_selective_scan_bf16``). ~15 s interpreted."""
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=4, chunk_size=32, block_channels=4),
        lambda **t: selective_scan_naive(**t, group_size=4),
        _scan_inputs(1, REAL_LENGTH, 4, 4), torch.float32, FP32_TOL,
    )  # fmt: skip


# The sequence-split forward (a local pass from zero per segment, then the output pass from the combined
# start states), forced at toy shapes with ``segments``: chunks of 2, segments of whole chunks, odd tails.
SPLIT_CASES = [
    (13, 3, "fused", torch.float32), (5, 3, "scan", torch.float32), (9, 2, "fused", torch.bfloat16)
]  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize("length,segments,epilogue,dtype", SPLIT_CASES)
def test_selective_scan_split_forward(length, segments, epilogue, dtype):
    """Output and every gradient (the backward reads the chunk states the split forward wrote); bf16 in
    the training configuration; "scan" without any epilogue."""
    options = dict(EPILOGUES[epilogue])
    group_size = options.pop("group_size")
    bf16 = dtype is torch.bfloat16
    _compare(
        lambda **t: selective_scan_triton(**t, rope_scale=2.0, group_size=group_size, chunk_size=2,
                                          block_channels=4, segments=segments),
        lambda **t: selective_scan_naive(**t, rope_scale=2.0, group_size=group_size),
        _scan_inputs(2, length, 8, 4, **options), dtype, BF16_TOL["selective"] if bf16 else FP32_TOL,
        TRAINING_SCALARS["selective"] if bf16 else (),
    )  # fmt: skip


@kernels_run_here
def test_selective_scan_split_forward_at_a_real_length():
    """197 tokens, 7 chunks of 32 in segments of 3, 3 and 1 chunks (the last one 5 tokens long)."""
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=4, chunk_size=32, block_channels=4, segments=3),
        lambda **t: selective_scan_naive(**t, group_size=4),
        _scan_inputs(1, REAL_LENGTH, 4, 4), torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize(
    "tunables",
    [dict(tokens_per_stage=1), dict(tokens_per_stage=4), dict(stages=2), dict(tokens_per_stage=1, stages=2),
     dict(num_warps=2), dict(segments=2, stages=2), dict(segments=4, tokens_per_stage=4)],
)  # fmt: skip
def test_selective_scan_forward_tunables_agree(tunables):
    """Every point of the forward's tuning space writes the default's output and chunk states (the last
    chunk's is never written)."""
    t = _scan_inputs(2, 13, 8, 4)
    args = [t[n] for n in ("u", "delta", "A", "B", "C", "D", "z")]
    results = []
    for options in ({}, tunables):
        launch, out, boundary = selective_triton.forward_launch(*args, 4, 4, 4, False, True, **options)
        launch.run()
        results.append((out, boundary[:, :-1]))
    assert len(launch.prelude) == (1 if tunables.get("segments", 1) > 1 else 0)
    for (expected, expected_states), (out, states) in zip(results[:1], results[1:]):
        _assert_close(out, expected, FP32_TOL, "output")
        _assert_close(states, expected_states, FP32_TOL, "chunk states")


@pytest.mark.parametrize("batch,split,warps", [(2, True, 2), (32, False, 1), (128, False, 1)])
def test_selective_scan_forward_splits_only_grids_smaller_than_the_gpu(batch, split, warps):
    """Mamba-B widths at 197 tokens on the report's meta tensors: the micro-batch of 2 (48 programs)
    splits the sequence (4 segments of 2 chunks) until the grid fills the largest GPU targeted; training
    batches do not. Two warps a group where fewer than 4 programs share an SM."""
    act = torch.empty(batch, REAL_LENGTH, 1536, device="meta")
    A, B = torch.empty(1536, 16, device="meta"), torch.empty(batch, REAL_LENGTH, 16, device="meta")
    launch, _, _ = selective_triton.forward_launch(act, act, A, B, B, None, act, 64, 32, 64, False, True)
    assert bool(launch.prelude) == split
    assert launch.programs >= selective_triton.FILL_PROGRAMS
    for part in (*launch.prelude, launch):
        assert part.grid == launch.grid and part.work.token_steps == (32 if split else 99)  # 2 tokens a step
        assert part.num_warps == warps


def test_selective_scan_forward_autotune_space():
    """The default first; the split's alternatives only where the default splits; no duplicate."""
    for batch, split in ((2, True), (128, False)):
        act = torch.empty(batch, REAL_LENGTH, 1536, device="meta")
        candidates = selective_triton.forward_candidates(act, 16, 64, 32, 64)
        assert candidates[0] == {} and len(candidates) == len({repr(c) for c in candidates})
        assert any("num_warps" in c for c in candidates) and {"tokens_per_stage": 1} in candidates
        assert ({"segments": 1} in candidates) == split


@kernels_run_here
def test_selective_scan_forward_autotune_candidates_agree():
    """Every candidate the autotuner may pick (here, on CPU: the other warp count, one token a stage)
    writes the default's output and chunk states."""
    t = _scan_inputs(2, 13, 8, 4)
    args = [t[n] for n in ("u", "delta", "A", "B", "C", "D", "z")]
    candidates = selective_triton.forward_candidates(t["u"], 4, 4, 4, 4)
    assert len(candidates) >= 3
    results = []
    for options in candidates:
        launch, out, boundary = selective_triton.forward_launch(*args, 4, 4, 4, False, True, **options)
        launch.run()
        results.append((out, boundary[:, :-1]))
    for out, states in results[1:]:
        _assert_close(out, results[0][0], FP32_TOL, "output")
        _assert_close(states, results[0][1], FP32_TOL, "chunk states")


@kernels_run_here
@pytest.mark.parametrize("min_programs,chunk", [(1, 4), (1, 3), (8, 3), (148, 2), (148, 4)])
def test_selective_scan_backward_segments_and_groups(monkeypatch, min_programs, chunk):
    """The backward's two paths: each sequence whole (``MIN_PROGRAMS`` 1) or split into segments (the
    grid of 2 x 2 programs is below ``MIN_PROGRAMS``: 8 gives two segments of 3 and 2 chunks, 148 one
    chunk each) with the carry pass; and its groups of 4, 2 and 1 tokens (chunks of 4, 2, 3)."""
    monkeypatch.setattr(selective_triton, "MIN_PROGRAMS", min_programs)
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=4, chunk_size=chunk, block_channels=4),
        lambda **t: selective_scan_naive(**t, group_size=4),
        _scan_inputs(2, 13, 8, 4), torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize("splits,chunk,block", [(2, 4, 4), (3, 2, 4), (2, 8, 64)])
def test_selective_scan_backward_look_back(monkeypatch, splits, chunk, block):
    """Segments chained by look-back (each takes the carry its right neighbour ended with, the programs
    taking their work by ticket, every row's last segment first) compute the reference's gradients; at
    the production tile too (64 channels)."""
    monkeypatch.setattr(selective_triton, "backward_splits", lambda *args: (splits, True))
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=4, chunk_size=chunk, block_channels=block),
        lambda **t: selective_scan_naive(**t, group_size=4),
        _scan_inputs(2, 13, 2 * block, 4), torch.float32, FP32_TOL,
    )  # fmt: skip


def test_selective_backward_splits_chain_segments_where_the_last_wave_is_mostly_empty():
    """On an H100 (132 SMs, 4 programs each: 528 slots), 768 rows (Mamba-B, 577 tokens, batch 32) are
    1.45 waves: two look-back segments make 1.5 waves of half the work instead of 2; 3072 rows (5.8
    waves) and 1024 (1.9) gain nothing; fewer rows than a wave never chain (a segment would wait); a grid
    below ``MIN_PROGRAMS`` splits with the carry pass; no GPU known, no look-back."""
    splits = selective_triton.backward_splits
    assert splits(32, 24, 73, 132) == (2, True)
    assert splits(128, 24, 25, 132) == (1, False)
    assert splits(32, 32, 73, 132) == (1, False)
    assert splits(32, 12, 73, 132) == (1, False)
    assert splits(32, 24, 1, 132) == (1, False)
    assert splits(32, 24, 73, 0) == (1, False)
    assert splits(2, 24, 25, 132) == (4, False)


@kernels_run_here
def test_selective_scan_at_a_real_length_unsplit(monkeypatch):
    """197 tokens with the backward unsplit (``test_selective_scan_at_a_real_length`` splits it into its
    7 chunks: one program per sequence is below ``MIN_PROGRAMS``)."""
    monkeypatch.setattr(selective_triton, "MIN_PROGRAMS", 1)
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=4, chunk_size=32, block_channels=4),
        lambda **t: selective_scan_naive(**t, group_size=4),
        _scan_inputs(1, REAL_LENGTH, 4, 4), torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize("state,min_programs", [(16, 1), (12, 148)])
def test_selective_scan_backward_production_tile(monkeypatch, state, min_programs):
    """The production tile (a norm group of 64 channels: 2 x 32 lanes, 2 warps of 8 states), where the
    backward reduce-scatters dB and dC over the lanes; a state of 12 masks the last states, and the
    split sequence (``MIN_PROGRAMS`` 148) runs the carry pass on that tile too."""
    monkeypatch.setattr(selective_triton, "MIN_PROGRAMS", min_programs)
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=64, chunk_size=8, block_channels=64),
        lambda **t: selective_scan_naive(**t, group_size=64),
        _scan_inputs(2, 13, 128, state), torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize("capability", [80, 100])
@pytest.mark.parametrize(
    "group_size,block,state,chunk", [(64, 64, 16, 8), (64, 64, 12, 8), (4, 4, 4, 8), (64, 64, 16, 16)]
)
def test_selective_scan_backward_other_schedules(monkeypatch, capability, group_size, block, state, chunk):
    """The backward as built for sm_80 and sm_100 (``TOKEN_BARRIER``: a barrier a token, loads masked
    past the end; sm_100 without ``FMA_CHAINS``) also computes the reference's gradients; the
    interpreter otherwise runs sm_90's (loads of the last token past the end, ``delta`` and ``dout``
    zeroed there): 13 tokens end mid-group. Chunks of 16: four groups, two of them through the scratch."""
    monkeypatch.setattr(selective_triton, "target_capability", lambda device: capability)
    _compare(
        lambda **t: selective_scan_triton(**t, group_size=group_size, chunk_size=chunk, block_channels=block),
        lambda **t: selective_scan_naive(**t, group_size=group_size),
        _scan_inputs(2, 13, 2 * block, state), torch.float32, FP32_TOL,
    )  # fmt: skip


def test_selective_backward_schedule_follows_the_target():
    """Each GPU's schedule; an unknown device (the interpreter) gets sm_90's."""
    from defocus_scale.kernels.launch import targeting

    def schedule():
        act = torch.empty(2, 13, 128, device="meta")
        A, B = torch.empty(128, 16, device="meta"), torch.empty(2, 13, 16, device="meta")
        boundary = torch.empty(2, 2, 16, 128, device="meta")
        launch, _ = selective_triton.backward_launch(act, act, act, A, B, B, None, act, boundary, 64, 8, 64)
        return launch.constexprs["TOKEN_BARRIER"], launch.constexprs["FMA_CHAINS"]

    assert schedule() == (False, True)
    for capability, expected in ((80, (True, True)), (90, (False, True)), (100, (True, False))):
        with targeting(capability):
            assert schedule() == expected


@pytest.mark.parametrize("channels", [768, 1536, 2048])
def test_selective_backward_grid_fills_the_gpu(channels):
    """The production backward launches (meta tensors, nothing runs): at the micro-batch of 2 the
    sequence is split until the grid has ``MIN_PROGRAMS`` programs (a carry pass first); at batch 128 it
    is not. The tunables are honoured."""

    def launch(batch, **tunables):
        act = torch.empty(batch, REAL_LENGTH, channels, dtype=torch.bfloat16, device="meta")
        delta = torch.empty(batch, REAL_LENGTH, channels, device="meta")
        A, D = torch.empty(channels, 16, device="meta"), torch.empty(channels, device="meta")
        B = torch.empty(batch, REAL_LENGTH, 16, device="meta")
        config = (64, 32, 64)  # group_size, chunk_size, block_channels
        _, out, boundary = selective_triton.forward_launch(act, delta, A, B, B, D, act, *config, False, True)
        return selective_triton.backward_launch(
            out, act, delta, A, B, B, D, act, boundary, *config, **tunables
        )[0]

    small, large = launch(2), launch(128)
    assert small.programs >= selective_triton.MIN_PROGRAMS and len(small.prelude) == 1
    assert small.prelude[0].grid == small.grid and small.prelude[0].constexprs["CARRY_PASS"]
    assert large.grid[2] == 1 and not large.prelude
    chained = launch(128, splits=2, lookback=True)
    assert chained.grid[2] == 2 and not chained.prelude and chained.constexprs["LOOKBACK"]
    assert chained.zeroed == ("ticket_ptr",)
    assert chained.args["ticket_ptr"].numel() == 1 + 2 * chained.programs  # counter, flags, tickets
    tuned = launch(2, splits=2, group=2, num_warps=4)
    assert tuned.grid[2] == 2 and tuned.constexprs["GROUP"] == 2 and tuned.num_warps == 4
    with pytest.raises(ValueError, match="group"):
        launch(2, group=3)


def test_selective_scan_backward_autotune_space():
    """The default first; the split's alternatives only where the default splits; no duplicate."""
    for batch, split in ((2, True), (128, False)):
        act = torch.empty(batch, REAL_LENGTH, 1536, device="meta")
        candidates = selective_triton.backward_candidates(act, 16, 64, 32, 64)
        assert candidates[0] == {} and len(candidates) == len({repr(c) for c in candidates})
        assert {"group": 2} in candidates and any("num_warps" in c for c in candidates)
        assert ({"splits": 1} in candidates) == split
        assert {"splits": 2, "lookback": True} in candidates


_COMPILE_CANDIDATES = """
import torch
from defocus_scale.kernels import aot
from defocus_scale.kernels.launch import targeting
from defocus_scale.kernels.selective import triton as selective

act = torch.empty(128, 197, 1536, dtype=torch.bfloat16, device="meta")
delta = torch.empty(128, 197, 1536, device="meta")
A, D = torch.empty(1536, 16, device="meta"), torch.empty(1536, device="meta")
B = C = torch.empty(128, 197, 16, device="meta")
with targeting(90):
    for chunk in (selective.DEFAULT_CHUNK, 32):
        _, out, boundary = selective.forward_launch(act, delta, A, B, C, D, act, 64, chunk, 64, False, True)
        inputs = (out, act, delta, A, B, C, D, act, boundary)
        for options in selective.backward_candidates(act, 16, 64, chunk, 64):
            launch, _ = selective.backward_launch(*inputs, 64, chunk, 64, **options)
            for part in (*launch.prelude, launch):
                # the analysis checks the loop nest the launch describes (else the report miscounts)
                aot.analyse(aot.compile_launch(part, "sm_90"), part, "sm_90")
"""


def test_selective_scan_backward_candidates_compile_for_the_gpu():
    """Every backward candidate at the production tile (Mamba-B, norm groups of 64; the default chunk
    and 32) compiles for sm_90, in the loop nest its launch describes
    (the interpreter runs Python's control flow: a statement after a return inside a compile-time if,
    which Triton's compiler still compiles, passed there and failed on a GPU). In a child process
    without ``TRITON_INTERPRET``, so the interpreted session runs it too (the compiles are cached)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_CANDIDATES], capture_output=True, text=True,
                            timeout=900, env=env, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@kernels_run_here
def test_selective_scan_backward_autotune_candidates_agree():
    """Every candidate the autotuner may pick writes the default's gradients (a split sequence here:
    one program a sequence is below ``MIN_PROGRAMS``, so the no-split and double-split points run too)."""
    t = _scan_inputs(2, 13, 8, 4)
    args = [t[n] for n in ("u", "delta", "A", "B", "C", "D", "z")]
    launch, out, boundary = selective_triton.forward_launch(*args, 4, 4, 4, False, True)
    launch.run()
    dout = torch.randn_like(out)
    candidates = selective_triton.backward_candidates(t["u"], 4, 4, 4, 4)
    assert {"splits": 1} in candidates
    results = []
    for options in candidates:
        launch, grads = selective_triton.backward_launch(dout, *args, boundary, 4, 4, 4, **options)
        launch.run()
        # the partials summed as the op sums them: dA, dD over (batch, segment), dB, dC over tiles
        results.append({name: g.sum((0, 1)) if name in ("dA", "dD") else g.sum(2) if name in ("dB", "dC")
                        else g for name, g in grads.items() if g is not None})  # fmt: skip
    for result in results[1:]:
        for name, expected in results[0].items():
            _assert_close(result[name], expected, FP32_TOL, name)


@kernels_run_here
def test_selective_scan_ops_run_the_autotuned_choice(monkeypatch, tmp_path):
    """With tuning on (as on CUDA) and a timer that prefers the last candidate, the forward and backward
    ops run a non-default choice, remember it, and still compute the reference's output and gradients."""
    from defocus_scale.kernels import autotune

    monkeypatch.setenv("DEFOCUS_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(autotune, "_tunable", lambda device: True)
    timed = []

    def prefer_the_last(run):
        timed.append(run)
        return 1.0 / len(timed)  # each later candidate "faster" than the ones before

    monkeypatch.setattr(autotune, "_default_timer", prefer_the_last)
    autotune.clear()
    try:
        _compare(
            lambda **t: selective_scan_triton(**t, group_size=4, chunk_size=4, block_channels=4),
            lambda **t: selective_scan_naive(**t, group_size=4),
            _scan_inputs(2, 13, 8, 4), torch.float32, FP32_TOL,
        )  # fmt: skip
        chosen = {key.split("|")[0]: params for key, params in autotune._CHOICES.items()}
        assert set(chosen) == {"selective_scan_fwd", "selective_scan_bwd"} and all(chosen.values())
    finally:
        autotune.clear()


# --- retention scan ------------------------------------------------------------------------------------

# (length, dk, dv, theta): the chunk is 16 tokens here; dk 8 pads the pair blocks, dv 40 spans 3 blocks
RETENTION_CASES = [
    (1, 8, 8, True),
    (16, 32, 16, True),
    (17, 8, 12, True),
    (37, 8, 40, True),
    (20, 16, 16, False),
]


@kernels_run_here
@pytest.mark.parametrize("length,dk,dv,theta", RETENTION_CASES)
def test_retention_scan_fp32(length, dk, dv, theta):
    inputs = _retention_inputs(2, length, 2, dk, dv, theta=theta)
    _compare(
        lambda **t: retention_scan_triton(**t, chunk_size=16, block_v=16, split=1),
        retention_scan_naive, inputs, torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize("length,split", [(37, 2), (50, 4), (37, 0)])
def test_retention_scan_split(length, split):
    """Chunk ranges in separate programs (small batches): each rebuilds the state entering its range
    (forward and dq) and the state of the chunks after it (dk, dv). ``split=0``: the default, which at
    this batch splits down to one chunk per program to fill the GPU."""
    inputs = _retention_inputs(1, length, 2, 8, 40)
    _compare(
        lambda **t: retention_scan_triton(**t, chunk_size=16, block_v=16, split=split),
        retention_scan_naive, inputs, torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize("passes,block_v,split", [(2, 16, 1), (3, 64, 2), (3, 16, 3)])
def test_retention_backward_in_several_launches(passes, block_v, split):
    """dq, then dv and dk (2 launches) or dv, dk apart (3): each walks the chunks for its gradients and
    writes its own partial sums of dlog_decay/dtheta; the same gradients as one launch and the reference
    (value blocks of 16 write fp32 shares of dq/dk; a split rebuilds the states from outside its range)."""
    from defocus_scale.kernels.retention import triton as retention_triton

    inputs = _retention_inputs(2, 37, 2, 8, 40)
    q, k, v, log_decay, theta = (inputs[n] for n in ("q", "k", "v", "log_decay", "theta"))
    dout = torch.randn_like(v)
    results = []
    for tiling_passes in (1, passes):
        tiling = retention_triton.Tiling(chunk=16, block_v=block_v, split=split, passes=tiling_passes)
        launch, grads = retention_triton.backward_launch(dout, q, k, v, log_decay, theta, tiling)
        assert len(launch.prelude) == tiling_passes - 1
        launch.run()
        share = grads["dq"].dim() == 5
        results.append([grads["dq"].sum(0) if share else grads["dq"], grads["dk"].sum(0) if share
                        else grads["dk"], grads["dv"], grads["dlog_decay"].sum((0, 1, 2)),
                        grads["dtheta"].sum((0, 1, 2))])  # fmt: skip
    leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items() if t is not None}
    retention_scan_naive(**leaves).backward(dout)
    reference = [leaves[n].grad for n in ("q", "k", "v", "log_decay", "theta")]
    for name, several, one, expected in zip("q k v log_decay theta".split(), *results, reference):
        _assert_close(several, one, FP32_TOL, f"d{name}, {passes} launches vs one")
        _assert_close(several, expected, FP32_TOL, f"d{name}, {passes} launches vs the reference")


@kernels_run_here
def test_retention_scan_chunks_of_64():
    """Chunks of 64 (sm_100's bf16 defaults, forward and backward): 150 tokens, the last chunk partial."""
    inputs = _retention_inputs(1, 150, 2, 8, 16)
    _compare(
        lambda **t: retention_scan_triton(**t, chunk_size=64, block_v=16, split=1),
        retention_scan_naive, inputs, torch.float32, FP32_TOL,
    )  # fmt: skip


@kernels_run_here
def test_retention_scan_tf32():
    """fp32 inputs on TF32 tensor cores (the interpreter rounds the operands to TF32)."""
    inputs = _retention_inputs(1, 37, 2, 16, 16)
    _compare(
        lambda **t: retention_scan_triton(**t, chunk_size=16, block_v=16, split=1, precision="tf32"),
        retention_scan_naive, inputs, torch.float32, 1e-2,
    )  # fmt: skip


@kernels_run_here
@pytest.mark.parametrize("length,dv", [(19, 16), (33, 32)])
def test_retention_scan_bf16(length, dv):
    inputs = _retention_inputs(1, length, 2, 16, dv)
    _compare(
        lambda **t: retention_scan_triton(**t, chunk_size=16, block_v=16),
        retention_scan_naive, inputs, torch.bfloat16, BF16_TOL["retention"],
    )  # fmt: skip


@kernels_run_here
def test_retention_scan_public_dispatch_and_strided_inputs():
    inputs = _retention_inputs(1, 9, 2, 8, 8)
    strided = {
        n: v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 4 else v for n, v in inputs.items()
    }
    assert not strided["q"].is_contiguous()
    out = retention_scan(**strided, backend="triton")
    _assert_close(out, retention_scan_naive(**inputs), FP32_TOL, "output")


@kernels_run_here
def test_retention_scan_rejects_bad_inputs():
    inputs = _retention_inputs(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="log_decay"):
        retention_scan_triton(**{**inputs, "log_decay": inputs["log_decay"][:1]})
    with pytest.raises(ValueError, match="theta"):
        retention_scan_triton(**{**inputs, "theta": inputs["theta"][:, :1]})
    with pytest.raises(ValueError, match="even dk"):
        retention_scan_triton(
            **{**inputs, "q": inputs["q"][..., :3], "k": inputs["k"][..., :3], "theta": None}
        )
    with pytest.raises(ValueError, match="share a dtype"):
        retention_scan_triton(**{**inputs, "v": inputs["v"].bfloat16()})


@kernels_run_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_training"])
def test_retention_scan_at_a_real_length(dtype):
    """197 tokens over 13 chunks of 16; bf16 is the training configuration (q, k, v bf16, log_decay
    and theta fp32)."""
    inputs = _retention_inputs(1, REAL_LENGTH, 2, 8, 8)
    keep = TRAINING_SCALARS["retention"] if dtype == torch.bfloat16 else ()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL["retention"]
    _compare(
        lambda **t: retention_scan_triton(**t, chunk_size=16, block_v=16),
        retention_scan_naive, inputs, dtype, tol, keep,
    )  # fmt: skip


def test_retention_autotune_space():
    """The default first, then only changes that resolve to a different launch; a caller's tiling is
    not tuned. Defaults by arch: the bf16 backward takes one value block, in one launch from sm_90 on, in
    three on sm_80 (dq, dv, dk: one launch spills there); the bf16 forward chunks of 64 on sm_100."""
    from defocus_scale.kernels.launch import targeting
    from defocus_scale.kernels.retention import triton as retention_triton

    q = torch.empty(128, REAL_LENGTH, 12, 64, dtype=torch.bfloat16, device="meta")
    for backward in (False, True):
        candidates = retention_triton.tiling_candidates(q, 64, backward, retention_triton.Tiling())
        resolved = [c.resolve(q, 64, backward) for c in candidates]
        assert candidates[0] == retention_triton.Tiling() and len(candidates) >= 3
        assert len({repr(r) for r in resolved}) == len(resolved)
    fixed = retention_triton.Tiling(chunk=32)
    assert retention_triton.tiling_candidates(q, 64, True, fixed) == [fixed]
    for capability, passes, chunk in ((80, 3, 32), (90, 1, 32), (100, 1, 64)):
        with targeting(capability):
            backward = retention_triton.Tiling().resolve(q, 64, backward=True)
            assert (backward.block_v, backward.passes) == (64, passes)
            assert retention_triton.Tiling().resolve(q, 64, backward=False).chunk == chunk
            launch, _ = retention_triton.backward_launch(q, q, q, q, q[0, 0, :, 0], None)
            assert len(launch.prelude) == passes - 1


def test_retention_grids_follow_the_targeted_gpu():
    """Launches on meta tensors are sized for the targeted GPU's SMs. IEEE fp32 RetNet-S at 577 tokens
    (192 heads' sequences) on an H100's 132 SMs: the forward halves its value blocks and the backward
    splits its chunks (3 rounds of cheaper programs instead of 2 rounds, the second 45% full); not
    where the rounds come out full enough (an A100, RetNet-B, 197 tokens). Small batches fill each GPU."""
    from defocus_scale.kernels.launch import targeting
    from defocus_scale.kernels.retention import triton as retention_triton

    def resolve(batch, length, heads, dtype, backward):
        q = torch.empty(batch, length, heads, 64, dtype=dtype, device="meta")
        precision = "ieee" if dtype == torch.float32 else None  # torch's default: no TF32
        return retention_triton.Tiling(precision=precision).resolve(q, 64, backward)

    with targeting(90):
        assert resolve(32, 577, 6, torch.float32, False).block_v == 32
        assert resolve(32, 577, 6, torch.float32, True).split == 2
        for batch, length, heads in ((32, 577, 12), (128, REAL_LENGTH, 6)):
            assert resolve(batch, length, heads, torch.float32, False).block_v == 64
            assert resolve(batch, length, heads, torch.float32, True).split == 1
    with targeting(80):
        assert resolve(32, 577, 6, torch.float32, False).block_v == 64
        assert resolve(32, 577, 6, torch.float32, True).split == 1
    for capability, sms in retention_triton._TARGET_SMS.items():
        with targeting(capability):
            for dtype in (torch.float32, torch.bfloat16):
                for backward in (False, True):
                    for heads in (6, 12):
                        tiling = resolve(2, REAL_LENGTH, heads, dtype, backward)
                        assert 2 * heads * -(-64 // tiling.block_v) * tiling.split >= sms


@kernels_run_here
def test_retention_autotune_candidates_agree():
    """Every candidate tiling the autotuner may pick gives the default's output and gradients."""
    from defocus_scale.kernels.retention import triton as retention_triton

    inputs = _retention_inputs(1, 37, 2, 16, 64)
    q, k, v, log_decay, theta = (inputs[n] for n in ("q", "k", "v", "log_decay", "theta"))
    dout = torch.randn_like(v)
    for backward in (False, True):
        candidates = retention_triton.tiling_candidates(q, 64, backward, retention_triton.Tiling())
        assert len(candidates) >= 2
        results = []
        for tiling in candidates:
            if backward:
                launch, grads = retention_triton.backward_launch(dout, q, k, v, log_decay, theta, tiling)
                launch.run()
                share = grads["dq"].dim() == 5  # one fp32 share per value block, summed
                results.append([grads["dq"].sum(0) if share else grads["dq"], grads["dk"].sum(0) if share
                                else grads["dk"], grads["dv"], grads["dlog_decay"].sum((0, 1, 2)),
                                grads["dtheta"].sum((0, 1, 2))])  # fmt: skip
            else:
                launch, out = retention_triton.forward_launch(q, k, v, log_decay, theta, tiling)
                launch.run()
                results.append([out])
        for result in results[1:]:
            for got, expected in zip(result, results[0], strict=True):
                _assert_close(got, expected, FP32_TOL, f"backward={backward}")


@kernels_run_here
def test_retention_ops_run_the_autotuned_choice(monkeypatch, tmp_path):
    """With tuning on and a timer preferring the last candidate, both retention ops run a non-default
    tiling, remember it, and match the reference."""
    from defocus_scale.kernels import autotune
    from defocus_scale.kernels.retention.triton import Tiling

    monkeypatch.setenv("DEFOCUS_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(autotune, "_tunable", lambda device: True)
    timed = []
    monkeypatch.setattr(autotune, "_default_timer", lambda run: timed.append(run) or 1.0 / len(timed))
    autotune.clear()
    try:
        _compare(retention_scan_triton, retention_scan_naive, _retention_inputs(1, 37, 2, 16, 64),
                 torch.float32, FP32_TOL)  # fmt: skip
        chosen = {key.split("|")[0]: params for key, params in autotune._CHOICES.items()}
        assert set(chosen) == {"retention_fwd", "retention_bwd"}
        assert all(params != vars(Tiling()) for params in chosen.values())
    finally:
        autotune.clear()


# --- torch.library registration and torch.compile ----------------------------------------------------


@kernels_run_here
def test_opcheck_triton_ops():
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch) on the four
    Triton ops, at tiny shapes."""
    t = _scan_inputs(1, 3, 4, 2)
    scan = [t[n].requires_grad_() for n in ("u", "delta", "A", "B", "C", "D", "z")]
    config = (2, 2, 4)  # group_size, chunk_size, block_channels
    torch.library.opcheck(selective_triton.selective_scan_triton_fwd, (*scan, *config, False, True))
    detached = [x.detach() for x in scan]
    out, boundary = selective_triton.selective_scan_triton_fwd(*detached, *config, False, True)
    torch.library.opcheck(
        selective_triton.selective_scan_triton_bwd, (torch.randn_like(out), *detached, boundary, *config)
    )
    # without D / z: the optional gradients come back empty
    plain = (*detached[:5], None, None)
    out, boundary = selective_triton.selective_scan_triton_fwd(*plain, *config, True, True)
    torch.library.opcheck(
        selective_triton.selective_scan_triton_bwd, (torch.randn_like(out), *plain, boundary, *config)
    )
    from defocus_scale.kernels.retention import triton as retention_triton

    r = _retention_inputs(1, 5, 2, 4, 4)
    retention = [r[n].requires_grad_() for n in ("q", "k", "v", "log_decay", "theta")]
    tiling = (16, 16, 0, 0, "")  # chunk_size, block_v, split, num_warps, precision (0, "": defaults)
    torch.library.opcheck(retention_triton.retention_scan_triton_fwd, (*retention, *tiling))
    detached = [x.detach() for x in retention]
    dout = torch.randn_like(detached[2])
    torch.library.opcheck(retention_triton.retention_scan_triton_bwd, (dout, *detached, *tiling))
    torch.library.opcheck(
        retention_triton.retention_scan_triton_bwd, (dout, *detached[:4], None, 16, 16, 1, 4, "")
    )


@kernels_run_here
def test_triton_backends_compile_without_graph_breaks():
    """``torch.compile(fullgraph=True)`` (``aot_eager``: no code generation, the ops run as in eager)
    through the public dispatch: one graph each, the same output and gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cases = [
        (lambda **t: selective_scan(**t, group_size=2, backend="triton"), _scan_inputs(1, 5, 4, 2)),
        (lambda **t: retention_scan(**t, backend="triton"), _retention_inputs(1, 5, 2, 4, 4)),
    ]
    for fn, inputs in cases:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, backend=counter, fullgraph=True)
        results = []
        for f in (compiled, compiled, fn):
            leaves = {n: v.detach().clone().requires_grad_() for n, v in inputs.items()}
            out = f(**leaves)
            results.append((out, torch.autograd.grad(out.square().sum(), list(leaves.values()))))
        assert counter.frame_count == 1, counter.frame_count
        for got, want in zip([results[1][0], *results[1][1]], [results[2][0], *results[2][1]], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --- models and benchmark ------------------------------------------------------------------------------

TINY = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=1)


@kernels_run_here
@pytest.mark.parametrize(
    "name,extra",
    [
        ("defocus_mamba_tiny", dict(inner_dim=64, dt_rank=4, group_size=16)),
        ("defocus_mamba_tiny", dict(inner_dim=64, dt_rank=4, group_size=16, scan_state_every=4)),
        ("defocus_retnet_tiny", dict(num_heads=2)),
    ],
)
def test_tiny_model_runs_on_triton_backend(name, extra):
    """Same weights, ``backend="triton"`` vs ``"torch"``: same logits and same parameter gradients."""
    torch.manual_seed(0)
    reference = create_model(name, **TINY, **extra, backend="torch").to(DEVICE)
    model = create_model(name, **TINY, **extra, backend="triton").to(DEVICE)
    model.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    outputs = [m(images) for m in (reference, model)]
    logits = [o.logits if hasattr(o, "logits") else o for o in outputs]
    _assert_close(logits[1], logits[0], 1e-4, "logits")
    for out in logits:
        out.square().sum().backward()
    for (name_, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        if p_ref.grad is not None:
            _assert_close(p.grad, p_ref.grad, 1e-3, f"grad of {name_}")


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="this is the parent session's runner")
def test_kernels_in_the_interpreter():
    """Every kernel test above, in a child pytest with ``TRITON_INTERPRET=1`` set from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "not in_the_interpreter and not benchmark"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(INTERPRETED, reason="runs in the parent session")
@pytest.mark.parametrize("interpret", [False, True], ids=["reference", "interpreted"])
def test_benchmark_smoke(tmp_path, interpret):
    """The benchmark runs end to end at tiny shapes: reference rows, and with ``--interpret`` the
    Triton rows too (in the interpreter on CPU, compiled on a GPU)."""
    if interpret and ON_GPU:
        pytest.skip("on a GPU the plain run already has the Triton rows")
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(REPO / "benchmarks" / "bench_scan.py"), "--smoke", "--out", str(out)]
    result = subprocess.run(
        command + (["--interpret"] if interpret else []),
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["environment"]["torch"] == torch.__version__
    implementations = {row["implementation"] for row in payload["rows"]}
    assert "torch" in implementations
    assert ("triton" in implementations) == (interpret or ON_GPU)
    assert all(row["fwd_bwd_ms"] > 0 for row in payload["rows"])
