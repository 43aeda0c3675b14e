"""pykernels.linear_glu: what is particular to it (the generic checks of every op family run
its cases in test_ops_generic.py, from linear_glu_cases.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import assert_low_precision_rule
from conftest import cpu_kernel_backends, gpu_kernel_backends
from linear_glu_cases import case, glu, make_inputs, reference_mlp, torch_reference
from torch.library import opcheck

import pykernels
from pykernels.activations import activation_id
from pykernels.testing import assert_low_precision_close

CPU_BACKENDS = cpu_kernel_backends()
ALL_CPU = [*CPU_BACKENDS, "torch"]

def forward_and_grads(fn, x, w, b, grad_out):
    out = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


def assert_matches_reference(backend, activation, x, w, b, grad_out, tol, negative_slope=0.01):
    ours = forward_and_grads(glu(backend, activation, negative_slope), x, w, b, grad_out)
    ref = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation, negative_slope),
                            x, w, b, grad_out)
    for a, e in zip(ours, ref, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    return ours


def float32_rule(backend, activation, exact):
    """linear_glu on float32 copies of ``exact`` vs plain float32 torch, both vs float64."""
    assert_low_precision_rule(case(activation, backend, activation, lambda: tuple(exact)))


# ---- values and gradients against float64 -------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gradgradcheck_float64(backend, activation):
    x, w, b = make_inputs((3,), 4, 2, True, seed=4)
    assert torch.autograd.gradgradcheck(glu(backend, activation), (x, w, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_requested_gradients(backend):
    x, w, _ = make_inputs((6,), 5, 3, False, seed=5)
    x.requires_grad_(False)
    out = pykernels.linear_glu(x, w, None, "silu", backend=backend)
    (grad_w,) = torch.autograd.grad(out.sum(), (w,))
    w_ref = w.detach().requires_grad_()
    torch.testing.assert_close(grad_w, torch.autograd.grad(
        torch_reference(x, w_ref, None, "silu").sum(), (w_ref,))[0])


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_rows(backend, lead):
    x, w, b = make_inputs(lead, 5, 4, True)
    out = pykernels.linear_glu(x, w, b, "silu", backend=backend)
    assert out.shape == (*lead, 4)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_backward_with_retain_graph(backend):
    x, w, b = make_inputs((5, 2), 6, 3, True, seed=8)
    out = pykernels.linear_glu(x, w, b, "gelu", backend=backend)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (x, w, b), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (x, w, b), grad_out)
    ref = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, "gelu"), x, w, b,
                            grad_out)[1:]
    for a, c, e in zip(first, second, ref, strict=True):
        assert torch.equal(a, c)
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_inference_writes_no_preactivations():
    x, w, b = make_inputs((4,), 6, 3, True, dtype=torch.float32)
    with torch.no_grad():
        out = pykernels.linear_glu(x, w, b, "silu", backend="cpu")
    assert out.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(out, torch_reference(x, w, b, "silu"))


# ---- float32 products big enough for the cpu backend's GLU GEMM (csrc/cpu/gemm.cpp) ------
# Where AVX-512 is there (C at least 2048 x 256, depth at least 256), the gate and up columns
# share a register tile: one k block (K <= 512, no (M, 2n) buffer at all without grad) and
# several (K > 512: the earlier blocks accumulate in gu), partial row and column tiles, and a
# second column panel (n > 1024).
GEMM_SHAPES = [(2053, 300, 141), (2050, 700, 1030)]


@pytest.mark.parametrize("shape, activation", [(GEMM_SHAPES[0], "gelu"), (GEMM_SHAPES[1], "silu"),
                                               (GEMM_SHAPES[1], "relu")],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_cpu_gemm_sizes_match_float64_reference(shape, activation):
    m, k, n = shape
    exact = make_inputs((m,), k, n, True, seed=k)
    float32_rule("cpu", activation, exact)
    low = [t.detach().float() for t in exact]
    with torch.no_grad():  # the forward without kept pre-activations
        assert_low_precision_close(pykernels.linear_glu(*low, activation, backend="cpu"),
                                   torch_reference(*low, activation),
                                   torch_reference(*exact, activation), name="no-grad out")


def test_cpu_gemm_is_bitwise_reproducible_across_thread_counts():
    m, k, n = GEMM_SHAPES[1]
    x, w, b = make_inputs((m,), k, n, True, dtype=torch.float32)
    grad_out = torch.randn(m, n)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append(forward_and_grads(glu("cpu"), x, w, b, grad_out))
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(results[1], results[0], strict=True):
        assert torch.equal(a, e)


def test_cpu_avx2_loops():
    """With torch's CPU capability lowered to AVX2, the AVX2 unit's loops run (this machine
    would otherwise take the AVX-512 ones). The scalar loops are the float64 ones above."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(Path(__file__).with_name("test_ops_generic.py")),
         "-k", "test_float32_low_precision_rule and linear_glu-cpu- and (silu or leaky_relu)"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\n2 passed" in result.stdout  # silu and leaky_relu (ATen's GEMM below 2048 rows)


# ---- registration: torch.compile, the autograd contract (opcheck: test_ops_generic.py) ---

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_function_and_module(backend):
    torch._dynamo.reset()
    mlp = pykernels.nn.GatedMLP(12, 10, activation="gelu_tanh", bias=True, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def step(x):
        with pykernels.use_backend(backend):
            hidden = mlp(x)
        return pykernels.linear_glu(hidden, mlp.up_proj.weight[:8, :12], None, "silu",
                                    backend=backend).sum()

    loss = torch.compile(step, fullgraph=True)(x)
    params = (x, mlp.gate_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight)
    grads = torch.autograd.grad(loss, params)
    ref_loss = torch_reference(reference_mlp(mlp, x), mlp.up_proj.weight[:8, :12], None,
                               "silu").sum()
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_forward_mode_ad_runs_the_composition():
    x, w, b = make_inputs((4,), 5, 3, True)
    tangent = torch.randn_like(x)
    fn = glu("cpu", "gelu")
    _, ours = torch.func.jvp(lambda x: fn(x, w, b), (x,), (tangent,))
    _, ref = torch.func.jvp(lambda x: torch_reference(x, w, b, "gelu"), (x,), (tangent,))
    torch.testing.assert_close(ours, ref)


def test_backend_torch_is_the_reference_composition():
    x, w, b = make_inputs((4,), 5, 3, True)
    out = pykernels.linear_glu(x, w, b, backend="torch")
    assert "linear_glu" not in type(out.grad_fn).__name__.lower()
    torch.testing.assert_close(out, torch_reference(x, w, b, "silu"))


# ---- GPU (cuda-marked: skipped without a CUDA device) -------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "gelu_tanh"])
def test_gpu_matches_float64_reference(backend, dtype, activation):
    exact = [t.detach().cuda().requires_grad_()
             for t in make_inputs((257,), 136, 200, True, seed=10)]
    grad_out = torch.randn(257, 200, dtype=torch.float64, device="cuda")
    low = [t.detach().to(dtype).requires_grad_() for t in exact]
    ours = forward_and_grads(glu(backend, activation), *low, grad_out.to(dtype))
    plain = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation), *low,
                              grad_out.to(dtype))
    ref = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation), *exact,
                            grad_out)
    for name, a, p, e in zip(["out", "grad_input", "grad_weight", "grad_bias"], ours, plain,
                             ref, strict=True):
        assert a.dtype == dtype
        assert_low_precision_close(a, p, e, name=name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
def test_gpu_odd_shapes_zero_rows_and_opcheck(backend):
    for lead, k, n in [((97,), 33, 45), ((0,), 16, 8), ((3, 5), 24, 1)]:
        x, w, b = (t.detach().cuda().requires_grad_() for t in make_inputs(lead, k, n, True))
        assert_matches_reference(backend, "silu", x.float(), w.float(), b.float(),
                                 torch.randn(*lead, n, device="cuda"), 1e-4)
    x, w, b = (t.detach().cuda().float() for t in make_inputs((5,), 8, 4, True))
    opcheck(torch.ops.pykernels.linear_glu_forward,
            (x, w, b, activation_id("gelu"), 0.01, True, backend))
