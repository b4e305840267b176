"""Triton bandpass scans vs the PyTorch reference, the unfused path and flash-linear-attention.

    python benchmarks/bench_scan.py [--dtype bf16] [--batch 64 128] [--smoke] [--out FILE]

Shapes: De-focus Mamba-B (channels 1536) and -L (2048) mixers, state 16, norm groups of 64, and
De-focus RetNet-B (12 heads of 64), at 197 and 577 tokens (224 and 384 px, patch 16, class token).
Every implementation is timed forward (with autograd recording, as in training), backward, and
forward+backward; on CUDA with ``triton.testing.do_bench``, on CPU as the median of ``--repeats``.

Implementations: ``triton`` (ours, epilogue fused); ``torch`` (the fast PyTorch reference,
``backend="torch"``); ``unfused`` (what the released code runs: rotary on B and C, the scan, then
the group norm, ``+ D u`` and the gate as separate PyTorch ops; the scan is our Triton kernel without
its epilogue); ``mamba_ssm`` / ``mamba_ssm_ref`` (the same with mamba-ssm's CUDA scan / its PyTorch
``selective_scan_ref``, when installed); ``fla``
(flash-linear-attention's ``chunk_simple_gla`` with a per-head decay, kernel only: q and k rotated
beforehand and no gradient for the decay, so it does less work than ours). On CPU only ``torch``
runs (the kernels need a GPU), unless ``--interpret`` asks for the Triton rows in the Triton
interpreter: that checks the script end to end on CPU; its timings mean nothing.

Bytes model for GB/s and % of the memory roofline (the least HBM traffic of the fused operator, the
same bytes for every implementation, so GB/s compares like with like): every tensor the operator
takes or returns moves once, ``s`` bytes per element in the input dtype (``delta`` and its gradient in
fp32, as the model passes them). On CUDA the Triton rows also carry the kernel report's estimates and
floors for this GPU (``est_fwd_ms`` ...; ``benchmarks/kernel_report.py``, the same launchers), so that
measured times sit beside the estimates.
* selective forward: reads u, delta, z, B, C; writes out; writes the fp32 chunk-boundary states
  (one per 32 tokens). Backward: reads u, delta, z, dout, B, C and the boundary states; writes du,
  ddelta, dz and the fp32 per-tile partials of dB and dC. The backward's recomputation scratch is
  assumed to stay in L2 and is not counted.
* retention forward: reads q, k, v; writes o. Backward: reads q, k, v, do; writes dq, dk, dv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

# The interpreter is chosen when triton is first imported (by the project's imports below).
if "--interpret" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import write_result  # noqa: E402

from defocus_scale.kernels.ops import retention_scan, selective_scan  # noqa: E402
from defocus_scale.kernels.rotary import published_rotary, rotate_by_position  # noqa: E402
from defocus_scale.kernels.selective import triton as selective_triton  # noqa: E402
from defocus_scale.kernels.selective.naive import group_rms_norm  # noqa: E402

# Peak HBM bandwidth in GB/s by device name (datasheets); the first key found in the name wins.
PEAK_GBPS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}
BOUNDARY_CHUNK = selective_triton.DEFAULT_CHUNK  # tokens per stored state (the op's default chunk_size)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    kind: str  # "selective" or "retention"
    label: str
    batch: int
    length: int
    width: int  # channels (selective) or heads (retention)
    inner: int  # state (selective) or head dim (retention)
    group: int = 0


def _cases(batches: list[int], smoke: bool) -> list[Case]:
    if smoke:
        return [
            Case("selective", "tiny mixer", 2, 9, 32, 4, 16),
            Case("retention", "tiny heads", 2, 9, 2, 16),
        ]
    cases = []
    for batch in batches:
        for length in (197, 577):
            cases.append(Case("selective", "Mamba-B", batch, length, 1536, 16, 64))
            cases.append(Case("selective", "Mamba-L", batch, length, 2048, 16, 64))
            cases.append(Case("retention", "RetNet-B", batch, length, 12, 64))
    return cases


def _selective_inputs(case: Case, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(0)
    b, L, E, N = case.batch, case.length, case.width, case.inner

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device=device) * scale + shift

    tensors = dict(u=rand(b, L, E), z=rand(b, L, E), B=rand(b, L, N), C=rand(b, L, N))
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    # as the model calls the scan: delta (softplus of a projection plus its fp32 bias) in fp32
    tensors["delta"] = torch.rand(b, L, E, generator=g, device=device) * 0.1
    tensors["A"] = -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(E, 1)
    tensors["freq"] = torch.rand(N, generator=g, device=device)
    tensors["D"] = torch.ones(E, device=device)
    return {n: t.requires_grad_() for n, t in tensors.items()}


def _retention_inputs(case: Case, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(0)
    b, L, H, d = case.batch, case.length, case.width, case.inner
    tensors = {n: torch.randn(b, L, H, d, generator=g, device=device).to(dtype) for n in "qkv"}
    tensors["k"] = tensors["k"] / d**0.5
    tensors["log_decay"] = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, device=device, dtype=torch.float32)))
    tensors["theta"] = 10000.0 ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d).repeat(
        H, 1
    )
    return {n: t.requires_grad_() for n, t in tensors.items()}


def _selective_implementations(case: Case, with_triton: bool) -> dict[str, Callable[..., torch.Tensor]]:
    group = case.group

    def fused(u, delta, A, B, C, freq, D, z):
        return selective_scan(u, delta, A, B, C, freq=freq, D=D, z=z, group_size=group, backend="triton")

    def reference(u, delta, A, B, C, freq, D, z):
        return selective_scan(u, delta, A, B, C, freq=freq, D=D, z=z, group_size=group, backend="torch")

    def epilogue(y, u, D, z):  # the released mixer after its scan
        y = group_rms_norm(y, group)
        return (y + u * D) * torch.nn.functional.silu(z)

    def unfused(u, delta, A, B, C, freq, D, z):
        B, C = published_rotary(B.float(), freq).to(B.dtype), published_rotary(C.float(), freq).to(C.dtype)
        return epilogue(selective_scan(u, delta, A, B, C, backend="triton"), u, D, z)

    implementations = {"torch": reference}
    if with_triton:
        implementations = {"triton": fused, "unfused": unfused, **implementations}
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref
        except ImportError:
            pass
        else:

            def released(scan):
                def run(u, delta, A, B, C, freq, D, z):
                    B, C = published_rotary(B.float(), freq), published_rotary(C.float(), freq)
                    y = scan(
                        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2)
                    ).transpose(1, 2)
                    return epilogue(y, u, D, z)

                return run

            implementations["mamba_ssm"] = released(selective_scan_fn)  # its CUDA scan
            # its PyTorch scan: what the release runs where the CUDA extension is missing
            implementations["mamba_ssm_ref"] = released(selective_scan_ref)
    return implementations


def _retention_implementations(case: Case, with_triton: bool) -> dict[str, Callable[..., torch.Tensor]]:
    implementations: dict[str, Callable[..., torch.Tensor]] = {
        "torch": lambda q, k, v, log_decay, theta: retention_scan(q, k, v, log_decay, theta, backend="torch")
    }
    if with_triton:
        implementations = {
            "triton": lambda q, k, v, log_decay, theta: retention_scan(
                q, k, v, log_decay, theta, backend="triton"
            ),
            **implementations,
        }
        try:
            from fla.ops.simple_gla import chunk_simple_gla
        except ImportError:
            pass
        else:
            implementations["fla"] = lambda q, k, v, log_decay, theta: chunk_simple_gla(
                q, k, v, g_gamma=log_decay.detach(), scale=1.0
            )[0]
    return implementations


def _prepare_fla_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla gets q and k rotated beforehand (not timed): it has no rotary of its own."""
    with torch.no_grad():
        q = rotate_by_position(inputs["q"].float(), inputs["theta"]).to(inputs["q"].dtype)
        k = rotate_by_position(inputs["k"].float(), inputs["theta"]).to(inputs["k"].dtype)
    return {**inputs, "q": q.requires_grad_(), "k": k.requires_grad_()}


def _bytes(case: Case, element: int) -> tuple[float, float]:
    """(forward, backward) bytes of the model in the module docstring."""
    b, L = case.batch, case.length
    if case.kind == "selective":
        E, N = case.width, case.inner
        big, small, delta = b * L * E * element, b * L * N * element, b * L * E * 4  # delta is fp32
        boundary = b * -(-L // BOUNDARY_CHUNK) * E * N * 4
        tiles = E // case.group if case.group else -(-E // 32)
        partials = 2 * b * L * tiles * N * 4
        return 3 * big + delta + 2 * small + boundary, 5 * big + 2 * delta + 2 * small + boundary + partials
    H, d = case.width, case.inner
    token = b * L * H * d * element
    return 4 * token, 7 * token


def _time(run: Callable[[], object], on_cuda: bool, repeats: int) -> float:
    if on_cuda:
        import triton.testing

        return float(triton.testing.do_bench(run, warmup=10, rep=50))
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _measure(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], on_cuda: bool,
             repeats: int) -> tuple[float, float, float]:  # fmt: skip
    leaves = [t for t in inputs.values() if t.requires_grad]
    out = fn(**inputs)
    grad = torch.randn_like(out)
    forward = _time(lambda: fn(**inputs), on_cuda, repeats)
    backward = _time(
        lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True, allow_unused=True), on_cuda, repeats
    )
    both = _time(lambda: torch.autograd.grad(fn(**inputs), leaves, grad, allow_unused=True), on_cuda, repeats)
    return forward, backward, both


def _report_estimates(case: Case, dtype: torch.dtype) -> dict[str, float] | None:
    """The kernel report's estimates and floors (``benchmarks/kernel_report.py``) for our kernels at this
    case, for this GPU's arch, built from the same launchers: measured times sit beside them. None where
    the report does not model the arch."""
    import kernel_report

    from defocus_scale.kernels import aot
    from defocus_scale.kernels.launch import targeting

    if case.kind == "selective" and (case.inner, case.group) != (kernel_report.STATE, kernel_report.GROUP):
        return None
    if case.kind == "retention" and case.inner != kernel_report.HEAD_DIM:
        return None
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    if arch not in aot.ARCHS or arch not in aot.available_archs():
        return None
    name = "selective_scan" if case.kind == "selective" else "retention"
    with targeting(aot.ARCHS[arch].capability):  # this GPU's own defaults
        launches = kernel_report.KERNELS[name][1](case.width, case.length, case.batch, dtype)
    fields = {}
    for direction, launch in zip(("fwd", "bwd"), launches, strict=True):
        # an op in several launches (a prelude pass first) is timed whole: its estimate is their sum
        records = [aot.report_record(part, arch) for part in (*launch.prelude, launch)]
        fields[f"est_{direction}_ms"] = sum(record["est_ms"] for record in records)
        fields[f"floor_{direction}_ms"] = records[-1]["floor_ms"]
    return fields


def _peak_gbps(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_GBPS.items() if key in device_name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3, help="CPU timing repeats (CUDA uses do_bench)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--interpret", action="store_true", help="CPU: Triton rows in the interpreter (slow)")
    args = parser.parse_args(argv)
    on_cuda = torch.cuda.is_available()
    with_triton = on_cuda or args.interpret
    if args.interpret and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--interpret must be given on the command line (it is read before triton is imported)")
    device = "cuda" if on_cuda else "cpu"
    dtype = DTYPES[args.dtype]
    if args.smoke:
        args.repeats = 1
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    peak = _peak_gbps(device_name)
    element = torch.empty((), dtype=dtype).element_size()

    rows, skipped = [], []
    for case in _cases(args.batch, args.smoke):
        if case.kind == "selective":
            inputs = _selective_inputs(case, dtype, device)
            implementations = _selective_implementations(case, with_triton)
            shape = f"{case.label} b{case.batch} L{case.length} E{case.width} N{case.inner} g{case.group}"
        else:
            inputs = _retention_inputs(case, dtype, device)
            implementations = _retention_implementations(case, with_triton)
            shape = f"{case.label} b{case.batch} L{case.length} H{case.width} d{case.inner}"
        forward_bytes, backward_bytes = _bytes(case, element)
        case_rows = {}
        for name, fn in implementations.items():
            case_inputs = _prepare_fla_inputs(inputs) if name == "fla" else inputs
            try:
                forward, backward, both = _measure(fn, case_inputs, on_cuda, args.repeats)
            except (RuntimeError, ValueError) as error:  # e.g. out of memory at the largest shapes
                skipped.append(
                    {"kernel": case.kind, "shape": shape, "implementation": name, "error": str(error)}
                )
                if on_cuda:
                    torch.cuda.empty_cache()
                continue
            gbps = (forward_bytes + backward_bytes) / (both * 1e-3) / 1e9
            case_rows[name] = {
                "kernel": case.kind, "shape": shape, "implementation": name, "dtype": args.dtype,
                "fwd_ms": forward, "bwd_ms": backward, "fwd_bwd_ms": both,
                "fwd_gbps": forward_bytes / (forward * 1e-3) / 1e9, "fwd_bwd_gbps": gbps,
                "roofline_pct": 100 * gbps / peak if peak else None,
            }  # fmt: skip
        if "triton" in case_rows:
            if on_cuda:
                estimates = _report_estimates(case, dtype)
                if estimates:
                    triton_row = case_rows["triton"]
                    triton_row.update(estimates)
                    for direction in ("fwd", "bwd"):
                        triton_row[f"{direction}_vs_estimate"] = (
                            triton_row[f"{direction}_ms"] / estimates[f"est_{direction}_ms"]
                        )
            for name, row in case_rows.items():
                if name != "triton":
                    case_rows["triton"][f"speedup_vs_{name}"] = (
                        row["fwd_bwd_ms"] / case_rows["triton"]["fwd_bwd_ms"]
                    )
        rows.extend(case_rows.values())
        del inputs
        if on_cuda:
            torch.cuda.empty_cache()

    table = Table(title=f"bandpass scans, {args.dtype}, on {device_name} (peak {peak or '?'} GB/s)")
    columns = ("shape", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "est fwd/bwd ms", "GB/s", "% roofline",
               "speedups")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("shape", "impl", "speedups") else "right")
    for row in rows:
        speedups = ", ".join(f"{k[11:]} {v:.2f}x" for k, v in row.items() if k.startswith("speedup_vs_"))
        roofline = f"{row['roofline_pct']:.0f}" if row["roofline_pct"] is not None else "-"
        estimate = f"{row['est_fwd_ms']:.3f} / {row['est_bwd_ms']:.3f}" if "est_fwd_ms" in row else "-"
        table.add_row(
            row["shape"], row["implementation"], f"{row['fwd_ms']:.3f}", f"{row['bwd_ms']:.3f}",
            f"{row['fwd_bwd_ms']:.3f}", estimate, f"{row['fwd_bwd_gbps']:.3g}", roofline, speedups,
        )  # fmt: skip
    Console(width=160).print(table)
    for item in skipped:
        print(f"skipped {item['implementation']} at {item['shape']}: {item['error'][:200]}")
    name = "bench_scan" + ("" if on_cuda else "_cpu") + ("_interpreted" if args.interpret else "")
    name += "_smoke" if args.smoke else ""
    payload = {
        "dtype": args.dtype, "peak_gbps": peak, "boundary_chunk": BOUNDARY_CHUNK,
        "bytes_model": __doc__.split("Bytes model")[1].strip(), "rows": rows, "skipped": skipped,
    }  # fmt: skip
    path = write_result(name, payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
