"""Fast PyTorch operators vs their naive definitions, forward + backward, at the base models' shapes.

    python benchmarks/bench_ops_cpu.py [--batch 8] [--repeats 3] [--smoke] [--out FILE]

Shapes: De-focus Mamba-B mixer (channels 1536, state 16), De-focus RetNet-B (12 heads of 64),
De-focus ViT-B (12 heads of 64), all at 197 tokens (224 px, patch 16, class token). Each row times
the forward and the backward of one call (fastest of ``repeats``), measured side by side in one run.

The selective scan also gets a measured floor (``selective_scan_floor`` in the JSON): this machine's
fp32 ``exp`` and FMA throughput per core times the threads (numba micro-benchmarks on L1-resident
arrays, the scan kernel's own ``exp``; best of before and after the rows), times the scan's operation
count: per (token, channel, state) update the forward needs one ``exp`` and 6 flops, the backward 15
more flops (the adjoint and the five gradients) if it could reuse the forward's decays and states. The
``cpu`` kernel recomputes them instead (one more ``exp`` and 3 flops: storing them would move 8 bytes
per update through memory), so the JSON also states that "recompute" floor. The strict floor is no floor
an algorithm can reach here: reading the forward's decays and states means writing them (2 x 4 bytes per
update) and reading them back, 16 bytes per update through memory. So the JSON also measures this
machine's memory bandwidth (a copy between two 64 MiB arrays on all the threads, bytes read plus bytes
written per second; best of before and after the rows, as the rest) and states the store floor (the strict
one plus that traffic at that bandwidth) and the stated floor, the lower of the store and the recompute
floors: what the best of the two algorithms could reach. The floors ignore the compulsory traffic (the
inputs, outputs and chunk bounds, alike in both algorithms) and the rotary and epilogue around the scan:
the ``selective_scan_raw`` rows time the scan alone, the ``selective_scan`` rows the whole operator
(rotary, scan, group norm, ``D``, gate).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

# first, before torch: it caps OpenMP's spin as in the CLI's processes (defocus_scale/__init__)
import defocus_scale  # noqa: F401

# isort: split
import numba
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import write_result  # noqa: E402

from defocus_scale.kernels import defocus_attention, retention_scan, selective_scan  # noqa: E402
from defocus_scale.kernels.selective import cpu_kernels  # noqa: E402
from defocus_scale.kernels.selective.reference import selective_scan_torch  # noqa: E402

# operations per (token, channel, state) update (see the module docstring)
FWD_FLOPS, BWD_FLOPS = 6, 15
RECOMPUTE_FLOPS = 3  # the backward recomputing a state: delta A, then decay * s + x B (and one exp)
_LANE = 4096  # fp32 elements per thread in the micro-benchmarks: 16 KiB, L1-resident like the scan's state
STORE_BYTES = 2 * 4 * 2  # per update, to read the forward's decay and state: fp32, written then read back
_STREAM = 1 << 24  # fp32 elements per array in the bandwidth micro-benchmark: 64 MiB, far beyond the caches


@numba.njit(parallel=True, fastmath=cpu_kernels._FASTMATH)
def _exp_kernel(threads, repeats):
    # one L1-resident lane per thread, as the scan's state; accumulating (one add per exp) keeps LLVM
    # from hoisting the repeated, loop-invariant exp
    total = 0.0
    for w in numba.prange(threads):
        x, x2, acc = np.empty(_LANE, np.float32), np.empty(_LANE, np.float32), np.zeros(_LANE, np.float32)
        for i in range(_LANE):
            x[i] = -np.float32(i % 97) * np.float32(0.04)  # decay exponents in [-3.9, 0]
            x2[i] = x[i] * np.float32(cpu_kernels.LOG2E)
        for _ in range(repeats):
            for i in range(_LANE):  # the scan's own decay: exp(delta A) with delta = 1
                acc[i] += cpu_kernels._decay(np.float32(1.0), x[i], x2[i])
        total += acc[w % _LANE]
    return total


@numba.njit(parallel=True, fastmath=cpu_kernels._FASTMATH)
def _fma_kernel(threads, repeats):
    total = 0.0
    for w in numba.prange(threads):
        v = np.ones(_LANE, np.float32)
        for _ in range(repeats):
            for i in range(_LANE):  # independent lanes: throughput, not latency, bound
                v[i] = v[i] * np.float32(0.999) + np.float32(1e-3)
        total += v[w % _LANE]
    return total


@numba.njit(parallel=True)
def _copy_kernel(src, dst, threads):
    # one contiguous slice per thread, as the scan's tasks stream their rows
    for w in numba.prange(threads):
        for i in range(w * src.shape[0] // threads, (w + 1) * src.shape[0] // threads):
            dst[i] = src[i]


def _best_rate(kernel, count: int, repeats: int = 5) -> float:
    kernel()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        kernel()
        best = min(best, time.perf_counter() - start)
    return count / best


def measure_floor(updates: int, threads: int) -> dict:
    """Measured exp/s and flop/s of one core times ``threads``, and the scan's floor for ``updates``."""
    # per core, on one thread, then times ``threads``: on a shared machine a two-thread measurement is
    # as slow as its most disturbed thread, and the floor is meant to be what the cores can do
    numba.set_num_threads(1)
    reps = 2000
    exp_rate = threads * _best_rate(lambda: _exp_kernel(1, reps), _LANE * reps)
    fma_rate = threads * 2 * _best_rate(lambda: _fma_kernel(1, reps), _LANE * reps)
    numba.set_num_threads(threads)
    # bandwidth is shared by the cores, so measured on all the threads at once (not per core times threads)
    src, dst = np.ones(_STREAM, np.float32), np.zeros(_STREAM, np.float32)
    bandwidth = _best_rate(lambda: _copy_kernel(src, dst, threads), 2 * 4 * _STREAM)
    fwd = updates / exp_rate + updates * FWD_FLOPS / fma_rate
    strict = fwd + updates * BWD_FLOPS / fma_rate
    recompute = fwd + updates / exp_rate + updates * (BWD_FLOPS + RECOMPUTE_FLOPS) / fma_rate
    store = strict + updates * STORE_BYTES / bandwidth
    return {
        "threads": threads, "updates": updates,
        "exp_per_s": exp_rate, "exp_per_s_per_thread": exp_rate / threads,
        "flop_per_s": fma_rate, "flop_per_s_per_thread": fma_rate / threads,
        "flops_per_update_forward": FWD_FLOPS, "flops_per_update_backward": BWD_FLOPS,
        "forward_ms": fwd * 1e3,
        "forward_backward_ms": strict * 1e3,
        # the same with the backward recomputing the states instead of reading them (what the ``cpu``
        # kernel does, since storing them would move 2 x 4 bytes per update through memory)
        "forward_backward_recompute_ms": recompute * 1e3,
        # the strict floor plus the memory traffic its stored decays and states need (module docstring)
        "memory_bytes_per_s": bandwidth, "store_bytes_per_update": STORE_BYTES,
        "forward_backward_store_ms": store * 1e3,
        "forward_backward_stated_ms": min(store, recompute) * 1e3,
    }  # fmt: skip


def _time_call(
    run: Callable[[], torch.Tensor], inputs: list[torch.Tensor], repeats: int
) -> tuple[float, float]:
    forward, backward = [], []
    for _ in range(repeats + 1):  # the first call warms up allocators and is dropped
        for tensor in inputs:
            tensor.grad = None
        start = time.perf_counter()
        out = run()
        middle = time.perf_counter()
        out.backward(torch.ones_like(out))
        end = time.perf_counter()
        forward.append(middle - start)
        backward.append(end - middle)
    # the fastest repeat: the least disturbed by other load on a shared machine
    return min(forward[1:]), min(backward[1:])


def _operator_cases(batch: int, length: int, smoke: bool) -> list[tuple[str, list[torch.Tensor], dict]]:
    g = torch.Generator().manual_seed(0)
    channels, state = (64, 4) if smoke else (1536, 16)
    heads, head_dim = (2, 16) if smoke else (12, 64)
    scan = [
        torch.randn(batch, length, channels, generator=g),
        torch.rand(batch, length, channels, generator=g) * 0.1,
        -torch.rand(channels, state, generator=g) * 4,
        torch.randn(batch, length, state, generator=g),
        torch.randn(batch, length, state, generator=g),
        torch.rand(state, generator=g),
        torch.ones(channels),
        torch.randn(batch, length, channels, generator=g),
    ]
    qkv = [torch.randn(batch, length, heads, head_dim, generator=g) for _ in range(3)]
    retention = [*qkv, -torch.rand(heads, generator=g) * 0.1, torch.rand(heads, head_dim // 2, generator=g)]
    attention = [*qkv, torch.linspace(-4, 0, heads), torch.rand(heads, head_dim // 2, generator=g)]
    group = 16 if smoke else 64
    return [
        (f"selective_scan  b{batch} L{length} E{channels} N{state}", scan, {"group_size": group}),
        # the scan alone (no rotary, no epilogue): what the floor counts
        (f"selective_scan_raw b{batch} L{length} E{channels} N{state}", scan[:5], {}),
        (f"retention_scan  b{batch} L{length} H{heads} d{head_dim}", retention, {}),
        (f"defocus_attention b{batch} L{length} H{heads} d{head_dim}", attention, {}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.length, args.repeats = 2, 19, 1

    def raw_scan_call(backend: str) -> Callable:
        return lambda xs, kw: selective_scan(*xs[:5], backend=backend)

    def scan_call(backend: str) -> Callable:
        if backend == "doubling":  # the log-depth alternative to the sequential loop, for the record
            return lambda xs, kw: selective_scan_torch(
                *xs[:5], freq=xs[5], D=xs[6], z=xs[7], method="doubling", **kw
            )
        return lambda xs, kw: selective_scan(*xs[:5], freq=xs[5], D=xs[6], z=xs[7], backend=backend, **kw)

    variants = {
        "selective_scan": {"cpu": scan_call("cpu"), "torch": scan_call("torch"),
                           "doubling": scan_call("doubling"), "naive": scan_call("naive")},
        # no naive row: 70 s at these shapes, and the full operator's row already has it
        "selective_scan_raw": {"cpu": raw_scan_call("cpu"), "torch": raw_scan_call("torch")},
        "retention_scan": {b: (lambda xs, kw, b=b: retention_scan(*xs, backend=b))
                           for b in ("torch", "naive")},
        "defocus_attention": {b: (lambda xs, kw, b=b: defocus_attention(*xs, backend=b))
                              for b in ("sdpa", "naive")},
    }  # fmt: skip
    rows = []
    floor = None
    for label, tensors, kwargs in _operator_cases(args.batch, args.length, args.smoke):
        op = label.split()[0]
        inputs = [t.requires_grad_() for t in tensors]
        if op == "selective_scan":
            u, A = tensors[0], tensors[2]
            floor = measure_floor(u.numel() * A.shape[1], torch.get_num_threads())
        naive_f = naive_b = float("nan")
        if "naive" in variants[op]:
            naive_call = partial(variants[op]["naive"], inputs, kwargs)
            naive_f, naive_b = _time_call(naive_call, inputs, args.repeats)
        for backend, call in variants[op].items():
            if backend == "naive":
                continue
            fwd, bwd = _time_call(partial(call, inputs, kwargs), inputs, args.repeats)
            rows.append({
                "operator": op, "shape": label, "backend": backend,
                "forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3,
                "naive_forward_ms": naive_f * 1e3, "naive_backward_ms": naive_b * 1e3,
                "speedup_forward": naive_f / fwd,
                "speedup_forward_backward": (naive_f + naive_b) / (fwd + bwd),
            })  # fmt: skip

    # measured again after the rows (load on a shared machine varies): the faster of the two, the lower floor
    again = measure_floor(floor["updates"], floor["threads"])
    bandwidth = max(floor["memory_bytes_per_s"], again["memory_bytes_per_s"])
    floor = min(floor, again, key=lambda f: f["forward_backward_ms"])
    floor["memory_bytes_per_s"] = bandwidth  # the best of the two as well (see the module docstring)
    floor["forward_backward_store_ms"] = (
        floor["forward_backward_ms"] + floor["updates"] * STORE_BYTES / bandwidth * 1e3
    )
    floor["forward_backward_stated_ms"] = min(
        floor["forward_backward_store_ms"], floor["forward_backward_recompute_ms"]
    )
    scan_ops = ("selective_scan", "selective_scan_raw")
    scan_rows = [row for row in rows if row["operator"] in scan_ops]
    for row in scan_rows:  # the ratios the targets are stated in, within one operator's rows
        total = row["forward_ms"] + row["backward_ms"]
        torch_row = next(r for r in scan_rows if r["operator"] == row["operator"] and r["backend"] == "torch")
        row["vs_torch_forward"] = torch_row["forward_ms"] / row["forward_ms"]
        row["vs_torch_forward_backward"] = (torch_row["forward_ms"] + torch_row["backward_ms"]) / total
        row["over_floor_forward"] = row["forward_ms"] / floor["forward_ms"]
        row["over_floor_forward_backward"] = total / floor["forward_backward_ms"]
        row["over_recompute_floor_forward_backward"] = total / floor["forward_backward_recompute_ms"]
        row["over_stated_floor_forward_backward"] = total / floor["forward_backward_stated_ms"]

    table = Table(title=f"fast vs naive operators on CPU ({torch.get_num_threads()} threads)")
    columns = ("shape", "backend", "fwd ms", "bwd ms", "naive fwd ms", "naive bwd ms", "fwd x", "fwd+bwd x")
    for column in columns:
        table.add_column(column, justify="left" if column in ("shape", "backend") else "right")
    for row in rows:
        table.add_row(
            row["shape"], row["backend"], f"{row['forward_ms']:.1f}", f"{row['backward_ms']:.1f}",
            f"{row['naive_forward_ms']:.1f}", f"{row['naive_backward_ms']:.1f}",
            f"{row['speedup_forward']:.1f}", f"{row['speedup_forward_backward']:.1f}",
        )  # fmt: skip
    console = Console(width=150)
    console.print(table)
    scan_table = Table(title="selective scan vs the torch form and the measured floor")
    for column in ("operator", "backend", "fwd ms", "fwd+bwd ms", "torch / this fwd", "torch / this fwd+bwd",
                   "this / floor fwd", "this / floor fwd+bwd", "this / recompute floor",
                   "this / stated floor"):  # fmt: skip
        scan_table.add_column(column, justify="left" if column in ("operator", "backend") else "right")
    for row in scan_rows:
        scan_table.add_row(
            row["operator"], row["backend"], f"{row['forward_ms']:.1f}",
            f"{row['forward_ms'] + row['backward_ms']:.1f}",
            f"{row['vs_torch_forward']:.2f}", f"{row['vs_torch_forward_backward']:.2f}",
            f"{row['over_floor_forward']:.2f}", f"{row['over_floor_forward_backward']:.2f}",
            f"{row['over_recompute_floor_forward_backward']:.2f}",
            f"{row['over_stated_floor_forward_backward']:.2f}",
        )  # fmt: skip
    naive = next(r for r in scan_rows if r["operator"] == "selective_scan")
    scan_table.add_row(
        "selective_scan", "naive", f"{naive['naive_forward_ms']:.1f}",
        f"{naive['naive_forward_ms'] + naive['naive_backward_ms']:.1f}", *[""] * 6,
    )  # fmt: skip
    scan_table.add_row(
        "(scan alone)", "floor", f"{floor['forward_ms']:.1f}", f"{floor['forward_backward_ms']:.1f}",
        "", "", "1.00", "1.00", f"{floor['forward_backward_recompute_ms']:.1f} ms",
        f"{floor['forward_backward_stated_ms']:.1f} ms",
    )  # fmt: skip
    console.print(scan_table)
    print(f"floor: {floor['exp_per_s_per_thread'] / 1e9:.2f} G exp/s and "
          f"{floor['flop_per_s_per_thread'] / 1e9:.1f} G flop/s per thread, {floor['threads']} threads, "
          f"{floor['updates'] / 1e6:.1f} M updates; memory {floor['memory_bytes_per_s'] / 1e9:.1f} GB/s: "
          f"store floor {floor['forward_backward_store_ms']:.1f} ms, recompute floor "
          f"{floor['forward_backward_recompute_ms']:.1f} ms, stated floor (the lower) "
          f"{floor['forward_backward_stated_ms']:.1f} ms")  # fmt: skip
    payload = {"rows": rows, "selective_scan_floor": floor}
    path = write_result("bench_ops_cpu_smoke" if args.smoke else "bench_ops_cpu", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
