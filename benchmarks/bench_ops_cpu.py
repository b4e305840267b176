"""Fast PyTorch operators vs their naive definitions, forward + backward, at the base models' shapes.

    python benchmarks/bench_ops_cpu.py [--batch 8] [--repeats 3] [--smoke] [--out FILE]

Shapes: De-focus Mamba-B mixer (channels 1536, state 16), De-focus RetNet-B (12 heads of 64),
De-focus ViT-B (12 heads of 64), all at 197 tokens (224 px, patch 16, class token). Each row times
the forward and the backward of one call (fastest of ``repeats``), measured side by side in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import write_result  # noqa: E402

from defocus_scale.kernels import defocus_attention, retention_scan, selective_scan  # noqa: E402
from defocus_scale.kernels.selective.reference import selective_scan_torch  # noqa: E402


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

    def scan_call(backend: str) -> Callable:
        if backend == "doubling":  # the log-depth alternative to the sequential loop, for the record
            return lambda xs, kw: selective_scan_torch(
                *xs[:5], freq=xs[5], D=xs[6], z=xs[7], method="doubling", **kw
            )
        return lambda xs, kw: selective_scan(*xs[:5], freq=xs[5], D=xs[6], z=xs[7], backend=backend, **kw)

    variants = {
        "selective_scan": {"torch": scan_call("torch"), "doubling": scan_call("doubling"),
                           "naive": scan_call("naive")},
        "retention_scan": {b: (lambda xs, kw, b=b: retention_scan(*xs, backend=b))
                           for b in ("torch", "naive")},
        "defocus_attention": {b: (lambda xs, kw, b=b: defocus_attention(*xs, backend=b))
                              for b in ("sdpa", "naive")},
    }  # fmt: skip
    rows = []
    for label, tensors, kwargs in _operator_cases(args.batch, args.length, args.smoke):
        op = label.split()[0]
        inputs = [t.requires_grad_() for t in tensors]
        naive_f, naive_b = _time_call(partial(variants[op]["naive"], inputs, kwargs), inputs, args.repeats)
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
    Console(width=150).print(table)
    path = write_result("bench_ops_cpu_smoke" if args.smoke else "bench_ops_cpu", {"rows": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
