"""Fused linear + activation: ``act(input @ weight.T + bias)``.

Two torch.library custom ops carry the work, so autograd, ``torch.compile`` (no graph
break) and ``opcheck`` see one opaque node each:

  pykernels::linear_act_forward(input2d, weight, bias, activation, negative_slope,
                                save_preact, backend) -> (out, preact)
  pykernels::linear_act_backward(grad_out, input2d, weight, saved, activation,
                                 negative_slope, saved_is_output, has_bias,
                                 need_input_grad, need_weight_grad, backend)
      -> (grad_input, grad_weight, grad_bias)

The forward saves the output y when act'(z) is a function of y (relu, sigmoid, tanh,
leaky_relu with slope >= 0: y is kept alive by the next layer anyway, so this costs no
memory), and the pre-activation z otherwise (gelu, gelu_tanh, silu). The backward forms
dz = dy * act'(saved) and the bias gradient sum_rows(dz) in one fused pass, then
grad_input = dz @ weight and grad_weight = dz^T @ input.
"""

import numbers

import torch
from torch import Tensor

from .. import reference
from ..activations import activation_id, grad_from_output
from ..backends import extension, resolve
from .autocast import autocast_operands

_EMPTY_SHAPE = (0,)


def _kernels(backend):
    """The (forward, backward) kernel entry points of a backend."""
    if backend == "triton":
        from ..triton import linear_act as triton_linear_act

        return triton_linear_act.linear_act_forward, triton_linear_act.linear_act_backward
    ext = extension()
    if ext is None:
        raise RuntimeError(f"backend {backend!r} needs pykernels._C, which is not built")
    return ext.linear_act_forward, ext.linear_act_backward


@torch.library.custom_op("pykernels::linear_act_forward", mutates_args=())
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
    return input.new_empty(shape), input.new_empty(shape if save_preact else _EMPTY_SHAPE)


@torch.library.custom_op("pykernels::linear_act_backward", mutates_args=())
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
    def maybe(shape, needed):
        return grad_out.new_empty(shape if needed else _EMPTY_SHAPE)

    return (maybe(input.shape, need_input_grad), maybe(weight.shape, need_weight_grad),
            maybe(weight.shape[:1], has_bias))


def _save(ctx, input, weight, bias, activation, negative_slope, save_preact, backend, out,
          preact):
    """What the backward keeps: input, weight, and y or z (see the module docstring)."""
    ctx.save_for_backward(input, weight, preact if save_preact else out)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.saved_is_output = not save_preact
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _grads(ctx, grad_out, needs_input_grad):
    """(grad_input, grad_weight, grad_bias) for 2-D grad_out; None where not needed."""
    input, weight, saved = ctx.saved_tensors
    need_input, need_weight, need_bias = needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.pykernels.linear_act_backward(
        grad_out, input, weight, saved, ctx.activation, ctx.negative_slope,
        ctx.saved_is_output, ctx.has_bias and need_bias, need_input, need_weight, ctx.backend)
    return (grad_input if need_input else None, grad_weight if need_weight else None,
            grad_bias if ctx.has_bias and need_bias else None)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, *output)
    ctx.mark_non_differentiable(output[1])  # preact is internal: it never gets a gradient
    ctx.set_materialize_grads(False)  # so autograd must not fill an (M, N) zeros for it


def _backward(ctx, grad_out, grad_preact):
    if grad_out is None:  # grads are not materialised (above): None means zero
        return (None,) * 7
    return (*_grads(ctx, grad_out, ctx.needs_input_grad[:3]), None, None, None, None)


torch.library.register_autograd(
    "pykernels::linear_act_forward", _backward, setup_context=_setup_context
)


def _check_args(input, weight, bias, activation, negative_slope):
    """Validate the public arguments; returns the activation id. Errors name the argument."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input.shape[-1] must equal weight.shape[1] (in_features = {weight.shape[1]}), "
            f"got input of shape {tuple(input.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) (out_features), "
            f"got {tuple(bias.shape)}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a real number, got {negative_slope!r}")
    return activation_id(activation)


def _rows(t):
    """``t`` as a 2-D (rows, last dim) tensor; explicit sizes, as -1 fails for 0 columns."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


class LinearActFunction(torch.autograd.Function):
    """``act(input @ weight.T + bias)`` as an autograd.Function over the registered ops.

    ``LinearActFunction.apply(input, weight, bias, activation, negative_slope, backend)``
    with the arguments of :func:`linear_act`; ``backend`` must name a kernel backend
    (cpu, cuda, triton) or be None for the default selection.
    """

    @staticmethod
    def forward(ctx, input, weight, bias=None, activation="none", negative_slope=0.01,
                backend=None):
        act = _check_args(input, weight, bias, activation, negative_slope)
        name = resolve(backend, input.device, input.dtype)
        if name == "torch":
            raise ValueError("LinearActFunction runs kernel backends; for backend='torch' "
                             "call pykernels.reference.linear_act")
        save_preact = not grad_from_output(activation, negative_slope)
        input2d = _rows(input)
        out, preact = torch.ops.pykernels.linear_act_forward(
            input2d, weight, bias, act, float(negative_slope), save_preact, name)
        _save(ctx, input2d, weight, bias, act, float(negative_slope), save_preact, name, out,
              preact)
        ctx.input_shape = input.shape
        return out.view(*input.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        grad_input, grad_weight, grad_bias = _grads(
            ctx, _rows(grad_out), ctx.needs_input_grad[:3])
        if grad_input is not None:
            grad_input = grad_input.view(ctx.input_shape)
        return grad_input, grad_weight, grad_bias, None, None, None


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
    input, weight, bias = autocast_operands(input, weight, bias)
    _check_args(input, weight, bias, activation, negative_slope)
    name = resolve(backend, input.device, input.dtype)
    if name == "torch":
        return reference.linear_act(input, weight, bias, activation, negative_slope)
    return LinearActFunction.apply(input, weight, bias, activation, negative_slope, name)
