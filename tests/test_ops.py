"""Fast PyTorch operators against their naive definitions: outputs and every gradient, float64."""

from __future__ import annotations

import pytest
import torch

from defocus_scale.kernels import defocus_attention, retention_scan, selective_scan
from defocus_scale.kernels.attention.naive import defocus_attention_naive
from defocus_scale.kernels.retention.naive import retention_scan_naive
from defocus_scale.kernels.rotary import published_rotary, rotate_by_position
from defocus_scale.kernels.selective.cpu import selective_scan_cpu
from defocus_scale.kernels.selective.naive import selective_scan_naive
from defocus_scale.kernels.selective.reference import selective_scan_torch

F64 = torch.float64


def _grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    # a random cotangent, so that no gradient hides behind a symmetric loss
    weight = torch.randn(output.shape, dtype=output.dtype, generator=torch.Generator().manual_seed(1))
    return list(torch.autograd.grad((output * weight).sum(), inputs))


def _assert_same(fast, naive, fast_grads, naive_grads, names, atol=1e-10):
    torch.testing.assert_close(fast, naive, rtol=1e-9, atol=atol)
    for name, got, want in zip(names, fast_grads, naive_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


def _scan_inputs(batch, length, channels, state, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, dtype=F64, generator=g)
    delta = torch.rand(batch, length, channels, dtype=F64, generator=g) * 0.8 + 0.02
    A = -torch.rand(channels, state, dtype=F64, generator=g) * 3 - 0.1
    B = torch.randn(batch, length, state, dtype=F64, generator=g)
    C = torch.randn(batch, length, state, dtype=F64, generator=g)
    freq = torch.rand(state, dtype=F64, generator=g)
    D = torch.randn(channels, dtype=F64, generator=g)
    z = torch.randn(batch, length, channels, dtype=F64, generator=g)
    return [t.requires_grad_() for t in (u, delta, A, B, C, freq, D, z)]


SCAN_NAMES = ["u", "delta", "A", "B", "C", "freq", "D", "z"]


SCAN_FORMS = {
    "sequential": lambda *a, **kw: selective_scan_torch(*a, **kw, method="sequential"),
    "doubling": lambda *a, **kw: selective_scan_torch(*a, **kw, method="doubling"),
    "cpu": selective_scan_cpu,  # numba, float64 kernels (math.exp)
}


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("method", list(SCAN_FORMS))
def test_selective_scan_fast_equals_naive(length, method):
    args = _scan_inputs(2, length, 8, 4, seed=length)
    kw = dict(freq=args[5], rope_scale=2.0, D=args[6], z=args[7], group_size=4)
    naive = selective_scan_naive(*args[:5], **kw)
    fast = SCAN_FORMS[method](*args[:5], **kw)
    _assert_same(fast, naive, _grads(fast, args), _grads(naive, args), SCAN_NAMES)


@pytest.mark.parametrize("length", [1, 6, 197])
def test_selective_scan_cpu_partial_tiles_equal_naive(length):
    """The numba scan works on tiles of 16 channels: 37 channels leave a partial tile of 5 (padded
    lanes must carry nothing), at the real length 197 as well as odd and unit lengths."""
    args = _scan_inputs(2, length, 37, 6, seed=length)
    kw = dict(freq=args[5], rope_scale=1.0, D=args[6], z=args[7], group_size=0)
    naive = selective_scan_naive(*args[:5], **kw)
    fast = selective_scan(*args[:5], **kw, backend="cpu")
    _assert_same(fast, naive, _grads(fast, args), _grads(naive, args), SCAN_NAMES)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_selective_scan_public_api_plain_scan(backend):
    """Without freq / D / z the public op is the raw scan, and gradients reach u, delta, A, B, C."""
    args = _scan_inputs(3, 5, 6, 2)[:5]
    fast = selective_scan(*args, backend=backend)
    naive = selective_scan(*args, backend="naive")
    _assert_same(fast, naive, _grads(fast, args), _grads(naive, args), SCAN_NAMES[:5])
    assert fast.shape == (3, 5, 6)


def test_backend_choice_on_cpu():
    from defocus_scale.kernels.ops import _resolve_scan_backend

    x = torch.zeros(1, 1, 1)
    assert _resolve_scan_backend("auto", x, cpu_scan=True) == "cpu"  # the numba scan is the CPU default
    assert _resolve_scan_backend("cpu", x, cpu_scan=True) == "cpu"
    assert _resolve_scan_backend("auto", x) == "torch"  # retention has no "cpu" backend
    with pytest.raises(ValueError, match="backend"):
        retention_scan(*_retention_inputs(1, 2, 1, 2, 2), backend="cpu")


def test_selective_scan_recurrence_by_hand():
    """One channel, one state, no rotary: y_t = sum_s exp(A sum_{s<j<=t} delta_j) delta_s B_s u_s C_t."""
    u = torch.tensor([[[1.0], [2.0], [-1.0]]], dtype=F64)
    delta = torch.tensor([[[0.5], [0.25], [1.0]]], dtype=F64)
    A = torch.tensor([[-2.0]], dtype=F64)
    B = torch.tensor([[[1.0], [3.0], [2.0]]], dtype=F64)
    C = torch.tensor([[[2.0], [1.0], [-1.0]]], dtype=F64)
    s0 = 0.5 * 1.0 * 1.0
    s1 = torch.exp(torch.tensor(-0.5, dtype=F64)) * s0 + 0.25 * 3.0 * 2.0
    s2 = torch.exp(torch.tensor(-2.0, dtype=F64)) * s1 + 1.0 * 2.0 * -1.0
    want = torch.stack([2.0 * torch.tensor(s0, dtype=F64), 1.0 * s1, -1.0 * s2]).view(1, 3, 1)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, backend="torch"), want)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, backend="cpu"), want)


def test_published_rotary_keeps_the_quirk():
    """Each dimension uses its own angle: with unequal freqs inside a pair it is not a rotation."""
    v = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]], dtype=F64)  # token 1 = e0
    freq = torch.tensor([0.3, 0.7], dtype=F64)
    out = published_rotary(v, freq)[0, 1]
    torch.testing.assert_close(out, torch.stack([torch.cos(freq[0]), torch.sin(freq[1])]))


def _retention_inputs(batch, length, heads, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dk, dtype=F64, generator=g)
    k = torch.randn(batch, length, heads, dk, dtype=F64, generator=g)
    v = torch.randn(batch, length, heads, dv, dtype=F64, generator=g)
    log_decay = -torch.rand(heads, dtype=F64, generator=g) * 0.5 - 0.01
    theta = torch.rand(heads, dk // 2, dtype=F64, generator=g) * 2
    return [t.requires_grad_() for t in (q, k, v, log_decay, theta)]


@pytest.mark.parametrize("length", [1, 3, 64, 65, 130])
def test_retention_fast_equals_naive(length):
    args = _retention_inputs(2, length, 3, 6, 4, seed=length)
    naive = retention_scan_naive(*args)
    fast = retention_scan(*args, backend="torch")
    _assert_same(fast, naive, _grads(fast, args), _grads(naive, args), ["q", "k", "v", "log_decay", "theta"])


def test_retention_small_chunks_and_no_rotary():
    from defocus_scale.kernels.retention.reference import retention_scan_torch

    args = _retention_inputs(1, 11, 2, 4, 4)
    args[4] = None
    inputs = args[:4]
    naive = retention_scan_naive(*args)
    fast = retention_scan_torch(*args, chunk_size=4)
    _assert_same(fast, naive, _grads(fast, inputs), _grads(naive, inputs), ["q", "k", "v", "log_decay"])


def test_retention_matches_the_definition_by_hand():
    """o_t = sum_{s<=t} gamma^(t-s) Re[(q_t e^{i t theta}) conj(k_s e^{i s theta})] v_s, one head, dk=2."""
    q = torch.tensor([[[[1.0, 0.5]], [[0.0, 2.0]]]], dtype=F64)
    k = torch.tensor([[[[2.0, -1.0]], [[1.0, 1.0]]]], dtype=F64)
    v = torch.tensor([[[[3.0]], [[-1.0]]]], dtype=F64)
    gamma, theta = 0.5, 0.3
    qc = [complex(1.0, 0.5), complex(0.0, 2.0)]
    kc = [complex(2.0, -1.0), complex(1.0, 1.0)]
    import cmath

    rot = [cmath.exp(1j * t * theta) for t in range(2)]
    o1 = sum(gamma ** (1 - s) * ((qc[1] * rot[1]) * (kc[s] * rot[s]).conjugate()).real * [3.0, -1.0][s]
             for s in range(2))  # fmt: skip
    o0 = ((qc[0] * rot[0]) * (kc[0] * rot[0]).conjugate()).real * 3.0
    out = retention_scan(q, k, v, torch.tensor([torch.log(torch.tensor(gamma)).item()], dtype=F64),
                         torch.tensor([[theta]], dtype=F64), backend="torch")  # fmt: skip
    torch.testing.assert_close(out.flatten(), torch.tensor([o0, o1], dtype=F64))


def _attention_inputs(batch, length, heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads, dim, dtype=F64, generator=g) for _ in range(3))
    lambda_hat = torch.linspace(-4, 0, heads, dtype=F64)
    theta = torch.rand(heads, dim // 2, dtype=F64, generator=g)
    return [t.requires_grad_() for t in (q, k, v, lambda_hat, theta)]


@pytest.mark.parametrize("decay_mode", ["multiplicative", "additive"])
@pytest.mark.parametrize("length", [1, 5, 17])
def test_attention_fast_equals_naive(decay_mode, length):
    args = _attention_inputs(2, length, 3, 8, seed=length)
    naive = defocus_attention_naive(*args, decay_mode=decay_mode)
    fast = defocus_attention(*args, decay_mode=decay_mode, backend="sdpa")
    names = ["q", "k", "v", "lambda_hat", "theta"]
    _assert_same(fast, naive, _grads(fast, args), _grads(naive, args), names)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_without_decay_is_plain_attention(causal):
    args = _attention_inputs(2, 6, 2, 4)[:3]
    fast = defocus_attention(*args, causal=causal, backend="sdpa")
    naive = defocus_attention_naive(*args, causal=causal)
    _assert_same(fast, naive, _grads(fast, args), _grads(naive, args), ["q", "k", "v"])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("decay_mode", ["multiplicative", "additive"])
def test_attention_flex_forward_equals_naive(decay_mode):
    """FlexAttention has no CPU backward; its forward (eager) is checked here, its training on GPU."""
    q, k, v, lambda_hat, theta = (t.detach().float() for t in _attention_inputs(1, 9, 2, 16))
    from defocus_scale.kernels.attention.fast import defocus_attention_flex

    with torch.no_grad():
        flex = defocus_attention_flex(q, k, v, lambda_hat, theta, decay_mode=decay_mode, compile=False)
        naive = defocus_attention_naive(q, k, v, lambda_hat, theta, decay_mode=decay_mode)
    torch.testing.assert_close(flex, naive, rtol=1e-4, atol=1e-5)


def test_multiplicative_decay_is_stable_at_long_range():
    """The decay is computed from t - s, never as lambda^t * lambda^(-s): no overflow at 4096 tokens."""
    q, k, v = (torch.randn(1, 4096, 1, 8) for _ in range(3))
    out = defocus_attention(q, k, v, lambda_hat=torch.tensor([1.0]), theta=torch.rand(1, 4), backend="sdpa")
    assert torch.isfinite(out).all()


def test_rotary_phase_depends_only_on_distance():
    q, k = torch.randn(1, 1, 1, 4, dtype=F64), torch.randn(1, 1, 1, 4, dtype=F64)
    theta = torch.rand(1, 2, dtype=F64)
    seq_q, seq_k = q.expand(1, 10, 1, 4), k.expand(1, 10, 1, 4)
    rq, rk = rotate_by_position(seq_q, theta), rotate_by_position(seq_k, theta)
    dots = torch.einsum("btd,bsd->bts", rq[:, :, 0], rk[:, :, 0])[0]
    torch.testing.assert_close(dots[5, 2], dots[9, 6])
    torch.testing.assert_close(dots[3, 3], (q * k).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_inputs_keep_their_dtype(dtype):
    args = [t.detach().to(dtype) for t in _scan_inputs(1, 6, 4, 2)]
    y = selective_scan(*args[:5], freq=args[5], D=args[6], z=args[7], group_size=2)
    ref = selective_scan_naive(*[t.double() for t in args[:5]], freq=args[5].double(), D=args[6].double(),
                               z=args[7].double(), group_size=2)  # fmt: skip
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    r = [t.detach().to(dtype) for t in _retention_inputs(1, 6, 2, 4, 4)]
    assert retention_scan(*r).dtype == dtype


def test_bad_arguments_are_named():
    args = _scan_inputs(1, 4, 4, 2)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(*args[:5], backend="cuda-magic")
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(args[0], args[1], args[2][:2], args[3], args[4])
    with pytest.raises(ValueError, match="group_size"):
        selective_scan(*args[:5], group_size=3)
    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            with pytest.raises(ValueError, match="TRITON_INTERPRET"):
                selective_scan(*args[:5], backend="triton")
    r = _retention_inputs(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="log_decay"):
        retention_scan(r[0], r[1], r[2], r[3][:1], r[4])
    with pytest.raises(ValueError, match="decay_mode"):
        defocus_attention(r[0], r[1], r[2], lambda_hat=torch.zeros(2), decay_mode="sideways")


def test_public_functions_survive_submodule_imports():
    """Importing an operator's folder must not shadow the public function of the same package."""
    import importlib

    for module in ("naive", "reference"):
        importlib.import_module(f"defocus_scale.kernels.selective.{module}")
    import defocus_scale.kernels as kernels

    assert callable(kernels.selective_scan) and callable(kernels.retention_scan)


@pytest.mark.parametrize("length", [1, 5, 197])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_depthwise_conv_forms_agree(length, dtype, with_bias):
    """The channels-last shifted form (CPU default) equals the conv1d form, output and every gradient."""
    from defocus_scale.kernels import causal_depthwise_conv1d

    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 24, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(24, 1, 4, generator=g).to(dtype).requires_grad_()  # an nn.Conv1d's layout
    bias = torch.randn(24, generator=g).to(dtype).requires_grad_() if with_bias else None
    inputs = [t for t in (x, weight, bias) if t is not None]
    results = []
    for form in ("conv", "shifted"):
        out = causal_depthwise_conv1d(x, weight, bias, form=form)
        assert out.shape == x.shape and out.dtype == dtype
        results.append((out, *torch.autograd.grad(out, inputs, torch.ones_like(out))))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for conv, shifted in zip(*results, strict=True):
        torch.testing.assert_close(shifted, conv, **tol)
    # causal: the first token sees only itself
    first = causal_depthwise_conv1d(x[:, :1], weight, bias, form="shifted")
    torch.testing.assert_close(first, results[1][0][:, :1], **tol)
    with pytest.raises(ValueError, match="form"):
        causal_depthwise_conv1d(x, weight, bias, form="fft")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_softplus_equals_f_softplus(dtype):
    """The vectorised CPU softplus: F.softplus's values to 2 ulps over the whole range (underflow, the
    threshold, overflow, inf, nan), and F.softplus's gradient exactly."""
    import torch.nn.functional as F

    from defocus_scale.kernels import softplus

    g = torch.Generator().manual_seed(0)
    edges = [-1e4, -200.0, -88.0, -30.0, -20.0, -1e-8, 0.0, 1e-8, 19.99, 20.0, 20.01, 88.0, 100.0, 1e4]
    special = torch.tensor(edges + [float("inf"), -float("inf")], dtype=dtype)
    x = torch.cat([torch.randn(20000, generator=g, dtype=dtype) * scale for scale in (0.1, 1, 5, 30)])
    x = torch.cat([x, special]).requires_grad_()
    want = F.softplus(x.detach().double())
    got = softplus(x)
    assert got.dtype == dtype
    ulps = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=ulps, atol=torch.finfo(dtype).tiny * 4)
    cotangent = torch.randn(x.shape, dtype=dtype, generator=g)
    (grad,) = torch.autograd.grad(got, x, cotangent)
    xr = x.detach().requires_grad_()
    (want_grad,) = torch.autograd.grad(F.softplus(xr), xr, cotangent)
    assert torch.equal(grad, want_grad)
    assert softplus(torch.tensor([float("nan")], dtype=dtype)).isnan().all()
    if dtype == torch.float64:
        torch.autograd.gradcheck(softplus, (torch.randn(16, dtype=dtype, requires_grad=True),))


def test_cpu_softplus_compiles_and_leaves_low_precision_to_f_softplus():
    import torch.nn.functional as F

    from defocus_scale.kernels import softplus

    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(0)) * 10
    compiled = torch.compile(softplus, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), softplus(x), rtol=0, atol=0)
    low = x.bfloat16()
    assert torch.equal(softplus(low), F.softplus(low))
