"""The kernels compile for real GPUs (sm_80, sm_90) without one, fit the arch's shared memory and do not
spill; the kernel report's SASS reading and estimate behave as their docstrings say.

Ahead-of-time compilation needs no device: Triton targets any ``GPUTarget`` and its wheel ships
``ptxas`` and ``cuobjdump``. This runs in the parent session (the interpreter is irrelevant here)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from defocus_scale.kernels import aot
from defocus_scale.kernels.launch import KernelLaunch, LaunchWork

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiles for GPUs; the interpreter run has no use for it",
)


def test_every_kernel_compiles_for_sm80_and_sm90_fits_and_does_not_spill(tmp_path):
    """One production configuration of each kernel (De-focus Mamba-B / RetNet-B mixers, 197 tokens,
    bf16 training inputs), forward and backward, through the report script itself."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_report.py"), "--smoke",
         "--archs", "sm_80", "sm_90", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads(out.read_text())
    seen = {(r["kernel"], r["direction"], r["arch"]) for r in records}
    expected = {
        (k, d, a) for k in ("selective_scan", "retention") for d in ("fwd", "bwd") for a in ("sm_80", "sm_90")
    }
    assert seen == expected, seen ^ expected
    for r in records:
        where = f"{r['kernel']} {r['direction']} {r['arch']} {r['config']}"
        assert r["launchable"], f"{where}: {r['why_not']}"
        assert r["shared_bytes"] <= aot.ARCHS[r["arch"]].smem_per_block, where
        assert r["spill_bytes"] == 0, f"{where}: spills {r['spill_bytes']} B"
        assert r["loops"], f"{where}: no token loop found in the SASS"
        for key in ("registers", "est_ms", "floor_ms"):
            assert r[key] > 0, (where, key)
        assert r["measured"] is False and r["compiled_with"]["triton"], where
    # an op's estimate below its floor is a bug (an op in several passes: the sum of theirs; each pass's
    # record carries the op's floor)
    ops: dict[str, list[dict]] = {}
    for r in records:
        ops.setdefault(f"{r['kernel']} {r['direction']} {r['arch']} {r['config']}", []).append(r)
    for where, passes in ops.items():
        assert sum(r["est_ms"] for r in passes) >= passes[0]["floor_ms"] * 0.999, where


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   MUFU.EX2 R3, R2 ;
        /*0030*/                   FFMA R5, R3, R5, R6 ;
        /*0040*/               @P0 BRA 0x60 ;
        /*0050*/                   BRA 0x40 ;
        /*0060*/                   STG.E desc[UR4][R8.64], R5 ;
        /*0070*/               @P1 BRA 0x10 ;
        /*0080*/                   MUFU.EX2 R7, R5 ;
        /*0090*/               @P2 BRA 0x80 ;
        /*00a0*/                   EXIT ;
"""


def test_token_loops_are_the_innermost_loops_that_store():
    """A loop that stores (0x10-0x70) is a token loop, with the small loop nested in it (0x40-0x50, a
    slow path without stores) excluded from its count; a loop that stores nothing (0x80-0x90) is not."""
    instructions = aot.parse_sass(SASS)
    assert [op for _, op, _ in instructions][:3] == ["MOV", "LDG.E", "MUFU.EX2"]
    loops = aot.token_loops(instructions)
    assert loops == [(0x10, 0x70)]
    profile = aot._loop_profile(instructions, 0x10, 0x70, [(0x40, 0x50)])
    assert profile["instructions"] == 5 and profile["mufu"] == 1 and profile["global_loads"] == 1
    assert profile["global_stores"] == 1


# sm_100's mbarrier waits: a wait inside the loop (0x20) that fails jumps to an out-of-line stub after the
# kernel's end (0x80-0xa0), which spins and jumps back into the loop (0xa0 -> 0x30)
STUB_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/              @!P0 BRA 0x80 ;
        /*0030*/                   FFMA R5, R2, R5, R6 ;
        /*0040*/                   STG.E desc[UR4][R8.64], R5 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   STG.E desc[UR4][R8.64], R5 ;
        /*0070*/                   EXIT ;
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5], R3 ;
        /*0090*/              @!P0 BRA 0x80 ;
        /*00a0*/                   BRA 0x30 ;
"""


def test_a_jump_back_from_an_out_of_line_stub_is_not_a_token_loop():
    """0x30-0xa0 crosses the loop 0x10-0x50 instead of nesting in it: the stub's return, not a loop."""
    assert aot.token_loops(aot.parse_sass(STUB_SASS)) == [(0x10, 0x50)]


# a loop that loads and stores nothing (0x10-0x30: a split's pass rebuilding its state), then a token loop
REBUILD_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R5, R2, R5, R6 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0050*/                   STG.E desc[UR4][R8.64], R5 ;
        /*0060*/               @P1 BRA 0x40 ;
        /*0070*/                   EXIT ;
"""


def test_rebuild_loops_load_and_store_nothing():
    """0x10-0x30 is a rebuild loop; neither a token loop, nor a loop inside one (``SASS``'s 0x40-0x50),
    nor a loop without loads (its 0x80-0x90) is."""
    instructions = aot.parse_sass(REBUILD_SASS)
    assert aot.rebuild_loops(instructions) == [(0x10, 0x30)]
    assert aot.token_loops(instructions) == [(0x40, 0x60)]
    assert aot.rebuild_loops(aot.parse_sass(SASS)) == []


def _binary(**overrides) -> aot.Binary:
    values = dict(
        arch="sm_90", registers=64, spill_bytes=0, local_bytes=0, shared_bytes=0, num_warps=1,
        loops=[{"instructions": 100, "mufu": 32}], other_instructions=0, ctas_per_sm=16,
        occupancy_limit="registers", launchable=True, why_not="",
    )  # fmt: skip
    return aot.Binary(**{**values, **overrides})


def _launch(programs: int, steps: int = 100) -> KernelLaunch:
    work = LaunchWork(token_steps=steps, exp=programs * steps * 32 * 32, bytes_min=1, bytes_moved=1)
    return KernelLaunch(kernel=None, grid=(programs,), args={}, constexprs={}, num_warps=1, work=work)


def test_estimate_follows_its_stated_model():
    """Issue-bound: 132 SMs x 16 resident one-warp programs = one full wave, 4 warps per scheduler, 100
    instructions an iteration -> max(4 x 100, 100 + 600) = 700 cycles; at 8 warps per scheduler -> 800.
    The SFU floor: every exponential of the work on 16 lanes per SM per clock."""
    spec = aot.ARCHS["sm_90"]
    cycles_per_ms = spec.clock_ghz * 1e6
    one_wave = aot.estimate(_binary(), _launch(132 * 16))
    assert one_wave["issue_ms"] == pytest.approx(100 * 700 / cycles_per_ms)
    busy = aot.estimate(_binary(ctas_per_sm=32), _launch(132 * 32))
    assert busy["issue_ms"] == pytest.approx(100 * 800 / cycles_per_ms)
    # two waves cost twice one
    assert aot.estimate(_binary(), _launch(2 * 132 * 16))["issue_ms"] == pytest.approx(
        2 * one_wave["issue_ms"]
    )
    exps = 132 * 16 * 100 * 32 * 32
    assert one_wave["sfu_floor_ms"] == pytest.approx(exps / (132 * 16) / cycles_per_ms)
    assert one_wave["est_ms"] == max(one_wave["issue_ms"], one_wave["sfu_ms"], one_wave["memory_ms"])


def test_estimate_prices_rebuild_loops_at_their_steps():
    """``rebuild_steps`` iterations of the rebuild loops together, at the costliest one's price (a
    program runs some of each): 10 x max(4 x 60, 60 + 600) cycles beside the token loop's 100 x 700."""
    spec = aot.ARCHS["sm_90"]
    rebuilds = [{"instructions": 40, "mufu": 0}, {"instructions": 60, "mufu": 0}]
    launch = _launch(132 * 16)
    launch.work = dataclasses.replace(launch.work, rebuild_steps=10)
    priced = aot.estimate(_binary(rebuild_loops=rebuilds), launch)
    assert priced["issue_ms"] == pytest.approx((100 * 700 + 10 * 660) / (spec.clock_ghz * 1e6))


# a chunk loop (0x10-0x90) around two token loops (0x20-0x40, 0x50-0x70), with instructions of its own
NESTED_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R5, R2, R5, R6 ;
        /*0030*/                   STG.E desc[UR4][R8.64], R5 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0060*/                   STG.E desc[UR4][R8.64], R5 ;
        /*0070*/               @P1 BRA 0x50 ;
        /*0080*/                   FADD R5, R5, R2 ;
        /*0090*/               @P2 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""


def test_the_loop_around_the_token_loops_is_found_and_priced():
    """The chunk loop's own instructions (0x10, 0x80, 0x90: 3) are charged ``chunk_steps`` times, each
    token loop its own count of iterations; a launch that describes another loop nest is refused."""
    instructions = aot.parse_sass(NESTED_SASS)
    assert aot.token_loops(instructions) == [(0x20, 0x40), (0x50, 0x70)]
    assert aot.chunk_loops(instructions) == [(0x10, 0x90)]
    assert aot.chunk_loops(aot.parse_sass(SASS)) == []
    chunk = aot._loop_profile(instructions, 0x10, 0x90, [(0x20, 0x40), (0x50, 0x70)])
    assert chunk["instructions"] == 3
    spec = aot.ARCHS["sm_90"]
    loops = [{"instructions": 3, "mufu": 0}, {"instructions": 3, "mufu": 0}]
    binary = _binary(loops=loops, chunk_loops=[chunk])
    launch = _launch(132 * 16)
    launch.work = dataclasses.replace(launch.work, token_steps=(20, 40), chunk_steps=10)
    priced = aot.estimate(binary, launch)
    # 4 warps a scheduler: max(4 x 3, 3 + 600) cycles an iteration of each loop
    assert priced["issue_ms"] == pytest.approx((20 + 40 + 10) * 603 / (spec.clock_ghz * 1e6))
    # a chunk loop that loads nothing waits for no DRAM: 4 x 3 cycles an iteration
    quiet = _binary(loops=loops, chunk_loops=[{**chunk, "global_loads": 0, "loads_used_in_iteration": 0}])
    assert aot.estimate(quiet, launch)["issue_ms"] == pytest.approx(
        ((20 + 40) * 603 + 10 * 12) / (spec.clock_ghz * 1e6)
    )
    launch.notes = {"tokens": 80}
    assert aot._instructions_per_token(binary, launch) == pytest.approx((20 * 3 + 40 * 3 + 10 * 3) / 80)
    launch.work = dataclasses.replace(launch.work, token_steps=(20, 40, 60))
    with pytest.raises(ValueError):
        aot.estimate(binary, launch)  # three counts for two loops


def _mamba_base_backward_for_sm90(length: int, batch: int) -> KernelLaunch:
    """The selective backward's production launch for De-focus Mamba-B (bf16, the op's default chunk),
    built on meta tensors as for an H100."""
    import torch

    from defocus_scale.kernels.launch import targeting
    from defocus_scale.kernels.selective import triton as selective

    act = torch.empty(batch, length, 1536, dtype=torch.bfloat16, device="meta")
    delta = torch.empty(batch, length, 1536, device="meta")
    A, D = torch.empty(1536, 16, device="meta"), torch.empty(1536, device="meta")
    B = torch.empty(batch, length, 16, device="meta")
    chunk = selective.DEFAULT_CHUNK
    with targeting(90):
        _, out, boundary = selective.forward_launch(act, delta, A, B, B, D, act, 64, chunk, 64, False, True)
        return selective.backward_launch(out, act, delta, A, B, B, D, act, boundary, 64, chunk, 64)[0]


def test_the_look_back_backward_compiles_for_sm90_without_spills():
    """De-focus Mamba-B at 577 tokens, batch 32 on an H100: 768 rows on 528 slots, so the backward
    chains two segments by look-back (the production launch); it compiles for sm_90 in the loop nest
    its launch describes, and spills nothing (the ticket is read back after the loops, not held)."""
    launch = _mamba_base_backward_for_sm90(577, 32)
    assert launch.constexprs["LOOKBACK"] and launch.grid == (32, 24, 2) and not launch.prelude
    record = aot.report_record(launch, "sm_90")
    assert record["spill_bytes"] == 0 and record["launchable"] and record["chunk_loops"]


def test_the_report_refuses_a_loop_nest_the_launch_does_not_describe(monkeypatch):
    """The selective backward at its default chunk runs its groups' loop inside the chunk loop; told
    that no loop encloses its token loops, the analysis refuses rather than miscount."""
    launch = _mamba_base_backward_for_sm90(197, 128)
    assert launch.work.chunk_steps == 25 and launch.work.token_steps == (50,)
    compiled = aot.compile_launch(launch, "sm_90")
    record = aot.report_record(launch, "sm_90")
    assert record["chunk_loops"] and record["spill_bytes"] == 0
    monkeypatch.setattr(aot, "_ANALYSED", {})
    launch.work = dataclasses.replace(launch.work, chunk_steps=0)
    with pytest.raises(RuntimeError, match="loop around them"):
        aot.analyse(compiled, launch, "sm_90")


def test_launch_signature_specialises_as_the_jit_does():
    """The report compiles the launcher's own launch: tensors become typed pointers, integers divisible
    by 16 are marked so, an integer equal to 1 becomes a constant unless the kernel says not to."""
    import torch

    from defocus_scale.kernels.selective import triton as selective

    act = torch.empty(2, 197, 128, dtype=torch.bfloat16, device="meta")
    f32 = dict(device="meta")
    A, D = torch.empty(128, 16, **f32), torch.empty(128, **f32)
    B = torch.empty(2, 197, 16, **f32)
    delta = act.float()
    launch, out, boundary = selective.forward_launch(act, delta, A, B, B, D, act, 64, 32, 64, False, True)
    signature, constexprs, attrs = launch.signature()
    assert signature["u_ptr"] == "*bf16" and signature["out_ptr"] == "*bf16"
    assert signature["delta_ptr"] == "*fp32" and signature["A_ptr"] == "*fp32"
    assert signature["length"] == "i32" and signature["channel_stride"] == "i32"  # do_not_specialize, = 1
    assert constexprs["GROUP_SIZE"] == 64 and constexprs["STATE"] == 16
    assert constexprs["channels"] == 128  # a compile-time constant of the kernel's
    length = launch.kernel.arg_names.index("length")
    assert (length,) not in attrs  # 197
    assert constexprs["chunks_per_segment"] == 1  # an integer equal to 1
    at_256, bc_256 = act.new_empty(2, 256, 128), B.new_empty(2, 256, 16)
    longer, _, _ = selective.forward_launch(
        at_256, at_256.float(), A, bc_256, bc_256, D, at_256, 64, 32, 64, False, True
    )
    assert longer.signature()[2][(length,)] == [["tt.divisibility", 16]]  # 256
    # 4 programs: the sequence is split (7 segments of one chunk, a local pass first), two warps a group
    assert launch.grid == (2, 2, 7) and launch.num_warps == 2 and len(launch.prelude) == 1
    assert boundary.shape == (2, 7, 16, 128) and out.dtype == torch.bfloat16


def test_loads_a_token_ahead_are_told_from_loads_read_in_their_iteration():
    """R2 is loaded and read in the same iteration; R8..R11 (a 128-bit load) only after the back-edge."""
    body = [
        (0x00, "LDG.E", "R2, desc[UR4][R4.64]"),
        (0x10, "FFMA", "R5, R2, R5, R6"),
        (0x20, "LDG.E.128", "R8, desc[UR4][R4.64+0x10]"),
        (0x30, "STG.E", "desc[UR4][R6.64], R5"),
        (0x40, "BRA", "0x0"),
    ]
    assert aot._loads_used_in_their_iteration(body) == 1
    body[3] = (0x30, "STG.E", "desc[UR4][R6.64], R10")
    assert aot._loads_used_in_their_iteration(body) == 2


def test_estimate_credits_loads_issued_a_token_ahead():
    """One warp per scheduler, 100 instructions: a latency-bound 100 + 600 cycles an iteration, or 600
    when no load is read in its own iteration."""
    cycles_per_ms = aot.ARCHS["sm_90"].clock_ghz * 1e6
    waiting = _binary(loops=[{"instructions": 100, "mufu": 0, "loads_used_in_iteration": 3}], ctas_per_sm=4)
    ahead = _binary(loops=[{"instructions": 100, "mufu": 0, "loads_used_in_iteration": 0}], ctas_per_sm=4)
    launch = _launch(132 * 4)
    assert aot.estimate(waiting, launch)["issue_ms"] == pytest.approx(100 * 700 / cycles_per_ms)
    assert aot.estimate(ahead, launch)["issue_ms"] == pytest.approx(100 * 600 / cycles_per_ms)


def test_an_op_in_several_passes_is_judged_on_their_sum():
    """Two passes of 1.6x the floor each are each under the 2x forward target, but the op (3.2x) is not."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import kernel_report
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    clean = dict(launchable=True, loop_local=0, spill_bytes=0, fills_gpu=True, floor_ms=1.0)
    passes = [dict(clean, est_ms=1.6, vs_floor=1.6), dict(clean, est_ms=1.6, vs_floor=1.6)]
    judged = kernel_report.judge_op(passes, "fwd", small_batch=False)
    assert [r["meets_target"] for r in judged] == [False, False]
    assert all(r["op_est_ms"] == pytest.approx(3.2) for r in judged)
    assert all(r["op_vs_floor"] == pytest.approx(3.2) for r in judged)
    one = kernel_report.judge_op([dict(clean, est_ms=1.6, vs_floor=1.6)], "fwd", small_batch=False)
    assert one[0]["meets_target"]
    spilling = [dict(clean, est_ms=0.5, vs_floor=0.5), dict(clean, est_ms=0.5, vs_floor=0.5, spill_bytes=8)]
    assert not any(r["meets_target"] for r in kernel_report.judge_op(spilling, "fwd", small_batch=False))
    # at the micro-batch of 2, the target is grids that fill the GPU, pass by pass
    small = [dict(clean, est_ms=9.0, vs_floor=9.0), dict(clean, est_ms=9.0, vs_floor=9.0, fills_gpu=False)]
    assert not any(r["meets_target"] for r in kernel_report.judge_op(small, "fwd", small_batch=True))


def test_bench_scan_sets_an_op_in_several_launches_beside_the_sum_of_their_estimates(monkeypatch):
    """bench_scan's estimate for a measured op is the sum over its launches (the split forward at a
    micro-batch of 2 has a prelude pass), not its last launch's. Compiling is faked: each launch's
    "estimate" is its number of programs."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_scan
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # bench_scan imports kernel_report lazily
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(aot, "available_archs", lambda: ["sm_80", "sm_90"])

    def fake_record(launch, arch):
        programs = 1
        for size in launch.grid:
            programs *= size
        return {"est_ms": float(programs), "floor_ms": 1.0}

    monkeypatch.setattr(aot, "report_record", fake_record)
    case = bench_scan.Case("selective", "Mamba-B mixer", 2, 197, 1536, 16, 64)
    fields = bench_scan._report_estimates(case, torch.bfloat16)
    import kernel_report

    from defocus_scale.kernels.launch import targeting

    with targeting(90):
        forward, backward = kernel_report.KERNELS["selective_scan"][1](1536, 197, 2, torch.bfloat16)
    assert forward.prelude, "the micro-batch forward is expected to run in several launches"
    for direction, launch in (("fwd", forward), ("bwd", backward)):
        parts = (*launch.prelude, launch)
        assert fields[f"est_{direction}_ms"] == sum(fake_record(part, "sm_90")["est_ms"] for part in parts)
