"""pykernels.linear_act: what is particular to it (the generic checks of every op family run
its cases in test_ops_generic.py, from linear_act_cases.py)."""

import os
import subprocess
import sys

import pytest
import torch
from checks import assert_low_precision_rule
from conftest import cpu_kernel_backends, gpu_kernel_backends
from linear_act_cases import case, make_inputs, torch_reference
from torch.library import opcheck

import pykernels
from pykernels.activations import ACTIVATIONS, activation_id
from pykernels.testing import assert_low_precision_close, max_abs_error

CPU_BACKENDS = cpu_kernel_backends()


def forward_and_grads(fn, x, w, b, grad_out):
    out = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


def assert_matches_reference(backend, activation, x, w, b, grad_out, tol,
                             negative_slope=0.01):
    """Output and gradients of linear_act equal torch_reference's within tol; returns ours."""
    ours = forward_and_grads(lambda x, w, b: pykernels.linear_act(
        x, w, b, activation, negative_slope=negative_slope, backend=backend), x, w, b,
        grad_out)
    ref = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation,
                                                            negative_slope), x, w, b, grad_out)
    for a, e in zip(ours, ref, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    return ours


def float32_rule(activation, exact, backend="cpu"):
    """linear_act on float32 copies of ``exact`` (x, w, b or None) vs plain float32 torch,
    both vs float64 (the generic rule of checks.py)."""
    assert_low_precision_rule(case(activation, backend, activation,
                                   lambda: tuple(t for t in exact if t is not None)))


def test_cpu_backend_is_built_and_listed():
    assert "cpu" in pykernels.backends("cpu")
    assert "torch" in pykernels.backends()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "sigmoid", "tanh"])
def test_saturating_inputs_stay_finite(backend, activation):
    # Pre-activations of +-60 saturate every activation; nothing may become NaN or inf.
    x = torch.tensor([[60.0, -60.0], [-60.0, 60.0], [1e-3, -1e-3]], dtype=torch.float32,
                     requires_grad=True)
    w = torch.eye(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    grad_out = torch.ones(3, 2)
    ours = assert_matches_reference(backend, activation, x, w, b, grad_out, 1e-5)
    assert all(torch.isfinite(a).all() for a in ours)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_like_torch(backend):
    # Row 0 meets a NaN, row 1 does not: torch's activations (relu too) keep the NaN.
    x = torch.tensor([[float("nan"), 1.0], [1.0, -2.0]])
    w = torch.eye(2)
    for activation in ACTIVATIONS:
        ours = pykernels.linear_act(x, w, None, activation, backend=backend)
        assert torch.isnan(ours[0]).all(), activation
        torch.testing.assert_close(ours[1], torch_reference(x, w, None, activation)[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_zero_rows(backend, lead):
    x, w, b = make_inputs(lead, 5, 4, True)
    out = pykernels.linear_act(x, w, b, "silu", backend=backend)
    assert out.shape == (*lead, 4)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_requested_gradients(backend):
    x, w, b = make_inputs((6,), 5, 3, True)
    x.requires_grad_(False)
    out = pykernels.linear_act(x, w, b, "tanh", backend=backend)
    out.sum().backward()
    ref = torch_reference(x, w.detach().requires_grad_(), b, "tanh")
    assert x.grad is None
    assert w.grad is not None and b.grad is not None
    assert max_abs_error(out, ref) < 1e-12


def test_cpu_bias_gradient_is_reproducible_across_thread_counts():
    x, w, b = make_inputs((513,), 40, 130, True, dtype=torch.float32)
    grad_out = torch.randn(513, 130)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = pykernels.linear_act(x, w, b, "gelu", backend="cpu")
            grads.append(torch.autograd.grad(out, b, grad_out)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


# ---- float32 products big enough for the cpu backend's own GEMM (csrc/cpu/gemm.cpp) ---------
# On AVX-512 CPUs these run the packed 14 x 32 register-tile GEMM with the fused epilogue
# (C at least 2048 x 256, depth at least 256): partial row and column tiles, several k blocks
# (K > 512) and column panels (N > 512). The first shape runs the forward and grad_input
# GEMMs there, the second all three (grad_weight with a transposed A).
GEMM_SHAPES = [(2053, 700, 1100), (2050, 300, 2200)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_gemm_sizes_match_float64_reference(activation, shape):
    m, k, n = shape
    exact = make_inputs((m,), k, n, True, seed=k)
    float32_rule(activation, exact)


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_gemm_strided_operands(bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(700, 2, 2053, generator=g, dtype=torch.float64)[:, 1].t()  # (2053, 700)
    w = torch.randn(700, 1100, generator=g, dtype=torch.float64).t() / 700**0.5  # (1100, 700)
    b = torch.randn(2200, generator=g, dtype=torch.float64)[::2] if bias else None
    exact = [None if t is None else t.requires_grad_() for t in (x, w, b)]
    float32_rule("gelu", exact)


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_gemm_is_bitwise_reproducible_across_thread_counts(shape):
    m, k, n = shape
    x, w, b = make_inputs((m,), k, n, True, dtype=torch.float32)
    grad_out = torch.randn(m, n)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads), 3):
            torch.set_num_threads(count)
            results.append(forward_and_grads(
                lambda x, w, b: pykernels.linear_act(x, w, b, "silu", backend="cpu"),
                x, w, b, grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(other, results[0], strict=True):
            assert torch.equal(a, e)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_fallbacks_below_avx512(capability):
    """With torch's CPU capability lowered, the same gemm-sized cases run the other paths
    (ATen's GEMM, then the AVX2 or scalar loops) and must match the reference too."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "test_cpu_gemm_sizes_match_float64_reference and (gelu or relu)"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\n8 passed" in result.stdout  # 2 shapes x (gelu, gelu_tanh, relu, leaky_relu)


# ---- registration: torch.compile (opcheck: test_ops_generic.py) ---------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_function_and_module(backend):
    torch._dynamo.reset()
    layer = pykernels.nn.Linear(12, 10, activation="gelu_tanh", dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def step(x):
        with pykernels.use_backend(backend):
            hidden = layer(x)
        return pykernels.linear_act(hidden, layer.weight[:4, :10], None, "silu",
                                    backend=backend).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, (x, layer.weight, layer.bias))
    x_ref = x.detach().requires_grad_()
    hidden = torch_reference(x_ref, layer.weight, layer.bias, "gelu_tanh")
    ref_loss = torch_reference(hidden, layer.weight[:4, :10], None, "silu").sum()
    ref_grads = torch.autograd.grad(ref_loss, (x_ref, layer.weight, layer.bias))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# ---- backend selection ------------------------------------------------------------------

def ran_on(out):
    """'torch' for the reference composition, else the kernel backend the op ran on (the
    autograd node of pykernels::linear_act_forward keeps it, behind the output's view)."""
    node = out.grad_fn
    while node is not None and not hasattr(node, "backend"):
        node = node.next_functions[0][0] if node.next_functions else None
    return getattr(node, "backend", "torch")


def test_backend_selection_order(monkeypatch, auto_runs_kernels):
    x, w, b = make_inputs((2,), 3, 2, True, dtype=torch.float32)
    assert ran_on(pykernels.linear_act(x, w, b)) == "cpu"  # auto on CPU (fixture: any size)
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    assert ran_on(pykernels.linear_act(x, w, b)) == "torch"
    with pykernels.use_backend("cpu"):
        assert ran_on(pykernels.linear_act(x, w, b)) == "cpu"
        with pykernels.use_backend("torch"):
            assert ran_on(pykernels.linear_act(x, w, b)) == "torch"
            assert ran_on(pykernels.linear_act(x, w, b, backend="cpu")) == "cpu"
        assert ran_on(pykernels.linear_act(x, w, b)) == "cpu"
    assert ran_on(pykernels.linear_act(x, w, b)) == "torch"


def test_float64_auto_and_half_on_cpu(auto_runs_kernels):
    x, w, b = make_inputs((2,), 3, 2, True, dtype=torch.float64)
    assert ran_on(pykernels.linear_act(x, w, b)) == "cpu"
    xh, wh = x.detach().bfloat16(), w.detach().bfloat16()
    # The cpu kernels take float32/float64; auto falls back to the reference for bf16.
    out = pykernels.linear_act(xh, wh, None, "relu")
    torch.testing.assert_close(out, torch_reference(xh, wh, None, "relu"))


# ---- bad input --------------------------------------------------------------------------

def test_bad_backend_environment_and_context(monkeypatch):
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    monkeypatch.setenv("PYKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PYKERNELS_BACKEND must be one of"):
        pykernels.linear_act(x, w)
    with pytest.raises(ValueError, match="backend must be one of"):
        with pykernels.use_backend("gpu"):
            pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pykernels.linear_act(x, w, backend="triton")


# ---- GPU --------------------------------------------------------------------------------

def low_precision_case(backend, dtype, activation, m, k, n, bias=True, transposed=False):
    exact = make_inputs((m,), k, n, bias, device="cuda", seed=m + k)
    grad_out = torch.randn(m, n, dtype=torch.float64, device="cuda")
    low = [None if t is None else t.detach().to(dtype) for t in exact]
    if transposed:  # a non-contiguous input of the same values
        low[0] = low[0].t().contiguous().t()
    low = [None if t is None else t.requires_grad_() for t in low]
    ours = forward_and_grads(lambda x, w, b: pykernels.linear_act(x, w, b, activation,
                                                                  backend=backend),
                             *low, grad_out.to(dtype))
    plain = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation), *low,
                              grad_out.to(dtype))
    ref = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation), *exact,
                            grad_out)
    for name, a, p, e in zip(["out", "grad_input", "grad_weight", "grad_bias"], ours, plain,
                             ref, strict=True):
        assert a.dtype == dtype and a.shape == e.shape
        assert_low_precision_close(a, p, e, name=f"{backend} {dtype} {activation} {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_low_precision_rule(backend, dtype, activation):
    low_precision_case(backend, dtype, activation, 97, 65, 31)
    low_precision_case(backend, dtype, activation, 1025, 768, 520, transposed=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
@pytest.mark.parametrize("shape", [(4096, 1024, 4096), (1, 16, 16), (333, 1000, 77)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_shapes_bf16(backend, shape):
    low_precision_case(backend, torch.bfloat16, "gelu", *shape, bias=shape[0] != 1)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
def test_gpu_zero_rows_opcheck_and_compile(backend):
    x, w, b = make_inputs((0,), 64, 32, True, dtype=torch.bfloat16, device="cuda")
    out = pykernels.linear_act(x, w, b, "relu", backend=backend)
    assert out.shape == (0, 32)
    gw, gb = torch.autograd.grad(out.sum(), (w, b))
    assert not gw.any() and not gb.any()
    x, w, b = make_inputs((40,), 64, 32, True, dtype=torch.float16, device="cuda")
    opcheck(torch.ops.pykernels.linear_act_forward,
            (x, w, b, activation_id("gelu"), 0.01, True, backend))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: pykernels.linear_act(x, w, b, "silu", backend=backend),
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), torch_reference(x, w, b, "silu"), rtol=2e-2,
                               atol=2e-2)
