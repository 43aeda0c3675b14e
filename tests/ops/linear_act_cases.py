"""pykernels.linear_act's inputs for the generic op checks (checks.py): shapes, activations,
options and backends, the call and its plain-torch reference."""

import torch
import torch.nn.functional as F
from checks import BadInput, Case, OpCheck, non_contiguous_linear, present
from conftest import cpu_kernel_backends

import pykernels
from pykernels.activations import ACTIVATIONS, activation_id


def torch_reference(x, w, b, activation, negative_slope=0.01):
    """Independent of pykernels: straight torch.nn.functional."""
    z = F.linear(x, w, b)
    return {
        "none": lambda: z,
        "relu": lambda: F.relu(z),
        "gelu": lambda: F.gelu(z),
        "gelu_tanh": lambda: F.gelu(z, approximate="tanh"),
        "silu": lambda: F.silu(z),
        "sigmoid": lambda: torch.sigmoid(z),
        "tanh": lambda: torch.tanh(z),
        "leaky_relu": lambda: F.leaky_relu(z, negative_slope),
    }[activation]()


def make_inputs(lead, k, n, bias, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(device, dtype).requires_grad_() for t in (x, w, b)]


def case(id, backend, activation, inputs, negative_slope=0.01, **options):
    """A Case of linear_act(x, w[, b]) on ``backend``; ``inputs()`` gives (x, w[, b])."""
    return Case(
        id=f"{backend}-{id}", inputs=inputs,
        ours=lambda x, w, b=None: pykernels.linear_act(
            x, w, b, activation, negative_slope=negative_slope, backend=backend),
        reference=lambda x, w, b=None: torch_reference(x, w, b, activation, negative_slope),
        **options)


FLOAT32_SHAPES = [(1, 1, 1), (17, 33, 9), (97, 65, 31), (4, 128, 96)]


def cases():
    out = []
    for backend in cpu_kernel_backends():
        for activation in ACTIVATIONS:
            for bias in (True, False):
                for lead, name in [((), "1d"), ((3,), "2d"), ((2, 3), "3d")]:
                    out.append(case(
                        f"{activation}-{'bias' if bias else 'nobias'}-{name}", backend,
                        activation, lambda lead=lead, bias=bias: present(
                            *make_inputs(lead, 7, 5, bias)),
                        checks=("gradcheck",)))
            for m, k, n in FLOAT32_SHAPES:
                out.append(case(f"{activation}-{m}x{k}x{n}", backend, activation,
                                lambda m=m, k=k, n=n: present(
                                    *make_inputs((m,), k, n, True, seed=m)),
                                checks=("float32",)))
        # slope < 0 switches the saved tensor from the output to the pre-activation.
        for slope in (0.0, 0.2, -0.3, 1.5):
            out.append(case(f"leaky_relu-slope{slope}", backend, "leaky_relu",
                            lambda: present(*make_inputs((11,), 6, 4, True)),
                            negative_slope=slope, tol=1e-12))
        out.append(case("gelu-non_contiguous", backend, "gelu",
                        lambda: non_contiguous_linear(7, seed=3)))
        # K = 0: the product is empty, so out = act(bias); N = 0: an empty output.
        for k, n, name in [(0, 4, "no_in_features"), (5, 0, "no_out_features")]:
            out.append(case(f"sigmoid-{name}", backend, "sigmoid",
                            lambda k=k, n=n: present(*make_inputs((3, 2), k, n, True)),
                            tol=1e-12))
    return out


def opchecks():
    out = []
    for backend in cpu_kernel_backends():
        for activation in ("none", "relu", "gelu", "leaky_relu"):
            for bias in (True, False):
                act, save_preact = activation_id(activation), activation in ("gelu",
                                                                             "leaky_relu")

                def inputs(bias=bias):
                    return make_inputs((5,), 7, 3, bias, dtype=torch.float32)

                name = f"{backend}-{activation}-{'bias' if bias else 'nobias'}"
                out.append(OpCheck(
                    f"forward-{name}", torch.ops.pykernels.linear_act_forward,
                    lambda inputs=inputs, act=act, save=save_preact, backend=backend: (
                        *inputs(), act, 0.01, save, backend)))
                out.append(OpCheck(
                    f"backward-{name}", torch.ops.pykernels.linear_act_backward,
                    lambda inputs=inputs, act=act, save=save_preact, bias=bias,
                    backend=backend: (
                        torch.randn(5, 3), *(t.detach() for t in inputs()[:2]),
                        torch.randn(5, 3), act, 0.01, not save, bias, True, True, backend)))
    return out


def _call(input=None, weight=None, bias=None, activation="relu", **kwargs):
    """linear_act on (2, 3) x (4, 3) + (4,) float32, with any argument replaced."""
    return lambda: pykernels.linear_act(
        torch.randn(2, 3) if input is None else input,
        torch.randn(4, 3) if weight is None else weight,
        torch.randn(4) if bias is None else bias, activation, **kwargs)


def bad_inputs():
    return [BadInput(id, call, error, pattern) for id, error, pattern, call in [
        ("mixed_dtype", TypeError, "weight has dtype", _call(weight=torch.randn(4, 3).double())),
        ("bias_dtype", TypeError, "bias has dtype", _call(bias=torch.randn(4).double())),
        ("mixed_device", ValueError, "weight is on meta", _call(weight=torch.randn(4, 3,
                                                                                  device="meta"))),
        ("in_features", ValueError, r"input.shape\[-1\] must equal weight.shape\[1\]",
         _call(weight=torch.randn(4, 5))),
        ("bias_shape", ValueError, r"bias must have shape \(4,\)", _call(bias=torch.randn(5))),
        ("weight_1d", ValueError, "weight must be 2-D", _call(weight=torch.randn(3))),
        ("weight_3d", ValueError, "weight must be 2-D", _call(weight=torch.randn(1, 4, 3))),
        ("int_input", TypeError, "input must be a floating-point tensor",
         _call(input=torch.ones(2, 3, dtype=torch.int64))),
        ("int_weight", TypeError, "weight must be a floating-point tensor",
         _call(weight=torch.ones(4, 3, dtype=torch.int32))),
        ("not_tensor", TypeError, "input must be a torch.Tensor", _call(input=[[1.0, 2.0, 3.0]])),
        ("activation", ValueError, "activation must be one of", _call(activation="swish")),
        ("backend_name", ValueError, "backend must be one of", _call(backend="cudnn")),
        ("backend_unavailable", RuntimeError, "backend 'cuda' is not available for cpu tensors",
         _call(backend="cuda")),
        ("backend_dtype", TypeError, "backend 'cpu' on cpu supports dtypes float32, float64",
         _call(torch.randn(2, 3).half(), torch.randn(4, 3).half(), torch.randn(4).half(),
               backend="cpu")),
        ("slope", TypeError, "negative_slope must be a real number", _call(negative_slope="0.1")),
        ("scalar_input", ValueError, "input.shape", _call(input=torch.tensor(1.0))),
    ]]
