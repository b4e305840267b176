"""Ahead-of-time compilation of a :class:`~defocus_scale.kernels.launch.KernelLaunch` for a GPU this
machine does not have, and what its binary says: registers, spills, shared and local memory, occupancy,
the SASS of its token loops, and an estimated time beside the floors.

Triton compiles for any ``GPUTarget`` without a device; its wheel ships ``ptxas`` (register and spill
counts), ``cuobjdump`` (resource usage, SASS). Only documented hardware figures enter the estimate
(:data:`ARCHS`); the model is stated in :func:`estimate` and is an estimate, not a measurement.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .launch import KernelLaunch, LaunchWork


@dataclass(frozen=True)
class Arch:
    """Per-SM limits and the throughputs the estimate uses (vendor figures, SXM parts, boost clock)."""

    name: str
    capability: int
    gpu: str
    sms: int
    clock_ghz: float
    hbm_tb_s: float
    smem_per_block: int  # bytes a block may opt into
    smem_per_sm: int
    sfu_per_clk: int = 16  # MUFU lanes per SM per clock (ex2, rsq, rcp, sin ...)
    schedulers: int = 4  # warp instructions issued per SM per clock
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    mem_latency_cycles: int = 600  # a dependent global load, DRAM (the estimate's latency bound)


ARCHS = {
    "sm_80": Arch("sm_80", 80, "A100-SXM4-80GB", 108, 1.41, 2.039, 166_912, 167_936),
    "sm_90": Arch("sm_90", 90, "H100-SXM5-80GB", 132, 1.98, 3.35, 232_448, 233_472),
    "sm_100": Arch("sm_100", 100, "B200", 148, 1.965, 8.0, 232_448, 233_472),
}


def available_archs() -> list[str]:
    """The archs of :data:`ARCHS` the installed Triton can target (sm_100 needs its Blackwell ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    names = []
    for name, arch in ARCHS.items():
        try:
            path = get_ptxas(arch.capability).path
        except Exception:  # noqa: BLE001 - a missing tool means the arch is not targetable
            continue
        if path and Path(path).exists():
            names.append(name)
    return names


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (it ships with the triton wheel)")
    return found


@dataclass
class Binary:
    """One compiled kernel and what its resource usage and SASS say."""

    arch: str
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread (ptxas)
    local_bytes: int  # local memory per thread (stack frame included)
    shared_bytes: int  # static + dynamic shared memory per block
    num_warps: int
    loops: list[dict]  # the token loops: SASS instructions per iteration and what kind
    other_instructions: int  # static instructions outside the token loops
    ctas_per_sm: int
    occupancy_limit: str  # what bounds CTAs/SM
    launchable: bool
    why_not: str
    rebuild_loops: list[dict] = field(default_factory=list)  # loops that load and store nothing
    # the loops enclosing the token loops: their own instructions (outside the loops they hold)
    chunk_loops: list[dict] = field(default_factory=list)


def compile_launch(launch: KernelLaunch, arch: str):
    """Compile for ``arch`` (e.g. ``"sm_90"``); returns Triton's compiled kernel (``asm``, ``metadata``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    signature, constexprs, attrs = launch.signature()
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return triton_compile(source, target=GPUTarget("cuda", ARCHS[arch].capability, 32), options=options)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` per instruction of a ``cuobjdump -sass`` listing."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _SASS_LINE.finditer(sass)]


def _backward_branches(instructions: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    loops = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    return loops


def _loops(instructions: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    branches = _backward_branches(instructions)
    # A backward branch that jumps from beyond a loop's end into that loop is the return of an
    # out-of-line block (sm_100's mbarrier wait-retry stubs: ``TRYWAIT; @!P BRA self; BRA back``), not a
    # loop of its own: its range crosses the loop's instead of nesting in it.
    return [b for b in branches if not any(o[0] < b[0] <= o[1] < b[1] for o in branches)]


def _innermost(loops: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Those of ``loops`` that hold none of the others, in address order."""

    def holds(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
        return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]

    return sorted(loop for loop in loops if not any(holds(loop, other) for other in loops))


def _innermost_with(instructions, loops: list[tuple[int, int]], opcode: str) -> list[tuple[int, int]]:
    return _innermost([
        loop for loop in loops
        if any(loop[0] <= a <= loop[1] and op.startswith(opcode) for a, op, _ in instructions)
    ])  # fmt: skip


def token_loops(instructions: list[tuple[int, str, str]], marker: str = "STG") -> list[tuple[int, int]]:
    """The address ranges of the token loops: the innermost loops (backward branches) that store to
    global memory (every token loop writes its tokens' outputs or gradients; ``marker`` "LDG" for a
    pass that writes nothing a token: the innermost loops that load). A loop nested inside one that
    stores nothing (libdevice's slow argument reduction of sin/cos) is part of it, not the loop."""
    return _innermost_with(instructions, _loops(instructions), marker)


def chunk_loops(instructions: list[tuple[int, str, str]], marker: str = "STG") -> list[tuple[int, int]]:
    """The loops that enclose token loops, the innermost such (a chunk loop around a group loop)."""
    loops = _loops(instructions)
    tokens = _innermost_with(instructions, loops, marker)
    return _innermost([
        loop for loop in loops
        if loop not in tokens and any(loop[0] <= t[0] and t[1] <= loop[1] for t in tokens)
    ])  # fmt: skip


def rebuild_loops(instructions: list[tuple[int, str, str]], marker: str = "STG") -> list[tuple[int, int]]:
    """The rebuild loops: the innermost loops that load from global memory and store nothing, outside
    the token loops (a split's pass over the chunks before it, accumulating the state it starts from)."""
    loops = _loops(instructions)
    tokens = _innermost_with(instructions, loops, marker)
    storing = [loop for loop in loops if any(t[0] >= loop[0] and t[1] <= loop[1] for t in tokens)]
    quiet = [loop for loop in loops if loop not in storing]
    return [
        loop for loop in _innermost_with(instructions, quiet, "LDG")
        if not any(t[0] <= loop[0] and loop[1] <= t[1] for t in tokens)
    ]  # fmt: skip


_REGISTER = re.compile(r"\bR(\d+)\b")


def _loads_used_in_their_iteration(body: list[tuple[int, str, str]]) -> int:
    """Global loads whose value the same iteration reads (a load one iteration ahead, read only after
    the back-edge, is not counted): register numbers of the destination, widened by ``.64``/``.128``."""
    used = 0
    for index, (_, opcode, operands) in enumerate(body):
        if not opcode.startswith("LDG"):
            continue
        first = _REGISTER.search(operands.split(",")[0])
        if not first:
            continue
        width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
        loaded = {int(first.group(1)) + i for i in range(width)}
        for _, later_op, later in body[index + 1 :]:
            sources = later if later_op.startswith("ST") else ",".join(later.split(",")[1:])
            if loaded & {int(r) for r in _REGISTER.findall(sources)}:
                used += 1
                break
    return used


def _loop_profile(instructions, lo: int, hi: int, nested: list[tuple[int, int]]) -> dict:
    def counted(address: int) -> bool:
        return lo <= address <= hi and not any(n[0] <= address <= n[1] for n in nested)

    full = [(a, op, operands) for a, op, operands in instructions if counted(a)]
    body = [(a, op) for a, op, _ in full]

    def count(*prefixes: str) -> int:
        return sum(op.startswith(prefixes) for _, op in body)

    return {
        "instructions": len(body),
        "mufu": count("MUFU"),
        "global_loads": count("LDG"),
        "global_stores": count("STG"),
        "shared": count("LDS", "STS"),
        "local": count("LDL", "STL"),
        "barriers": count("BAR"),
        "shuffles": count("SHFL"),
        "fp32_math": count("FFMA", "FMUL", "FADD", "FMNMX"),
        "mma": count("HMMA", "HGMMA", "IMMA"),
        "loads_used_in_iteration": _loads_used_in_their_iteration(full),
    }


_ANALYSED: dict[tuple[str, str], Binary] = {}


def analyse(compiled, launch: KernelLaunch, arch: str) -> Binary:
    """What ``compiled`` (a binary of ``launch``'s kernel for ``arch``) uses and how it loops (memoised
    per binary: shapes that differ only in runtime integers share one)."""
    key = (compiled.metadata.hash, arch)
    if key not in _ANALYSED:
        _ANALYSED[key] = _analyse(compiled, launch, arch)
    return _ANALYSED[key]


def _analyse(compiled, launch: KernelLaunch, arch: str) -> Binary:
    spec = ARCHS[arch]
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        # ptxas again, as Triton ran it, for the spill counts it prints with -v
        ptxas = [get_ptxas(spec.capability).path, "-v", "--regAllocOptLevel=2",
                 f"--gpu-name={sm_arch_from_capability(spec.capability)}"]  # fmt: skip
        log = subprocess.run([*ptxas, str(ptx), "-o", str(Path(tmp, "again.cubin"))], capture_output=True,
                             text=True, check=True).stderr  # fmt: skip
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = int(compiled.metadata.shared)
    instructions = parse_sass(sass)
    all_loops = _backward_branches(instructions)

    def profile(loops: list[tuple[int, int]]) -> list[dict]:
        return [
            _loop_profile(instructions, lo, hi,
                          [n for n in all_loops if n != (lo, hi) and lo <= n[0] and n[1] <= hi])
            for lo, hi in loops
        ]  # fmt: skip

    work = launch.work
    marker = work.token_marker if work is not None else "STG"
    profiles = profile(token_loops(instructions, marker))
    rebuilds = profile(rebuild_loops(instructions, marker))
    chunks = profile(chunk_loops(instructions, marker))
    described = None if work is None or isinstance(work.token_steps, int) else len(work.token_steps)
    nested = bool(chunks)
    if work is not None and (bool(work.chunk_steps) != nested or described not in (None, len(profiles))):
        raise RuntimeError(
            f"{launch.kernel.__name__} on {arch}: the launch describes {described or 'its'} token loops "
            f"and {'a' if work.chunk_steps else 'no'} loop around them; the binary has {len(profiles)} "
            f"and {len(chunks)}: the estimate would miscount (did the compiler unroll a loop?)"
        )
    # (rebuild loops stay in the prologue's count too)
    in_loops = sum(p["instructions"] for p in profiles + chunks)
    warps = launch.num_warps
    regs_per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "blocks": spec.max_blocks,
        "warps": spec.max_warps // warps,
        "registers": spec.regs_per_sm // (regs_per_warp * warps),
        "shared memory": spec.smem_per_sm // (shared + 1024) if shared else spec.max_blocks,
    }
    bound = min(limits, key=limits.get)
    why_not = ""
    if shared > spec.smem_per_block:
        why_not = f"needs {shared} B of shared memory per block, the {arch} limit is {spec.smem_per_block} B"
    elif limits[bound] < 1:
        why_not = f"not one block fits an SM ({bound})"
    return Binary(
        arch=arch, registers=registers, spill_bytes=spills, local_bytes=local, shared_bytes=shared,
        num_warps=warps, loops=profiles, other_instructions=len(instructions) - in_loops,
        ctas_per_sm=max(limits[bound], 0), occupancy_limit=bound, launchable=not why_not, why_not=why_not,
        rebuild_loops=rebuilds, chunk_loops=chunks,
    )  # fmt: skip


def estimate(binary: Binary, launch: KernelLaunch) -> dict:
    """Estimated time of one launch, and its floors, in ms.

    The model: an SM issues ``schedulers`` warp instructions per clock; its resident warps share them.
    A token loop's iteration (a rebuild loop's likewise: ``work.rebuild_steps`` iterations of the rebuild
    loops together, each at the costliest one's price; a chunk loop's own instructions, outside the token
    loops it holds, ``work.chunk_steps`` times) takes, per wave of resident programs, the larger
    of (a) the instructions of the warps sharing a scheduler and (b) one warp's own instructions plus
    one dependent DRAM load (``mem_latency_cycles``: the latency bound when too few warps hide it), or
    only the DRAM latency when no load in the loop is read in its own iteration (loads a token ahead
    overlap the step), or no latency when it loads nothing.
    Programs run in waves of ``ctas_per_sm`` per SM. Independently, the SFU pipe (MUFU instructions from
    the SASS) and HBM (``work.bytes_moved``) bound the launch; the estimate is the largest of the three.
    The floors are what any kernel must pay: the exponentials of the maths on the SFU, and every input
    read and every output written once over HBM (``work.bytes_min``). Not modelled: tensor-core
    throughput, L2 (all traffic is priced at HBM bandwidth), instruction latencies other than DRAM."""
    spec = ARCHS[binary.arch]
    work = launch.work
    cycles_per_ms = spec.clock_ghz * 1e6
    programs = launch.programs
    per_wave = spec.sms * max(binary.ctas_per_sm, 1)
    full_waves, rest = divmod(programs, per_wave)
    loop_cycles = 0.0
    waves = [(binary.ctas_per_sm, full_waves)] + ([(-(-rest // spec.sms), 1)] if rest else [])
    steps = list(zip(binary.loops, token_steps(binary, work), strict=True))
    steps += [(loop, work.chunk_steps) for loop in binary.chunk_loops]
    if binary.rebuild_loops:  # a program runs some of each: all its iterations at the costliest one's
        steps.append((max(binary.rebuild_loops, key=lambda loop: loop["instructions"]), work.rebuild_steps))
    for resident, count in waves:
        warps_per_scheduler = resident * binary.num_warps / spec.schedulers
        for loop, n_steps in steps:
            n = loop["instructions"]
            exposed = n if loop.get("loads_used_in_iteration", 1) else 0
            # (a body that loads nothing, e.g. a chunk loop's own boundary stores, waits for no DRAM)
            latency = spec.mem_latency_cycles if loop.get("global_loads", 1) else 0
            iteration = max(warps_per_scheduler * n, exposed + latency)
            loop_cycles += count * n_steps * iteration
    fixed = binary.other_instructions * (len(waves))  # prologue/epilogue, once per wave
    issue_ms = (loop_cycles + fixed) / cycles_per_ms
    mufu = sum(loop["mufu"] * n_steps for loop, n_steps in steps) * programs * binary.num_warps * 32
    sfu_ms = mufu / (spec.sms * spec.sfu_per_clk) / cycles_per_ms
    memory_ms = work.bytes_moved / (spec.hbm_tb_s * 1e9)
    sfu_floor = work.exp / (spec.sms * spec.sfu_per_clk) / cycles_per_ms
    memory_floor = work.bytes_min / (spec.hbm_tb_s * 1e9)
    est = max(issue_ms, sfu_ms, memory_ms)
    floor = max(sfu_floor, memory_floor)
    return {
        "est_ms": est, "issue_ms": issue_ms, "sfu_ms": sfu_ms, "memory_ms": memory_ms,
        "floor_ms": floor, "sfu_floor_ms": sfu_floor, "memory_floor_ms": memory_floor,
        "bound": max((("issue", issue_ms), ("sfu", sfu_ms), ("memory", memory_ms)), key=lambda p: p[1])[0],
        "vs_floor": est / floor if floor else float("inf"),
    }  # fmt: skip


def token_steps(binary: Binary, work: LaunchWork) -> list[int]:
    """Iterations per program of each of ``binary``'s token loops, as ``work`` gives them."""
    if isinstance(work.token_steps, int):
        return [work.token_steps] * len(binary.loops)
    return list(work.token_steps)


def _instructions_per_token(binary: Binary, launch: KernelLaunch) -> float:
    """SASS instructions a token costs in the token loops (and in the loop around them, where one is)."""
    if "tokens" not in launch.notes:
        in_loops = sum(loop["instructions"] for loop in binary.loops)
        return in_loops / launch.notes.get("tokens_per_iteration", 1)
    work = launch.work
    total = sum(loop["instructions"] * n for loop, n in zip(binary.loops, token_steps(binary, work)))
    total += sum(loop["instructions"] for loop in binary.chunk_loops) * work.chunk_steps
    return total / launch.notes["tokens"]


def report_record(launch: KernelLaunch, arch: str) -> dict:
    """Compile, analyse and estimate one launch: the report's record (without its identifying keys)."""
    binary = analyse(compile_launch(launch, arch), launch, arch)
    record = asdict(binary)
    record.update(estimate(binary, launch))
    work = launch.work
    record.update(
        programs=launch.programs, grid=list(launch.grid), token_steps=work.token_steps,
        bytes_moved=work.bytes_moved, bytes_min=work.bytes_min, exp=work.exp,
        instructions_per_token=_instructions_per_token(binary, launch),
        # local-memory accesses in the token loops: spills, or libdevice's sin/cos argument reduction
        loop_local=sum(loop["local"] for loop in binary.loops + binary.rebuild_loops),
        constexprs={k: str(v) for k, v in launch.constexprs.items()},
    )  # fmt: skip
    return record
