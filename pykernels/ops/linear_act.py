"""Fused linear + activation: ``act(input @ weight.T + bias)``.

Two torch.library custom ops carry the work, so autograd, ``torch.compile`` (no graph
break) and ``opcheck`` see one opaque node each:

  pykernels::linear_act_forward(input2d, weight, bias, activation, negative_slope,
                                save_preact, backend) -> (out, preact)
  pykernels::linear_act_backward(grad_out, input2d, weight, saved, activation,
                                 negative_slope, saved_is_output, has_bias,
                                 need_input_grad, need_weight_grad, backend)
      -> (grad_input, grad_weight, grad_bias)

The public function calls the forward op; its backward is registered with
torch.library.register_autograd, as every family (docs/ARCHITECTURE.md, "Autograd").

What the backward keeps is what the torch composition keeps, so in-place changes to the
output behave as they do there: the output y for relu, sigmoid and tanh (act'(z) is a
function of y, and torch's own backward of these saves y too: y is kept alive by the next
layer anyway, so this costs no memory), the pre-activation z for gelu, gelu_tanh, silu and
leaky_relu (torch saves their input), nothing for "none". The backward forms
dz = dy * act'(saved) and the bias gradient sum_rows(dz) in one fused pass, then
grad_input = dz @ weight and grad_weight = dz^T @ input. When a graph of the gradient is
requested (create_graph=True) it differentiates the composition instead (second order).
"""

from torch import Tensor

from .. import reference
from ..activations import ACTIVATIONS
from ..backends import cpu_kernels_from, kernel_extension, resolve
from . import _contract, _route, _shortcut
from ._linear import EMPTY_SHAPE, check_args, fake_grads, rows
from .autocast import autocast_operands


def _kernels(backend):
    """The (forward, backward) kernel entry points of a backend."""
    if backend == "triton":
        from ..triton import linear_act as triton_linear_act

        return triton_linear_act.linear_act_forward, triton_linear_act.linear_act_backward
    ext = kernel_extension(backend)
    return ext.linear_act_forward, ext.linear_act_backward


@_route.custom_op("pykernels::linear_act_forward")
def linear_act_forward(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: int,
    negative_slope: float,
    save_preact: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    forward, _ = _kernels(backend)
    return forward(input, weight, bias, activation, negative_slope, save_preact)


@linear_act_forward.register_fake
def _(input, weight, bias, activation, negative_slope, save_preact, backend):
    shape = (input.shape[0], weight.shape[0])
    return input.new_empty(shape), input.new_empty(shape if save_preact else EMPTY_SHAPE)


@_route.custom_op("pykernels::linear_act_backward")
def linear_act_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    saved: Tensor,
    activation: int,
    negative_slope: float,
    saved_is_output: bool,
    has_bias: bool,
    need_input_grad: bool,
    need_weight_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _kernels(backend)
    return backward(grad_out, input, weight, saved, activation, negative_slope,
                    saved_is_output, has_bias, need_input_grad, need_weight_grad)


@linear_act_backward.register_fake
def _(grad_out, input, weight, saved, activation, negative_slope, saved_is_output, has_bias,
      need_input_grad, need_weight_grad, backend):
    return fake_grads(grad_out, input, weight, need_input_grad, need_weight_grad, has_bias)


# Activations whose backward keeps the output y (see the module docstring).
_KEEPS_OUTPUT = ("relu", "sigmoid", "tanh")


def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, negative_slope, save_preact, backend = inputs
    out, preact = output
    # The op is consistent for any save_preact its caller passes; linear_act passes the
    # choice of the module docstring.
    ctx.keeps_output = not save_preact and ACTIVATIONS[activation] != "none"
    saved = preact if save_preact else (out if ctx.keeps_output else None)
    ctx.save_for_backward(input, weight, bias, saved)
    ctx.options = (activation, negative_slope)
    ctx.backend = backend
    ctx.mark_non_differentiable(preact)  # preact is internal: it never gets a gradient
    ctx.set_materialize_grads(False)  # so autograd must not fill an (M, N) zeros for it


def _composition(input, weight, bias, activation, negative_slope):
    return reference.linear_act(input, weight, bias, ACTIVATIONS[activation], negative_slope)


def _backward(ctx, grad_out, grad_preact):
    if grad_out is None:  # grads are not materialised (above): None means zero
        return (None,) * 7
    input, weight, bias, saved = ctx.saved_tensors
    activation, negative_slope = ctx.options
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if _contract.graph_requested():
        grads = _contract.composition_grads(
            lambda x, w, b: _composition(x, w, b, activation, negative_slope),
            (input, weight, bias), (need_input, need_weight, need_bias), (grad_out,))
        return (*grads, None, None, None, None)
    need_bias = need_bias and bias is not None
    if saved is None:  # no activation: the kernels read dy in its place
        saved = grad_out.new_empty(EMPTY_SHAPE)
    grad_input, grad_weight, grad_bias = _route.call(
        linear_act_backward, grad_out, input, weight, saved, activation, negative_slope,
        ctx.keeps_output, need_bias, need_input, need_weight, ctx.backend)
    return (grad_input if need_input else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None)


_route.register_autograd(linear_act_forward, _backward, setup_context=_setup_context)


def linear_act(input, weight, bias=None, activation="none", *, negative_slope=0.01,
               backend=None):
    """``act(input @ weight.T + bias)`` with the activation fused into the GEMM epilogue.

    Args:
        input: ``(..., in_features)``, any number of leading dims (also none, or zero rows).
        weight: ``(out_features, in_features)``, torch.nn.Linear layout.
        bias: ``(out_features,)`` or None.
        activation: none, relu, gelu (erf), gelu_tanh, silu, sigmoid, tanh, leaky_relu,
            with the semantics of the torch.nn.functional ones.
        negative_slope: leaky_relu's slope.
        backend: cpu, cuda, triton, torch or auto (see pykernels.backends).
    """
    if _shortcut.eager(backend):
        out = _shortcut.CALLS.linear_act(input, weight, bias, activation, negative_slope,
                                         cpu_kernels_from("linear_act"))
        if out is not None:
            return out
    input, weight, bias = autocast_operands(input, weight, bias)
    act = check_args(input, weight, bias, activation, negative_slope)
    negative_slope = float(negative_slope)
    name = resolve(backend, input.device, input.dtype, "linear_act",
                   input.numel() * weight.shape[0])
    if name == "torch" or _contract.runs_composition(input, weight, bias):
        return reference.linear_act(input, weight, bias, activation, negative_slope)
    save_preact = activation not in ("none",) + _KEEPS_OUTPUT
    out, _ = _route.apply(linear_act_forward, rows(input), weight, bias, act, negative_slope,
                          save_preact, name)
    return out.view(*input.shape[:-1], weight.shape[0])
