"""Linear + softmax cross-entropy without materialised logits:
``pykernels.linear_cross_entropy``.

Registered as torch.library custom ops with fake kernels and autograd:

  pykernels::linear_cross_entropy_forward(input, linear_weight, target, linear_bias, weight,
      ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size, compute_grad,
      inplace_backward, backend) -> (loss, grad_input, grad_linear_weight, grad_linear_bias)
  pykernels::linear_cross_entropy_backward(grad_loss, input, linear_weight, target,
      linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      backend) -> (grad_input, grad_linear_weight, grad_linear_bias)

The rows go through in chunks (linear_cross_entropy_chunks.py: the loop and the default
chunk size), with the row kernels of cross_entropy (_cross_entropy_common.py).
With 'mean' and 'sum' the forward keeps these gradients and the backward returns them times
grad_output as new tensors (inplace_backward=True: scaled in place). With reduction='none'
the per-row grad_output is only known in the backward, so the forward computes the loss
alone and the backward recomputes the chunks.
"""

from torch import Tensor

from .. import reference
from ..backends import cpu_kernels_from, resolve
from . import _checks, _contract, _route, _shortcut
from ._cross_entropy_common import (
    EMPTY,
    NONE,
    REDUCTION_NAMES,
    acc_dtype,
    check_eager_targets,
    check_options,
    check_target_and_weight,
    mean_denominator,
    no_graph_after_inplace,
    reduce,
    row_scale,
    scaled_in_place,
)
from .autocast import autocast_operands
from .linear_cross_entropy_chunks import chunk_loop, default_chunk_size


@_route.custom_op("pykernels::linear_cross_entropy_forward")
def linear_cross_entropy_forward(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: int,
    chunk_size: int,
    compute_grad: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    denominator = mean_denominator(reduction, target, weight, ignore_index, acc)
    scale = row_scale(denominator, acc, input.device) if compute_grad else None
    loss_rows, grads = chunk_loop(input, linear_weight, target, linear_bias, weight,
                                  ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                                  backend, scale, compute_grad)
    loss = reduce(loss_rows, reduction, denominator, input.shape[:1], input.dtype)
    return (loss,) + tuple(input.new_empty(EMPTY) if g is None else g for g in grads)


@linear_cross_entropy_forward.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
      z_loss, softcap, reduction, chunk_size, compute_grad, inplace_backward, backend):
    loss = input.new_empty(input.shape[:1] if reduction == NONE else ())
    if not compute_grad:
        return loss, input.new_empty(EMPTY), input.new_empty(EMPTY), input.new_empty(EMPTY)
    bias_shape = linear_weight.shape[:1] if linear_bias is not None else EMPTY
    return (loss, input.new_empty(input.shape), input.new_empty(linear_weight.shape),
            input.new_empty(bias_shape))


@_route.custom_op("pykernels::linear_cross_entropy_backward")
def linear_cross_entropy_backward(
    grad_loss: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction='none': the chunks again, each row's gradient scaled by its grad_loss."""
    scale = grad_loss.to(acc_dtype(input.dtype)).contiguous()
    _, grads = chunk_loop(input, linear_weight, target, linear_bias, weight, ignore_index,
                          label_smoothing, z_loss, softcap, chunk_size, backend, scale, True)
    return tuple(input.new_empty(EMPTY) if g is None else g for g in grads)


@linear_cross_entropy_backward.register_fake
def _(grad_loss, input, linear_weight, target, linear_bias, weight, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, backend):
    bias_shape = linear_weight.shape[:1] if linear_bias is not None else EMPTY
    return (input.new_empty(input.shape), input.new_empty(linear_weight.shape),
            input.new_empty(bias_shape))


def _lce_setup_context(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, z_loss,
     softcap, reduction, chunk_size, compute_grad, inplace_backward, backend) = inputs
    ctx.reduction = reduction
    ctx.inplace = inplace_backward
    ctx.has_bias = linear_bias is not None
    ctx.backend = backend
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
    # The operands are kept (they are alive anyway: a parameter and the hidden states) for
    # the 'none' recompute, a graph of the gradient and a probability target's gradient;
    # inplace_backward keeps only the forward's gradients where it can.
    keeps_operands = reduction == NONE or not ctx.inplace or target.requires_grad
    operands = (input, linear_weight, target, linear_bias, weight) if keeps_operands \
        else (None,) * 5
    forward_grads = output[1:] if reduction != NONE else (None,) * 3
    ctx.save_for_backward(*operands, *forward_grads)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the gradient outputs


def _lce_composition(ctx, weight):
    """The plain-PyTorch linear_cross_entropy of (input, linear_weight, target, bias)."""
    ignore_index, ls, z, cap, _ = ctx.options
    return lambda x, w, t, b: reference.linear_cross_entropy(
        x, w, t, b, weight, REDUCTION_NAMES[ctx.reduction], ignore_index, ls, z, cap or None)


def _lce_backward(ctx, grad_loss, *unused):
    if grad_loss is None:  # grads are not materialised (above): None means zero
        return (None,) * 14
    input, linear_weight, target, linear_bias, weight, *forward_grads = ctx.saved_tensors
    need_input, need_weight, need_target, need_bias = ctx.needs_input_grad[:4]
    operands = (input, linear_weight, target, linear_bias)
    if _contract.graph_requested():
        no_graph_after_inplace(ctx, "linear_cross_entropy")
        grads = _contract.composition_grads(_lce_composition(ctx, weight), operands,
                                            ctx.needs_input_grad[:4], (grad_loss,))
        return (*grads,) + (None,) * 10
    if ctx.reduction == NONE:
        gi, gw, gb = _route.call(
            linear_cross_entropy_backward, grad_loss, input, linear_weight, target,
            linear_bias, weight, *ctx.options, ctx.backend)
    elif ctx.inplace:
        gi, gw, gb = scaled_in_place(forward_grads, grad_loss, ctx.backend)
    else:  # scaled into new tensors: the saved gradients stay as the forward wrote them
        gi, gw, gb = (g * grad_loss for g in forward_grads)
    grad_target = None
    if need_target:
        detached = tuple(None if t is None else t.detach() for t in operands)
        grad_target = _contract.composition_grads(
            _lce_composition(ctx, weight), (*detached[:2], target, detached[3]),
            (False, False, True, False), (grad_loss,), create_graph=False)[2]
    return (gi if need_input else None, gw if need_weight else None, grad_target,
            gb if ctx.has_bias and need_bias else None) + (None,) * 10


_route.register_autograd(linear_cross_entropy_forward, _lce_backward,
                         setup_context=_lce_setup_context)


def _check_lce_args(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                    label_smoothing, z_loss, softcap, chunk_size, inplace_backward):
    _checks.tensor(input, "input")
    _checks.tensor(linear_weight, "linear_weight", like=input)
    if linear_weight.dim() != 2 or linear_weight.shape[0] == 0:
        raise ValueError(f"linear_weight must be 2-D (num_classes >= 1, in_features), got "
                         f"shape {tuple(linear_weight.shape)}")
    if input.dim() not in (1, 2) or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(f"input must be (N, in_features) or (in_features,) with in_features "
                         f"= linear_weight.shape[1] = {linear_weight.shape[1]}, got shape "
                         f"{tuple(input.shape)}")
    if linear_bias is not None:
        _checks.tensor(linear_bias, "linear_bias", like=input)
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got "
                             f"{tuple(linear_bias.shape)}")
    if chunk_size is not None:
        _checks.integer(chunk_size, "chunk_size", low=1)
    options = check_options(reduction, label_smoothing, z_loss, softcap, ignore_index,
                            inplace_backward)
    check_target_and_weight(input.shape[:-1] + linear_weight.shape[:1], input, target, weight)
    _checks.no_grad_for(weight, "weight", "linear_cross_entropy",
                        "gradients with respect to class weights are not supported")
    return options


def _lce_rows(input, target, linear_weight, chunk_size):
    """(input as (N, H), target as (N,) or (N, C), rows per chunk): a 1-D input is one row."""
    rows = input.view(1, -1) if input.dim() == 1 else input
    rows_target = (target.reshape(rows.shape[0], linear_weight.shape[0])
                   if target.is_floating_point() else target.reshape(-1))
    if chunk_size is None:
        chunk_size = default_chunk_size(rows.shape[0], rows.shape[1], linear_weight.shape[0],
                                        rows.device.type)
    return rows, rows_target, chunk_size


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None, chunk_size=None, inplace_backward=False, backend=None):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) without ever
    materialising the (N, num_classes) logits: rows go through in chunks of ``chunk_size``
    (default :func:`default_chunk_size`), so peak extra memory is one chunk of logits.

    Same signature and result as torch.nn.functional.linear_cross_entropy (torch >= 2.13),
    plus z_loss, softcap (see :func:`cross_entropy`), chunk_size, inplace_backward and
    backend. input is (N, in_features) or (in_features,); target int64 (N,) / () or
    probabilities (N, C) / (C,). With 'mean' or 'sum' the forward computes the gradients
    chunk by chunk and keeps them; the backward returns them times grad_output as new
    tensors (default), or scales them in place with ``inplace_backward=True`` (no second
    copy of the weight-sized gradient; a second backward through the same graph then
    raises, and so does create_graph=True; the torch composition, which "auto" runs below
    its CPU size crossover, keeps PyTorch's contract either way).
    """
    if _shortcut.eager(backend):
        loss = _shortcut.CALLS.linear_cross_entropy(
            input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
            label_smoothing, z_loss, softcap, chunk_size, inplace_backward,
            cpu_kernels_from("linear_cross_entropy"))
        if loss is not None:
            return loss
    input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    red, ls, z, cap = _check_lce_args(input, linear_weight, target, linear_bias, weight,
                                      ignore_index, reduction, label_smoothing, z_loss,
                                      softcap, chunk_size, inplace_backward)
    name = resolve(backend, input.device, input.dtype, "linear_cross_entropy",
                   input.numel() * linear_weight.shape[0])
    if name == "torch" or _contract.runs_composition(input, linear_weight, target,
                                                      linear_bias):
        check_eager_targets(target, linear_weight.shape[0], ignore_index)
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias,
                                              weight, reduction, ignore_index,
                                              label_smoothing, z_loss, softcap)
    rows, rows_target, chunk = _lce_rows(input, target, linear_weight, chunk_size)
    # With reduction='none' the backward recomputes (grad_output is per row).
    compute_grad = red != NONE and _contract.wants_grad(input, linear_weight, linear_bias)
    loss, *_ = _route.apply(
        linear_cross_entropy_forward, rows, linear_weight, rows_target, linear_bias, weight,
        ignore_index, ls, z, cap, red, chunk, compute_grad, inplace_backward, name)
    return loss.view(()) if red == NONE and input.dim() == 1 else loss
