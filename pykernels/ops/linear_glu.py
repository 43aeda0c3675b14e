"""Gated linear unit (the linear + activation family):
``act(input @ Wg.T + bg) * (input @ Wu.T + bu)`` with ``weight = [Wg; Wu]``.

Two torch.library custom ops carry the work (autograd, ``torch.compile`` without a graph
break and ``opcheck`` each see one opaque node):

  pykernels::linear_glu_forward(input2d, weight, bias, activation, negative_slope,
                                save_preact, backend) -> (h, gu)
  pykernels::linear_glu_backward(grad_out, input2d, weight, gu, activation, negative_slope,
                                 has_bias, need_input_grad, need_weight_grad, backend)
      -> (grad_input, grad_weight, grad_bias)

The forward computes the gate and up products of an output tile together and gates them in
the GEMM epilogue (cpu: csrc/cpu/gemm.cpp, cuda: kernels/linear_act.cu, triton:
pykernels/triton/linear_glu.py), writing h and, only when autograd will need them, the
pre-activations gu = [g | u] (M, 2 * out), biases included. The backward keeps gu rather
than recomputing it: recomputing is another GEMM as large as the forward's, keeping it is
2 * M * out values, less than the eager composition keeps (g, act(g), u).

Backward, with h = act(g) * u:
    dg = dh * u * act'(g),  du = dh * act(g)          one fused pass, with both bias
    grad_bias = column sums of [dg | du]              gradients
    grad_input = [dg | du] @ weight,  grad_weight = [dg | du]^T @ input
The two GEMMs are linear_act's backward kernels without an activation. When a graph of the
gradient is requested (create_graph=True) the backward differentiates the composition
instead (second order; pykernels/ops/_contract.py).
"""

from torch import Tensor

from .. import reference
from ..activations import ACTIVATION_IDS, ACTIVATIONS
from ..backends import cpu_kernels_from, kernel_extension, resolve
from . import _contract, _route, _shortcut
from ._linear import EMPTY_SHAPE, check_args, fake_grads, rows
from .autocast import autocast_operands


def _kernels(backend):
    """(forward, grad_preact, linear_act_backward) kernel entry points of a backend."""
    if backend == "triton":
        from ..triton import linear_act as triton_linear_act
        from ..triton import linear_glu as triton_linear_glu

        return (triton_linear_glu.linear_glu_forward, triton_linear_glu.linear_glu_grad_preact,
                triton_linear_act.linear_act_backward)
    ext = kernel_extension(backend)
    return ext.linear_glu_forward, ext.linear_glu_grad_preact, ext.linear_act_backward


@_route.custom_op("pykernels::linear_glu_forward")
def linear_glu_forward(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: int,
    negative_slope: float,
    save_preact: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    forward, _, _ = _kernels(backend)
    return forward(input, weight, bias, activation, negative_slope, save_preact)


@linear_glu_forward.register_fake
def _(input, weight, bias, activation, negative_slope, save_preact, backend):
    m, gated = input.shape[0], weight.shape[0]
    return (input.new_empty((m, gated // 2)),
            input.new_empty((m, gated) if save_preact else EMPTY_SHAPE))


@_route.custom_op("pykernels::linear_glu_backward")
def linear_glu_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    gu: Tensor,
    activation: int,
    negative_slope: float,
    has_bias: bool,
    need_input_grad: bool,
    need_weight_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, grad_preact, linear_backward = _kernels(backend)
    dgu, grad_bias = grad_preact(grad_out, gu, activation, negative_slope, has_bias)
    # [dg | du] is the gradient of the pre-activation input @ weight.T + bias: linear_act's
    # backward with no activation (and its bias sum already done) gives the two GEMMs.
    grad_input, grad_weight, _ = linear_backward(
        dgu, input, weight, dgu.new_empty(EMPTY_SHAPE), ACTIVATION_IDS["none"], 0.0, True,
        False, need_input_grad, need_weight_grad)
    return grad_input, grad_weight, grad_bias


@linear_glu_backward.register_fake
def _(grad_out, input, weight, gu, activation, negative_slope, has_bias, need_input_grad,
      need_weight_grad, backend):
    return fake_grads(grad_out, input, weight, need_input_grad, need_weight_grad, has_bias)


def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, negative_slope, save_preact, backend = inputs
    ctx.save_for_backward(input, weight, bias, output[1])
    ctx.options = (activation, negative_slope)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])  # gu is internal: it never gets a gradient
    ctx.set_materialize_grads(False)  # so autograd must not fill an (M, 2 out) zeros for it


def _backward(ctx, grad_out, grad_gu):
    if grad_out is None:  # grads are not materialised (above): None means zero
        return (None,) * 7
    input, weight, bias, gu = ctx.saved_tensors
    activation, negative_slope = ctx.options
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if _contract.graph_requested():
        grads = _contract.composition_grads(
            lambda x, w, b: reference.linear_glu(x, w, b, ACTIVATIONS[activation],
                                                 negative_slope),
            (input, weight, bias), (need_input, need_weight, need_bias), (grad_out,))
        return (*grads, None, None, None, None)
    need_bias = need_bias and bias is not None
    grad_input, grad_weight, grad_bias = _route.call(
        linear_glu_backward, grad_out, input, weight, gu, activation, negative_slope,
        need_bias, need_input, need_weight, ctx.backend)
    return (grad_input if need_input else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None)


_route.register_autograd(linear_glu_forward, _backward, setup_context=_setup_context)


def _check_args(input, weight, bias, activation, negative_slope):
    """Validate the public arguments; returns the activation id. Errors name the argument.

    The linear layer's checks (of the stacked weight), after the one GLU-specific rule."""
    if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] % 2:
        raise ValueError(
            "weight must be (2 * out_features, in_features), the gate rows stacked on the up "
            f"rows, so its first dim must be even; got shape {tuple(weight.shape)}")
    return check_args(input, weight, bias, activation, negative_slope)


def linear_glu(input, weight, bias=None, activation="silu", *, negative_slope=0.01,
               backend=None):
    """``act(input @ Wg.T + bg) * (input @ Wu.T + bu)``, the gated linear unit, fused.

    SwiGLU with silu, GeGLU with gelu / gelu_tanh, ReGLU with relu, ... (every activation
    of :func:`pykernels.linear_act`).

    Args:
        input: ``(..., in_features)``, any number of leading dims (also none, or zero rows).
        weight: ``(2 * out_features, in_features)``: ``Wg`` (gate) stacked on ``Wu`` (up),
            each in torch.nn.Linear layout, e.g. ``torch.cat([gate.weight, up.weight])``.
        bias: ``(2 * out_features,)`` = ``[bg; bu]``, or None.
        activation: none, relu, gelu (erf), gelu_tanh, silu, sigmoid, tanh, leaky_relu
            (applied to the gate), with the semantics of the torch.nn.functional ones.
        negative_slope: leaky_relu's slope.
        backend: cpu, cuda, triton, torch or auto (see pykernels.backends).

    Returns ``(..., out_features)``.
    """
    if _shortcut.eager(backend):
        out = _shortcut.CALLS.linear_glu(input, weight, bias, activation, negative_slope,
                                         cpu_kernels_from("linear_glu"))
        if out is not None:
            return out
    input, weight, bias = autocast_operands(input, weight, bias)
    act = _check_args(input, weight, bias, activation, negative_slope)
    negative_slope = float(negative_slope)
    name = resolve(backend, input.device, input.dtype, "linear_glu",
                   input.numel() * (weight.shape[0] // 2))
    if name == "torch" or _contract.runs_composition(input, weight, bias):
        return reference.linear_glu(input, weight, bias, activation, negative_slope)
    # gu = [g | u] is written only when a backward may need it.
    save_preact = _contract.wants_grad(input, weight, bias)
    h, _ = _route.apply(linear_glu_forward, rows(input), weight, bias, act, negative_slope,
                        save_preact, name)
    return h.view(*input.shape[:-1], weight.shape[0] // 2)
