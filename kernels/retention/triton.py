"""The retention bandpass scan on Triton: ``torch.library`` custom ops (``defocus::retention_scan_triton_fwd``
and ``_bwd``) around ``triton_kernels.py``.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the Triton interpreter; slow, for tests). Nothing but the inputs is kept for backward.
bf16/fp16 inputs multiply on tensor cores in their own dtype with fp32 accumulation and an fp32 state.
fp32 inputs multiply on TF32 tensor cores when the user allows TF32 for matmuls
(``torch.backends.cuda.matmul.allow_tf32``, as torch's own fp32 matmuls decide), in full IEEE fp32 on
the FMA units otherwise, or as ``precision`` says. ``log_decay`` and ``theta`` are handed to the kernels in
fp32; the rotary's angles ``t theta`` and their cos/sin are computed once per call in fp32 (tables the
token loops read), the decay exponents inside the kernels in fp32.

The tunables (:class:`Tiling`: chunk, value block, split, warps, stages, precision) are launcher
parameters with defaults chosen from the shapes; the interpreter uses the same fixed defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from .. import autotune
from ..launch import KernelLaunch, LaunchWork, target_capability
from ..selective.triton import check_triton_device, device_guard
from .triton_kernels import _retention_bwd_kernel, _retention_fwd_kernel

_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# SMs of the GPU a launch targets when its tensors do not say (the kernel report's meta tensors under
# ``launch.targeting``: the SXM parts A100, H100, B200); unknown (the interpreter): the largest, B200's
_TARGET_SMS = {80: 108, 90: 132, 100: 148}
_DEFAULT_SMS = 148
# A forward program's cost with value blocks of 32 relative to one with 64, IEEE fp32 on the FMA units
# (chunks of 16, 8 warps; the sm_90 report's instructions per chunk, 573 / 936): q k^T, the loads and
# the rotation are paid per block, so halving the block saves ~40%, not 50%
_HALF_BLOCK_COST = 0.61


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _sm_count(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _TARGET_SMS.get(target_capability(t.device), _DEFAULT_SMS)


# A backward rebuild-loop iteration (one product: the state of a chunk outside the split) relative to a
# token-loop iteration of both walks, IEEE fp32 (the sm_90 report's instructions: 346 / (992 + 1549))
_REBUILD_COST = 0.14


def _split_cost(split: int, programs: int, num_chunks: int, sms: int) -> float:
    """The IEEE fp32 backward's issue time, in token-loop iterations, with its chunks cut into ``split``
    ranges: rounds of programs times the last program's own chunks and the chunks it rebuilds from."""
    per_split = -(-num_chunks // split)
    return _waves(programs * split, sms) * per_split * (1 + _REBUILD_COST * (split - 1))


def _waves(programs: int, sms: int) -> int:
    """Rounds of one program per SM: the time of an issue-bound launch in program times, whatever its
    CTAs per SM (``k`` resident programs share an SM's issue slots, so they take ``k`` program times)."""
    return -(-programs // sms)


def fp32_precision() -> str:
    """How fp32 inputs multiply: TF32 tensor cores when the user allows them for matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, as torch's own matmuls do), full IEEE fp32 otherwise."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@dataclass
class Tiling:
    """The tunables of one launch (an autotuner may pass any of them; ``None`` picks the default from the
    shapes). ``chunk``: tokens per chunk; ``block_v``: value dims per program; ``split``: chunk ranges
    handled by separate programs (small batches); ``precision``: ``"ieee"``/``"tf32"`` for fp32 inputs;
    ``passes``: the backward's walks in one launch (1) or two (2: dq, then dk and dv)."""

    chunk: int | None = None
    block_v: int | None = None
    split: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    precision: str | None = None
    passes: int | None = None

    def resolve(self, q: torch.Tensor, dv: int, backward: bool) -> Tiling:
        batch, length, heads, dk = q.shape
        interpreted = q.device.type == "cpu"
        fp32 = q.dtype == torch.float32
        precision = self.precision or (fp32_precision() if fp32 else "tf32")
        if interpreted:  # the interpreter cannot multiply 16-bit floats nor round to TF32 (see ``_mm``)
            precision = "emulate_tf32" if precision == "tf32" and fp32 else "ieee" if fp32 else "emulate"
        # Defaults from the kernel report (sm_80/90/100, RetNet heads of 64, the rotary's tiles in the loops
        # included): per operand kind and direction the (chunk, value block, warps) with the best estimate
        # among those that compile without spills on all three archs. The 16-bit backward of an unknown
        # GPU splits the value dims (fp32 dq/dk shares, summed by the op: ~5.6x the floor) because every
        # one-block, one-launch backward spills on sm_80 (the rotations' register tiles); the GPUs the
        # report targets have their own below.
        kind = "ieee" if fp32 and precision == "ieee" else "tf32" if fp32 else "tensor"
        default_chunk, default_block_v, default_warps = {
            ("tensor", False): (32, 64, 8), ("tensor", True): (16, 32, 4),
            ("tf32", False): (32, 64, 8), ("tf32", True): (16, 16, 4),
            ("ieee", False): (16, 64, 8), ("ieee", True): (16, 64, 8),
        }[kind, backward]  # fmt: skip
        capability = target_capability(q.device)
        if kind == "tensor" and backward and capability is not None and capability >= 90:
            # sm_90 and later compile the one-block backward without spills (sm_80 does not): no dq/dk
            # shares to write and sum (2.1x the floor on the H100 model instead of 5.6x)
            default_block_v = 64
        passes = self.passes or 1
        if kind == "tensor" and backward and capability is not None and capability < 90 and not self.passes:
            # sm_80 spills one-block backwards with both walks or the reverse walk whole: dq, dv and dk in
            # three launches of one block each, spill-free (2.8x the floor instead of 5.5x with shares)
            default_block_v, passes = 64, 3
        if kind == "tensor" and not backward and capability is not None and capability >= 100:
            # sm_100 compiles chunks of 64 without spills (sm_80 spills): 1.5x its floor instead of 2.8x
            default_chunk = 64
        if kind == "tensor" and backward and capability is not None and capability >= 100:
            # and the backward in chunks of 64 over 8 warps, spill-free: ~2.2-2.5x its floor, was 3.1-4.1x
            default_chunk, default_warps = 64, 8
        chunk = max(16, min(_next_power_of_2(self.chunk or default_chunk), _next_power_of_2(length)))
        block_v = max(16, min(_next_power_of_2(self.block_v or default_block_v), _next_power_of_2(dv)))
        sms, tasks = _sm_count(q), batch * heads

        def programs(chunk: int, block_v: int) -> int:
            return tasks * -(-dv // block_v) * -(-length // chunk)

        # small batches: value blocks of 32 (fp32: 16; the widths that compile without spills on sm_80),
        # shorter chunks, narrower value blocks, until one program per SM is possible (then chunk splits)
        if self.block_v is None and tasks * -(-dv // block_v) < sms:
            block_v = min(block_v, 16 if fp32 else 32)
        while self.chunk is None and chunk > 16 and programs(chunk, block_v) < sms:
            chunk //= 2
        while self.block_v is None and block_v > 16 and programs(chunk, block_v) < sms:
            block_v //= 2
        wide, narrow = tasks * -(-dv // 64), tasks * -(-dv // 32)
        if (self.block_v is None and kind == "ieee" and not backward and block_v == 64 and dv > 32
                and _waves(narrow, sms) * _HALF_BLOCK_COST < _waves(wide, sms)):  # fmt: skip
            # wave quantisation: e.g. 192 programs on 132 SMs take two rounds, the second 45% full;
            # 384 half-width programs take three rounds of ~0.6 the time (RetNet-S, 577 tokens, sm_90)
            block_v = 32
        num_v = -(-dv // block_v)
        num_chunks = -(-length // chunk)
        split = self.split
        if split is None:  # fill the GPU: one program per SM at least, splitting the chunks
            split = min(num_chunks, -(-sms // (tasks * num_v)))
            # ... counted after rounding to equal ranges (7 chunks in 6 splits are 4 ranges of 2)
            while split < num_chunks and tasks * num_v * -(-num_chunks // -(-num_chunks // split)) < sms:
                split += 1
            if kind == "ieee" and backward and split == 1:
                split = min(range(1, 5), key=lambda n: _split_cost(n, tasks * num_v, num_chunks, sms))
        split = max(1, min(split, num_chunks))
        per_split = -(-num_chunks // split)
        split = -(-num_chunks // per_split)  # no empty split
        num_warps = self.num_warps or default_warps
        passes = passes if backward else 1
        return Tiling(chunk, block_v, split, num_warps, self.num_stages or 1, precision, passes)


def _constexprs(tiling: Tiling, q: torch.Tensor, dv: int, has_theta: bool) -> dict:
    dk = q.shape[-1]
    block_k = max(16, _next_power_of_2(dk))
    return dict(DK=dk, DV=dv, BLOCK_T=tiling.chunk, BLOCK_K=block_k, BLOCK_V=tiling.block_v,
                HAS_THETA=has_theta, DOT_DTYPE=_DOT_DTYPES[q.dtype], PRECISION=tiling.precision)  # fmt: skip


def angle_tables(q: torch.Tensor, theta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``t theta``, ``(length, heads, dk / 2)`` fp32: the rotary's angles as the
    reference computes them (fp32 positions times fp32 theta), once per call instead of in the token loops
    (a stand-in pair of empty tensors without ``theta``)."""
    if theta is None:
        empty = torch.empty(1, dtype=torch.float32, device=q.device)
        return empty, empty
    angles = torch.arange(q.shape[1], device=q.device, dtype=torch.float32)[:, None, None] * theta.float()
    return angles.cos(), angles.sin()


def _table_bytes(
    tables: tuple[torch.Tensor, torch.Tensor], programs: int, has_theta: bool
) -> tuple[int, int]:
    """Bytes of the angle tables: read once at least; every (batch, head, value block) program reads its
    head's rows (the L2 would hold them; priced at HBM like all traffic of the report's model)."""
    if not has_theta:
        return 0, 0
    once = sum(t.numel() * t.element_size() for t in tables)
    heads = tables[0].shape[1]
    return once, programs * once // heads


def forward_launch(
    q, k, v, log_decay, theta=None, tiling: Tiling | None = None
) -> tuple[KernelLaunch, torch.Tensor]:
    """The forward kernel's launch for these contiguous inputs and the output it writes; also what
    ``benchmarks/kernel_report.py`` compiles."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    tiling = (tiling or Tiling()).resolve(q, dv, backward=False)
    num_chunks = -(-length // tiling.chunk)
    per_split = -(-num_chunks // tiling.split)
    num_v = -(-dv // tiling.block_v)
    has_theta = theta is not None
    cos, sin = angle_tables(q, theta)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    table_once, table_reads = _table_bytes((cos, sin), batch * num_v * tiling.split * heads, has_theta)
    io = sum(t.numel() * t.element_size() for t in (q, k, v, out)) + table_once
    qk_bytes = (q.numel() + k.numel()) * q.element_size()
    # q and k are read once per value block; a split re-reads the keys and values of the chunks before it
    kv_bytes = sum(t.numel() * t.element_size() for t in (k, v))
    reread = tiling.split * (tiling.split - 1) / 2 * per_split / num_chunks * kv_bytes
    moved = io - table_once + table_reads + (num_v - 1) * qk_bytes + reread
    launch = KernelLaunch(
        _retention_fwd_kernel, (batch * heads, num_v, tiling.split),
        dict(q_ptr=q, k_ptr=k, v_ptr=v, log_decay_ptr=log_decay, cos_ptr=cos, sin_ptr=sin, o_ptr=out,
             length=length, heads=heads, num_chunks=num_chunks, chunks_per_split=per_split),
        _constexprs(tiling, q, dv, has_theta), num_warps=tiling.num_warps, num_stages=tiling.num_stages,
        # the token loop's iterations, and the last split's re-reading of the chunks before it (the
        # rebuild loop)
        work=LaunchWork(token_steps=per_split, rebuild_steps=(tiling.split - 1) * per_split, exp=0,
                        bytes_min=io, bytes_moved=int(moved)),
        notes={"tokens_per_iteration": tiling.chunk, "precision": tiling.precision},
    )  # fmt: skip
    return launch, out


def backward_launch(dout, q, k, v, log_decay, theta=None, tiling: Tiling | None = None):
    """The backward's launch and the tensors it writes (gradients or per-program partial sums). With
    ``tiling.passes == 2`` the walks run in two launches, dq first (the returned launch's prelude), then
    dk and dv."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    tiling = (tiling or Tiling()).resolve(q, dv, backward=True)
    num_chunks = -(-length // tiling.chunk)
    per_split = -(-num_chunks // tiling.split)
    num_v = -(-dv // tiling.block_v)
    has_theta = theta is not None
    cos, sin = angle_tables(q, theta)
    f32 = dict(dtype=torch.float32, device=q.device)
    if num_v == 1:  # the kernel writes the final gradients directly
        dq, dk_ = torch.empty_like(q), torch.empty_like(k)
    else:  # one fp32 share per value block, summed by the caller
        dq, dk_ = torch.empty(num_v, *q.shape, **f32), torch.empty(num_v, *k.shape, **f32)
    passes = tiling.passes
    partials = (passes * tiling.split, num_v, batch, heads)  # a launch's programs write a slice each
    grads = dict(dq=dq, dk=dk_, dv=torch.empty_like(v), dlog_decay=torch.empty(partials, **f32),
                 dtheta=torch.empty(*partials, dk // 2, **f32) if has_theta else None)  # fmt: skip
    programs = batch * num_v * tiling.split * heads
    table_once, table_reads = _table_bytes((cos, sin), programs, has_theta)
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    # at least: the inputs read once, the gradients written once in their dtype (not the shares)
    io = size(dout, q, k, v, q, k, v) + table_once
    # each walk of each value block's programs reads all of q and k and their block of v and dout and the
    # angle tables; the forward walk writes dq, the reverse walk dv and dk (fp32 shares when there are
    # several value blocks, then read and summed by the op); a split re-reads k, v of the chunks before
    # it (forward walk) and q, dout of the chunks after it (reverse walk). In several launches, each
    # walks the chunks for its gradients.
    summed = size(dq, dk_) + size(q, k) if num_v > 1 else 0
    reads = num_v * size(q, k) + size(v, dout) + table_reads
    reread = tiling.split * (tiling.split - 1) / 2 * per_split / num_chunks
    reverse = reread * size(q, dout)
    walks = {  # bytes moved by a launch computing (dq, dv, dk)
        (True, True, True): 2 * reads + size(dq, dk_, v) + summed + reread * size(dout, q, k, v),
        (True, False, False): reads + size(dq) + reread * size(k, v),
        (False, True, True): reads + size(dk_, v) + summed + reverse,
        (False, True, False): reads + reverse,  # q, k, dout read (v not), dv written: as many bytes
        (False, False, True): reads + size(dk_) + summed + reverse,
    }
    shares = {1: [(True, True, True)], 2: [(True, False, False), (False, True, True)],
              3: [(True, False, False), (False, True, False), (False, False, True)]}[passes]  # fmt: skip
    launches = []
    for index, (queries, values, keys) in enumerate(shares):
        part = slice(index * tiling.split, (index + 1) * tiling.split)
        moved = walks[queries, values, keys]
        launches.append(KernelLaunch(
            _retention_bwd_kernel, (batch * heads, num_v, tiling.split),
            dict(q_ptr=q, k_ptr=k, v_ptr=v, log_decay_ptr=log_decay, cos_ptr=cos, sin_ptr=sin, do_ptr=dout,
                 dq_ptr=dq, dk_ptr=dk_, dv_ptr=grads["dv"], dlog_decay_ptr=grads["dlog_decay"][part],
                 dtheta_ptr=grads["dtheta"][part] if has_theta else grads["dlog_decay"], batch=batch,
                 length=length, heads=heads, num_chunks=num_chunks, chunks_per_split=per_split),
            {**_constexprs(tiling, q, dv, has_theta), "QUERIES": queries, "VALUES": values, "KEYS": keys},
            num_warps=tiling.num_warps, num_stages=tiling.num_stages,
            # the rebuild loops read the chunks outside the split once (the shortest, last split has the
            # most of them); every pass carries the op's floor (bytes_min)
            work=LaunchWork(token_steps=per_split, rebuild_steps=(tiling.split - 1) * per_split, exp=0,
                            bytes_min=io, bytes_moved=int(moved)),
            notes={"tokens_per_iteration": tiling.chunk, "precision": tiling.precision},
        ))  # fmt: skip
    launch = launches[-1]
    launch.prelude = tuple(launches[:-1])
    return launch, grads


# The autotune space: a few changes to the shape-chosen default, one tunable at a time (chunk length, value
# block, warps); the split and the precision stay the default's.
_CANDIDATE_CHANGES = {
    False: ({"chunk": 64}, {"chunk": 16}, {"num_warps": 4}, {"num_warps": 8}),
    True: ({"block_v": 64}, {"block_v": 32}, {"chunk": 32}, {"num_warps": 8}),
}


def tiling_candidates(q: torch.Tensor, dv: int, backward: bool, tiling: Tiling) -> list[Tiling]:
    """``tiling`` (the default when it fixes nothing) first, then, if it leaves everything to the
    defaults, the changes of ``_CANDIDATE_CHANGES`` that resolve to a different launch."""
    candidates = [tiling]
    if tiling == Tiling():
        resolved = [tiling.resolve(q, dv, backward)]
        for change in _CANDIDATE_CHANGES[backward]:
            candidate = Tiling(**change)
            if candidate.resolve(q, dv, backward) not in resolved:
                resolved.append(candidate.resolve(q, dv, backward))
                candidates.append(candidate)
    return candidates


def _choose(name: str, q: torch.Tensor, dv: int, backward: bool, tiling: Tiling, build) -> Tiling:
    """The tiling to launch with: the caller's when it fixes any tunable, else ``autotune``'s pick."""
    if tiling != Tiling():
        return tiling
    precision = tiling.precision or (fp32_precision() if q.dtype == torch.float32 else "")
    key = (tuple(q.shape), dv, q.dtype, precision)
    chosen = autotune.choose(
        name, key, vars(tiling), lambda: [vars(c) for c in tiling_candidates(q, dv, backward, tiling)],
        lambda params: build(Tiling(**params)).run, q.device,
    )  # fmt: skip
    return Tiling(**chosen)


# --- torch.library custom ops (``custom_op`` rather than ``triton_op``: see ``selective/triton.py``) ------
# The forward keeps nothing but its inputs; the backward is a second op. ``log_decay`` and ``theta``
# arrive in fp32; ``dtheta`` is an empty tensor without ``theta``. The tiling travels as plain ints and a
# string (0 / "": the default).


def _tiling(chunk_size: int, block_v: int, split: int, num_warps: int, precision: str) -> Tiling:
    ints = (chunk_size, block_v, split, num_warps)
    return Tiling(*(n or None for n in ints), None, precision or None)


@torch.library.custom_op("defocus::retention_scan_triton_fwd", mutates_args=())
def retention_scan_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    chunk_size: int,
    block_v: int,
    split: int,
    num_warps: int,
    precision: str,
) -> torch.Tensor:
    """``(batch, length, heads, dv)`` in ``v``'s dtype from contiguous inputs."""
    tiling = _tiling(chunk_size, block_v, split, num_warps, precision)
    with device_guard(q):
        build = lambda t: forward_launch(q, k, v, log_decay, theta, t)[0]  # noqa: E731
        tiling = _choose("retention_fwd", q, v.shape[-1], False, tiling, build)
        launch, out = forward_launch(q, k, v, log_decay, theta, tiling)
        launch.run()
    return out


@retention_scan_triton_fwd.register_fake
def _(q, k, v, log_decay, theta, chunk_size, block_v, split, num_warps, precision):
    return v.new_empty(v.shape)


@torch.library.custom_op("defocus::retention_scan_triton_bwd", mutates_args=())
def retention_scan_triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    chunk_size: int,
    block_v: int,
    split: int,
    num_warps: int,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dlog_decay, dtheta)``, each in its input's dtype (``dtheta`` empty without theta)."""
    tiling = _tiling(chunk_size, block_v, split, num_warps, precision)
    dout = dout.contiguous()
    with device_guard(q):
        build = lambda t: backward_launch(dout, q, k, v, log_decay, theta, t)[0]  # noqa: E731
        tiling = _choose("retention_bwd", q, v.shape[-1], True, tiling, build)
        launch, grads = backward_launch(dout, q, k, v, log_decay, theta, tiling)
        launch.run()
    dq, dk_ = grads["dq"], grads["dk"]
    if dq.dim() == 5:  # one fp32 share per value block
        dq, dk_ = dq.sum(0).to(q.dtype), dk_.sum(0).to(k.dtype)
    grad_theta = grads["dtheta"].sum((0, 1, 2)).to(theta.dtype) if theta is not None else q.new_empty(0)
    return dq, dk_, grads["dv"], grads["dlog_decay"].sum((0, 1, 2)).to(log_decay.dtype), grad_theta


@retention_scan_triton_bwd.register_fake
def _(dout, q, k, v, log_decay, theta, chunk_size, block_v, split, num_warps, precision):
    grad_theta = theta.new_empty(theta.shape) if theta is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), \
        log_decay.new_empty(log_decay.shape), grad_theta  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_decay, theta, *config = inputs
    ctx.save_for_backward(q, k, v, log_decay, theta)
    ctx.config = config
    ctx.has_theta = theta is not None


def _backward(ctx, dout):
    q, k, v, log_decay, theta = ctx.saved_tensors
    dq, dk, dv, dlog_decay, dtheta = retention_scan_triton_bwd(dout, q, k, v, log_decay, theta, *ctx.config)
    return dq, dk, dv, dlog_decay, dtheta if ctx.has_theta else None, None, None, None, None, None


retention_scan_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def retention_scan_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    theta: torch.Tensor | None,
    *,
    chunk_size: int = 0,
    block_v: int = 0,
    split: int = 0,
    num_warps: int = 0,
    precision: str = "",
) -> torch.Tensor:
    """Same contract as ``retention_scan_naive``, on Triton; differentiable in q, k, v, log_decay, theta.

    ``q, k: (batch, length, heads, dk)``, ``v: (batch, length, heads, dv)``, ``log_decay: (heads,)``
    (``< 0``), ``theta: (heads, dk // 2)`` or None -> ``(batch, length, heads, dv)`` in ``v``'s dtype.
    The tunables (0 / "": chosen from the shapes, see :class:`Tiling`): ``chunk_size`` (tokens per
    chunk) and ``block_v`` (value dims per program), rounded to powers of two >= 16; ``split`` (chunk
    ranges in separate programs); ``num_warps``; ``precision`` of fp32 inputs (``"ieee"``, ``"tf32"``).
    """
    check_triton_device(dict(q=q, k=k, v=v, log_decay=log_decay, theta=theta))
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be (batch, length, heads, dk) and v (batch, length, heads, dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, length, heads, dk = q.shape
    if min(batch, length, heads, v.shape[-1]) < 1 or dk < 2 or dk % 2:
        raise ValueError(
            f"need non-empty inputs and an even dk >= 2, got q {tuple(q.shape)}, v {tuple(v.shape)}"
        )
    if log_decay.shape != (heads,):
        raise ValueError(f"log_decay must be (heads={heads},), got {tuple(log_decay.shape)}")
    if theta is not None and theta.shape != (heads, dk // 2):
        raise ValueError(f"theta must be (heads={heads}, dk/2={dk // 2}), got {tuple(theta.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if min(chunk_size, block_v, split, num_warps) < 0 or precision not in ("", "ieee", "tf32"):
        raise ValueError(f"bad tiling: {chunk_size=}, {block_v=}, {split=}, {num_warps=}, {precision=}")
    # the decay and the angles enter the ops in fp32 whatever their dtype; converted here, outside the
    # op, so autograd hands their gradients back in the caller's dtype
    q, k, v, log_decay = (t.contiguous() for t in (q, k, v, log_decay.float()))
    theta = theta.float().contiguous() if theta is not None else None
    tiling = (chunk_size, block_v, split, num_warps, precision)
    return retention_scan_triton_fwd(q, k, v, log_decay, theta, *tiling)
