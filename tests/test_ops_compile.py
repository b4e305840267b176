"""The operators under ``torch.compile``: whole graphs (no graph break), the token loops as single custom
op nodes, the same forward and gradients as eager, and the registered custom ops pass ``opcheck``.

Inductor's compile is the cost here (C++ on CPU, 20-60 s per operator on two cores), so only the
selective scan, whose custom ops are the point, is compiled by Inductor (``compile_threads=1``: a worker
pool costs more than it saves on two cores); every operator is also compiled with ``aot_eager``
(Dynamo + AOTAutograd, no code generation), which is where graph breaks, fake implementations and
autograd registrations are exercised. The Triton ops are
``opcheck``ed in ``test_triton_kernels.py`` (they need the interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from defocus_scale.kernels.ops import defocus_attention, retention_scan, selective_scan
from defocus_scale.kernels.selective.cpu import (
    mamba_epilogue_cpu_bwd,
    mamba_epilogue_cpu_fwd,
    selective_scan_cpu_bwd,
    selective_scan_cpu_fwd,
)
from defocus_scale.kernels.selective.reference import selective_scan_bwd, selective_scan_fwd

# ``selective_scan_fwd/bwd`` are also ``torch.ops.defocus.selective_scan_fwd/bwd``


def _scan_inputs(dtype: torch.dtype, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Activations in ``dtype``, the SSM scalars (delta, A, freq, D) in fp32 as the models pass them."""
    g = torch.Generator().manual_seed(seed)
    batch, channels, state = 2, 8, 4
    act = dict(
        u=torch.randn(batch, length, channels, generator=g),
        B=torch.randn(batch, length, state, generator=g),
        C=torch.randn(batch, length, state, generator=g),
        z=torch.randn(batch, length, channels, generator=g),
    )
    scalars = dict(
        delta=torch.rand(batch, length, channels, generator=g) * 0.5 + 0.01,
        A=-torch.rand(channels, state, generator=g) * 3 - 0.1,
        freq=torch.rand(state, generator=g),
        D=torch.randn(channels, generator=g),
    )
    out = {n: v.to(dtype) for n, v in act.items()} | scalars
    return {n: v.requires_grad_() for n, v in out.items()}


def _retention_inputs(dtype: torch.dtype, length: int = 70, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, heads, dk, dv = 2, 2, 4, 4
    out = dict(
        q=torch.randn(batch, length, heads, dk, generator=g).to(dtype),
        k=torch.randn(batch, length, heads, dk, generator=g).to(dtype),
        v=torch.randn(batch, length, heads, dv, generator=g).to(dtype),
        log_decay=-torch.rand(heads, generator=g) * 0.5 - 0.02,
        theta=torch.rand(heads, dk // 2, generator=g),
    )
    return {n: v.requires_grad_() for n, v in out.items()}


def _attention_inputs(dtype: torch.dtype, length: int = 9, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, heads, dim = 2, 2, 8
    out = dict(
        q=torch.randn(batch, length, heads, dim, generator=g).to(dtype),
        k=torch.randn(batch, length, heads, dim, generator=g).to(dtype),
        v=torch.randn(batch, length, heads, dim, generator=g).to(dtype),
        lambda_hat=torch.linspace(-3, 0, heads),
        theta=torch.rand(heads, dim // 2, generator=g),
    )
    return {n: v.requires_grad_() for n, v in out.items()}


def _scan(u, delta, A, B, C, freq, D, z):
    kw = dict(freq=freq, rope_scale=2.0, D=D, z=z, group_size=4)
    return selective_scan(u, delta, A, B, C, **kw, backend="torch")


def _scan_cpu(u, delta, A, B, C, freq, D, z):
    kw = dict(freq=freq, rope_scale=2.0, D=D, z=z, group_size=4)
    return selective_scan(u, delta, A, B, C, **kw, backend="cpu")


def _retention(q, k, v, log_decay, theta):
    return retention_scan(q, k, v, log_decay, theta, backend="torch")


def _attention_multiplicative(q, k, v, lambda_hat, theta):
    return defocus_attention(q, k, v, lambda_hat=lambda_hat, theta=theta, decay_mode="multiplicative",
                             backend="sdpa")  # fmt: skip


def _attention_additive(q, k, v, lambda_hat, theta):
    return defocus_attention(q, k, v, lambda_hat=lambda_hat, theta=theta, decay_mode="additive",
                             backend="sdpa")  # fmt: skip


CASES = {
    "selective_scan": (_scan, _scan_inputs),
    "selective_scan_cpu": (_scan_cpu, _scan_inputs),
    "retention_scan": (_retention, _retention_inputs),
    "attention_multiplicative": (_attention_multiplicative, _attention_inputs),
    "attention_additive": (_attention_additive, _attention_inputs),
}


def _forward_and_grads(fn, inputs: dict[str, torch.Tensor]):
    out = fn(**inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    grads = torch.autograd.grad((out * weight).float().sum(), list(inputs.values()))
    return out, dict(zip(inputs, grads, strict=True))


def _assert_matches(compiled, eager, rtol: float, atol: float, what: str) -> None:
    out, grads = compiled
    want, want_grads = eager
    assert out.dtype == want.dtype, what
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol, msg=lambda m: f"{what} output: {m}")
    for name, grad in grads.items():
        assert grad.dtype == want_grads[name].dtype, f"{what} grad {name}"
        torch.testing.assert_close(grad, want_grads[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{what} grad {n}: {m}")  # fmt: skip


def _compile_twice(fn, inputs, backend: str):
    """Compile ``fn`` whole, call it (forward and backward) twice on the same shapes; return the second
    result, the compile counter and the Dynamo counters."""
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    _forward_and_grads(compiled, inputs)
    second = _forward_and_grads(compiled, inputs)
    return second, counter, {k: dict(v) for k, v in counters.items()}


def _assert_one_graph(counter, stats) -> None:
    assert not stats.get("graph_break"), stats.get("graph_break")
    assert not stats.get("recompiles"), stats.get("recompiles")
    assert stats["stats"]["unique_graphs"] == 1, stats["stats"]
    assert counter.frame_count == 1, counter.frame_count  # the second call reused the first compile


def _op_targets(graph: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_operator_compiles_whole_and_matches_eager(name, dtype):
    """Dynamo + AOTAutograd (``aot_eager``): one graph, no break, no recompile, eager's numbers. bf16 is
    the training configuration (activations bf16, scalars fp32); both run the same kernels, so the
    tolerance is tight either way (summation order inside fused ops may differ)."""
    fn, make_inputs = CASES[name]
    inputs = make_inputs(dtype)
    compiled, counter, stats = _compile_twice(fn, inputs, "aot_eager")
    _assert_one_graph(counter, stats)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_matches(compiled, _forward_and_grads(fn, inputs), tol, tol, f"{name} {dtype}")
    if name.startswith("selective_scan"):  # the token loop is ONE node, not hundreds of unrolled steps
        op = {"selective_scan": "selective_scan_fwd", "selective_scan_cpu": "selective_scan_cpu_fwd"}[name]
        targets = _op_targets(counter.graphs[0])
        assert targets.count(f"defocus.{op}.default") == 1, targets
        assert len(targets) < 80, len(targets)


def test_selective_scan_compiles_with_inductor():
    """The scan with its whole epilogue through Inductor (C++ on CPU): the custom ops become extern
    calls between generated kernels (their fake strides must match the real ones), with eager's numbers.
    Only this operator goes through Inductor here: retention and attention are plain ATen graphs, and
    each Inductor compile costs 20-60 s on two cores."""
    inputs = _scan_inputs(torch.float32)
    with torch._inductor.config.patch(compile_threads=1):
        compiled, counter, stats = _compile_twice(_scan, inputs, "inductor")
    _assert_one_graph(counter, stats)
    _assert_matches(compiled, _forward_and_grads(_scan, inputs), 1e-5, 1e-5, "selective_scan inductor")
    assert stats["inductor"].get("extern_calls", 0) >= 2, stats["inductor"]  # forward and backward op


def test_opcheck_selective_scan_ops():
    """``torch.library.opcheck``: schema, fake tensors, autograd registration, AOT dispatch (dynamic)."""
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(4)
        u, delta, B, C = (torch.randn(2, 5, 3, dtype=dtype, generator=g) for _ in range(4))
        delta = delta.abs() * 0.3
        A = -torch.rand(3, 2, dtype=dtype, generator=g) - 0.1
        B, C = B[..., :2].contiguous(), C[..., :2].contiguous()
        args = [t.requires_grad_() for t in (u, delta, A, B, C)]
        torch.library.opcheck(selective_scan_fwd, tuple(args))
        y, states = selective_scan_fwd(*(t.detach() for t in args))
        dy = torch.randn_like(y)
        torch.library.opcheck(selective_scan_bwd, (dy, *(t.detach() for t in args), states))
        # the numba CPU scan's ops (float32 and float64 kernels)
        torch.library.opcheck(selective_scan_cpu_fwd, tuple(args))
        _, bounds = selective_scan_cpu_fwd(*(t.detach() for t in args))
        torch.library.opcheck(selective_scan_cpu_bwd, (dy, *(t.detach() for t in args), bounds))
        # the fused epilogue's ops, with and without D / z / the group norm
        z = torch.randn(2, 5, 3, dtype=dtype, generator=g).requires_grad_()
        D = torch.randn(3, dtype=dtype, generator=g).requires_grad_()
        for epilogue_args in ((y, u, D, z, 3), (y, u, None, z, 0), (y, u, D, None, 3)):
            epilogue_args = tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t
                                  for t in epilogue_args)  # fmt: skip
            torch.library.opcheck(mamba_epilogue_cpu_fwd, epilogue_args)
            rstd = mamba_epilogue_cpu_fwd(*epilogue_args)[1].detach()
            plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in epilogue_args)
            torch.library.opcheck(mamba_epilogue_cpu_bwd, (torch.randn_like(y), *plain[:4], rstd, plain[4]))
