"""pykernels.linear_glu's inputs for the generic op checks (checks.py): shapes, activations,
options and backends, the call and its plain-torch reference."""

import torch
import torch.nn.functional as F
from checks import BadInput, Case, OpCheck, non_contiguous_linear, present
from conftest import cpu_kernel_backends

import pykernels
from pykernels.activations import ACTIVATIONS, activation_id

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


def reference_mlp(mlp, x):
    """HF LlamaMLP's forward, written out: down(act(gate(x)) * up(x))."""
    gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    return F.linear(ACTIVATION_FNS[mlp.activation](gate, mlp.negative_slope) * up,
                    mlp.down_proj.weight, mlp.down_proj.bias)


def make_inputs(lead, k, n, bias, dtype=torch.float64, seed=0):
    """x (*lead, k), weight (2n, k), bias (2n) or None, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(2 * n, k, generator=g, dtype=torch.float64) / max(k, 1) ** 0.5
    b = torch.randn(2 * n, generator=g, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b)]


def glu(backend, activation="silu", negative_slope=0.01):
    return lambda x, w, b=None: pykernels.linear_glu(
        x, w, b, activation, negative_slope=negative_slope, backend=backend)


def case(id, backend, activation, inputs, negative_slope=0.01, **options):
    """A Case of linear_glu(x, w[, b]) on ``backend``; ``inputs()`` gives (x, w[, b])."""
    return Case(id=f"{backend}-{id}", inputs=inputs,
                ours=glu(backend, activation, negative_slope),
                reference=lambda x, w, b=None: torch_reference(x, w, b, activation,
                                                               negative_slope),
                **options)


def _non_contiguous_grad_out(inputs):
    g = torch.Generator().manual_seed(8)
    return torch.randn(9, 2, 5, generator=g, dtype=torch.float64).transpose(0, 1) \
        .contiguous().transpose(0, 1)


# The interpreter is slow: triton's gradcheck takes four activations, the cpu backend all.
TRITON_GRADCHECK = ("silu", "gelu_tanh", "relu", "leaky_relu")


def cases():
    out = []
    kernels = cpu_kernel_backends()
    for backend in [*kernels, "torch"]:
        for activation in ACTIVATIONS:
            # 97 x 33 -> 2 x 45: partial tiles
            out.append(case(f"{activation}-97x33x45", backend, activation,
                            lambda: present(*make_inputs((97,), 33, 45, True, seed=1)),
                            checks=("float32",)))
            out.append(case(f"{activation}-2x3x5x7x6", backend, activation,
                            lambda: present(*make_inputs((2, 3, 5), 7, 6, True, seed=2))))
        out.append(case("gelu_tanh-non_contiguous", backend, "gelu_tanh",
                        lambda: non_contiguous_linear(10, seed=7),
                        grad_out=_non_contiguous_grad_out))
    for backend in kernels:
        for activation in ACTIVATIONS:
            if backend != "triton" or activation in TRITON_GRADCHECK:
                out.append(case(f"{activation}-3x4x2", backend, activation,
                                lambda: present(*make_inputs((3,), 4, 2, True, seed=3)),
                                checks=("gradcheck",)))
        out.append(case("gelu-nobias", backend, "gelu",
                        lambda: present(*make_inputs((6,), 5, 3, False, seed=5))))
        for slope in (0.0, 0.2, -0.3):
            out.append(case(f"leaky_relu-slope{slope}", backend, "leaky_relu",
                            lambda: present(*make_inputs((11,), 6, 4, True, seed=6)),
                            negative_slope=slope, tol=1e-12))
        # no in_features: act(gate bias) * up bias
        out.append(case("sigmoid-no_in_features", backend, "sigmoid",
                        lambda: present(*make_inputs((3,), 0, 4, True)), tol=1e-12))
    return out


def opchecks():
    out = []
    for backend in cpu_kernel_backends():
        for activation in ("relu", "gelu", "leaky_relu"):
            for bias in (True, False):
                act = activation_id(activation)

                def inputs(bias=bias):
                    return make_inputs((5,), 7, 3, bias, dtype=torch.float32)

                def detached(bias=bias):
                    return [None if t is None else t.detach() for t in inputs(bias)]

                name = f"{backend}-{activation}-{'bias' if bias else 'nobias'}"
                out += [
                    OpCheck(f"forward-grad-{name}", torch.ops.pykernels.linear_glu_forward,
                            lambda i=inputs, a=act, be=backend: (*i(), a, 0.01, True, be)),
                    OpCheck(f"forward-nograd-{name}", torch.ops.pykernels.linear_glu_forward,
                            lambda i=detached, a=act, be=backend: (*i(), a, 0.01, False, be)),
                    OpCheck(f"backward-{name}", torch.ops.pykernels.linear_glu_backward,
                            lambda i=detached, a=act, bias=bias, be=backend: (
                                torch.randn(5, 3), *i()[:2], torch.randn(5, 6), a, 0.01, bias,
                                True, True, be)),
                ]
    return out


def _call(input=None, weight=None, bias=None, activation="silu", **kwargs):
    """linear_glu on (3, 5) x (8, 5) + (8,) float32, with any argument replaced."""
    x, w, b = (t.detach() for t in make_inputs((3,), 5, 4, True, dtype=torch.float32))
    return lambda: pykernels.linear_glu(x if input is None else input,
                                        w if weight is None else weight,
                                        b if bias is None else bias, activation, **kwargs)


def bad_inputs():
    return [BadInput(id, call, error, pattern) for id, error, pattern, call in [
        ("odd_weight", ValueError, "weight must be .*even", _call(weight=torch.randn(7, 5))),
        ("weight_1d", ValueError, "weight must be 2-D", _call(weight=torch.randn(8))),
        ("bias_shape", ValueError, r"bias must have shape \(8,\)", _call(bias=torch.randn(4))),
        ("in_features", ValueError, r"input.shape\[-1\] must equal weight.shape\[1\]",
         _call(input=torch.randn(3, 6))),
        ("weight_dtype", TypeError, "weight has dtype torch.float64 but input has dtype",
         _call(weight=torch.randn(8, 5, dtype=torch.float64))),
        ("bias_dtype", TypeError, "bias has dtype", _call(bias=torch.randn(8,
                                                                           dtype=torch.float64))),
        ("weight_device", ValueError, "weight is on meta but input is on cpu",
         _call(weight=torch.randn(8, 5, device="meta"))),
        ("not_tensor", TypeError, "input must be a torch.Tensor", _call(input=[[1.0] * 5])),
        ("integer_input", TypeError, "input must be a floating-point tensor",
         _call(input=torch.ones(3, 5, dtype=torch.int64))),
        ("activation", ValueError, "activation must be one of", _call(activation="swish")),
        ("slope", TypeError, "negative_slope must be a real number", _call(negative_slope="0.1")),
        ("backend", ValueError, "backend", _call(backend="nope")),
    ]]
