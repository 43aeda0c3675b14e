"""pykernels.linear_glu and pykernels.nn.GatedMLP: every backend against plain PyTorch
(float64 references)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_kernel_backends, gpu_kernel_backends
from torch.library import opcheck

import pykernels
from pykernels.activations import ACTIVATIONS, activation_id
from pykernels.testing import assert_low_precision_close

CPU_BACKENDS = cpu_kernel_backends()
ALL_CPU = [*CPU_BACKENDS, "torch"]

ACTIVATION_FNS = {
    "none": lambda z, s: z,
    "relu": lambda z, s: F.relu(z),
    "gelu": lambda z, s: F.gelu(z),
    "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"),
    "silu": lambda z, s: F.silu(z),
    "sigmoid": lambda z, s: torch.sigmoid(z),
    "tanh": lambda z, s: torch.tanh(z),
    "leaky_relu": lambda z, s: F.leaky_relu(z, s),
}


def torch_reference(x, w, b, activation, negative_slope=0.01):
    """Independent of pykernels: two F.linear calls on the halves of the stacked weight."""
    n = w.shape[0] // 2
    gate = F.linear(x, w[:n], None if b is None else b[:n])
    up = F.linear(x, w[n:], None if b is None else b[n:])
    return ACTIVATION_FNS[activation](gate, negative_slope) * up


def make_inputs(lead, k, n, bias, dtype=torch.float64, seed=0):
    """x (*lead, k), weight (2n, k), bias (2n) or None, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(2 * n, k, generator=g, dtype=torch.float64) / max(k, 1) ** 0.5
    b = torch.randn(2 * n, generator=g, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b)]


def forward_and_grads(fn, x, w, b, grad_out):
    out = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


def glu(backend, activation="silu", negative_slope=0.01):
    return lambda x, w, b: pykernels.linear_glu(x, w, b, activation,
                                                negative_slope=negative_slope, backend=backend)


def assert_matches_reference(backend, activation, x, w, b, grad_out, tol, negative_slope=0.01):
    ours = forward_and_grads(glu(backend, activation, negative_slope), x, w, b, grad_out)
    ref = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation, negative_slope),
                            x, w, b, grad_out)
    for a, e in zip(ours, ref, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    return ours


def float32_against_float64(backend, activation, exact, grad_out):
    """linear_glu on float32 copies of `exact` vs plain float32 torch, both vs float64."""
    low = [None if t is None else t.detach().float().requires_grad_() for t in exact]
    ours = forward_and_grads(glu(backend, activation), *low, grad_out.float())
    plain = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation), *low,
                              grad_out.float())
    ref = forward_and_grads(lambda x, w, b: torch_reference(x, w, b, activation), *exact,
                            grad_out)
    names = ["out", "grad_input", "grad_weight", "grad_bias"][:len(ref)]
    for name, a, p, e in zip(names, ours, plain, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape
        assert_low_precision_close(a, p, e, name=name)


# ---- values and gradients against float64 -------------------------------------------------

@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_matches_float64_reference(backend, activation):
    exact = make_inputs((97,), 33, 45, True, seed=1)  # 97 x 33 -> 2 x 45: partial tiles
    float32_against_float64(backend, activation, exact, torch.randn(97, 45, dtype=torch.float64))


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_matches_reference_with_leading_dims(backend, activation):
    x, w, b = make_inputs((2, 3, 5), 7, 6, True, seed=2)
    assert_matches_reference(backend, activation, x, w, b,
                             torch.randn(2, 3, 5, 6, dtype=torch.float64), 1e-10)


# The interpreter is slow: triton takes four activations, the cpu backend all of them.
@pytest.mark.parametrize("backend, activation", [
    (backend, activation) for backend in CPU_BACKENDS for activation in ACTIVATIONS
    if backend != "triton" or activation in ("silu", "gelu_tanh", "relu", "leaky_relu")])
def test_gradcheck_float64(backend, activation):
    x, w, b = make_inputs((3,), 4, 2, True, seed=3)
    assert torch.autograd.gradcheck(glu(backend, activation), (x, w, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gradgradcheck_float64(backend, activation):
    x, w, b = make_inputs((3,), 4, 2, True, seed=4)
    assert torch.autograd.gradgradcheck(glu(backend, activation), (x, w, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_bias_and_only_requested_gradients(backend):
    x, w, _ = make_inputs((6,), 5, 3, False, seed=5)
    assert_matches_reference(backend, "gelu", x, w, None, torch.randn(6, 3, dtype=torch.float64),
                             1e-10)
    x.requires_grad_(False)
    out = pykernels.linear_glu(x, w, None, "silu", backend=backend)
    (grad_w,) = torch.autograd.grad(out.sum(), (w,))
    w_ref = w.detach().requires_grad_()
    torch.testing.assert_close(grad_w, torch.autograd.grad(
        torch_reference(x, w_ref, None, "silu").sum(), (w_ref,))[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("negative_slope", [0.0, 0.2, -0.3])
def test_leaky_relu_slopes(backend, negative_slope):
    x, w, b = make_inputs((11,), 6, 4, True, seed=6)
    assert_matches_reference(backend, "leaky_relu", x, w, b,
                             torch.randn(11, 4, dtype=torch.float64), 1e-12,
                             negative_slope=negative_slope)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, 2, 9, generator=g, dtype=torch.float64).transpose(0, 2)  # (9, 2, 13)
    w = torch.randn(13, 10, generator=g, dtype=torch.float64).t()  # (10, 13), transposed
    b = torch.randn(20, generator=g, dtype=torch.float64)[::2]  # stride 2
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    for t in (x, w, b):
        t.requires_grad_()
    assert_matches_reference(backend, "gelu_tanh", x, w, b,
                             torch.randn(9, 2, 5, dtype=torch.float64).transpose(0, 1)
                             .contiguous().transpose(0, 1), 1e-10)


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
def test_no_in_features_gives_act_of_bias_times_bias(backend):
    x, w, b = make_inputs((3,), 0, 4, True)
    assert_matches_reference(backend, "sigmoid", x, w, b, torch.randn(3, 4, dtype=torch.float64),
                             1e-12)


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
    grad_out = torch.randn(m, n, dtype=torch.float64)
    float32_against_float64("cpu", activation, exact, grad_out)
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
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "test_float32_matches_float64_reference and cpu and (silu or leaky_relu)"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\n2 passed" in result.stdout  # silu and leaky_relu (ATen's GEMM below 2048 rows)


# ---- registration: opcheck, torch.compile, the autograd contract -------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(backend, activation, bias):
    x, w, b = make_inputs((5,), 7, 3, bias, dtype=torch.float32)
    act = activation_id(activation)
    opcheck(torch.ops.pykernels.linear_glu_forward, (x, w, b, act, 0.01, True, backend))
    opcheck(torch.ops.pykernels.linear_glu_forward,
            (x.detach(), w.detach(), None if b is None else b.detach(), act, 0.01, False,
             backend))
    opcheck(torch.ops.pykernels.linear_glu_backward,
            (torch.randn(5, 3), x.detach(), w.detach(), torch.randn(5, 6), act, 0.01, bias,
             True, True, backend))


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


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("case, error, pattern", [
    ("odd_weight", ValueError, "weight must be .*even"),
    ("weight_1d", ValueError, "weight must be 2-D"),
    ("bias_shape", ValueError, r"bias must have shape \(8,\)"),
    ("in_features", ValueError, r"input.shape\[-1\] must equal weight.shape\[1\]"),
    ("weight_dtype", TypeError, "weight has dtype torch.float64 but input has dtype"),
    ("bias_dtype", TypeError, "bias has dtype"),
    ("weight_device", ValueError, "weight is on meta but input is on cpu"),
    ("not_tensor", TypeError, "input must be a torch.Tensor"),
    ("integer_input", TypeError, "input must be a floating-point tensor"),
    ("activation", ValueError, "activation must be one of"),
    ("slope", TypeError, "negative_slope must be a real number"),
    ("backend", ValueError, "backend"),
])
def test_bad_input(case, error, pattern):
    x, w, b = (t.detach() for t in make_inputs((3,), 5, 4, True, dtype=torch.float32))
    args, kwargs = [x, w, b, "silu"], {}
    if case == "odd_weight":
        args[1] = torch.randn(7, 5)
    elif case == "weight_1d":
        args[1] = torch.randn(8)
    elif case == "bias_shape":
        args[2] = torch.randn(4)
    elif case == "in_features":
        args[0] = torch.randn(3, 6)
    elif case == "weight_dtype":
        args[1] = w.double()
    elif case == "bias_dtype":
        args[2] = b.double()
    elif case == "weight_device":
        args[1] = w.to("meta")
    elif case == "not_tensor":
        args[0] = [[1.0] * 5]
    elif case == "integer_input":
        args[0] = torch.ones(3, 5, dtype=torch.int64)
    elif case == "activation":
        args[3] = "swish"
    elif case == "slope":
        kwargs["negative_slope"] = "0.1"
    elif case == "backend":
        kwargs["backend"] = "nope"
    with pytest.raises(error, match=pattern):
        pykernels.linear_glu(*args, **kwargs)


# ---- GatedMLP --------------------------------------------------------------------------------

def reference_mlp(mlp, x):
    """HF LlamaMLP's forward, written out: down(act(gate(x)) * up(x))."""
    gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    return F.linear(ACTIVATION_FNS[mlp.activation](gate, mlp.negative_slope) * up,
                    mlp.down_proj.weight, mlp.down_proj.bias)


def test_gated_mlp_loads_a_llama_state_dict_and_matches_it():
    d_model, hidden = 16, 44
    g = torch.Generator().manual_seed(9)
    llama = {  # the keys and shapes of transformers' LlamaMLP (bias=False)
        "gate_proj.weight": torch.randn(hidden, d_model, generator=g, dtype=torch.float64),
        "up_proj.weight": torch.randn(hidden, d_model, generator=g, dtype=torch.float64),
        "down_proj.weight": torch.randn(d_model, hidden, generator=g, dtype=torch.float64),
    }
    mlp = pykernels.nn.GatedMLP(d_model, hidden, dtype=torch.float64)
    mlp.load_state_dict(llama, strict=True)
    assert list(mlp.state_dict()) == list(llama)
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, llama[key])
    x = torch.randn(2, 5, d_model, generator=g, dtype=torch.float64)
    out = mlp(x)
    ref = reference_mlp(mlp, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = list(mlp.parameters())
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for a, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_gated_mlp_with_bias_round_trips_and_names_its_activation():
    mlp = pykernels.nn.GatedMLP(8, 12, activation="leaky_relu", bias=True, negative_slope=0.2)
    other = pykernels.nn.GatedMLP(8, 12, activation="leaky_relu", bias=True,
                                  negative_slope=0.2)
    other.load_state_dict(mlp.state_dict(), strict=True)
    assert sorted(mlp.state_dict()) == sorted(
        f"{name}_proj.{p}" for name in ("gate", "up", "down") for p in ("weight", "bias"))
    x = torch.randn(4, 8)
    torch.testing.assert_close(other(x), mlp(x))
    torch.testing.assert_close(mlp(x), reference_mlp(mlp, x))
    assert "negative_slope=0.2" in repr(mlp)
    with pytest.raises(ValueError, match="activation must be one of"):
        pykernels.nn.GatedMLP(8, 12, activation="swish")


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
