"""Fused softmax cross-entropy: ``pykernels.cross_entropy``.

The row kernels, the reductions and the checks it shares with linear_cross_entropy are in
_cross_entropy_common.py.

cross_entropy, by default (PyTorch's autograd contract: nothing saved is modified): the
forward computes the loss alone and keeps the logits, as eager keeps its log-softmax; the
backward runs the row kernel once more with scale = grad_output / the mean's denominator
(per row for 'none'), writing the gradient into a new tensor. A second backward gives the
same gradient.

cross_entropy(inplace_backward=True), the memory trick of fused losses: the forward writes
the gradient in the same pass over the logits that computes the loss (the row is still in
cache), already divided by the mean's denominator, and keeps only it (the logits may be
freed). The backward multiplies it by grad_output in place, and the kernels skip that
multiply where grad_output is exactly 1, deciding it on the device: the usual
``loss.backward()`` moves the logits once and the gradient once in total. Because the
backward consumes the saved gradient, a second backward through the same graph raises
autograd's "modified by an inplace operation" error instead of giving a wrong result, and
a graph of the gradient (create_graph=True) cannot be built (a clear error).
Without autograd (no_grad, or logits that do not require grad) only the loss is computed.
A probability target's gradient and any graph of the gradient come from the plain-PyTorch
composition (pykernels/ops/_contract.py).

Registered as torch.library custom ops with fake kernels and autograd:

  pykernels::cross_entropy_forward(input, target, weight, ignore_index, label_smoothing,
      z_loss, softcap, reduction, compute_grad, backend) -> (loss, grad_input)
      (compute_grad: inplace_backward's gradient written by the forward)
  pykernels::cross_entropy_backward(grad_loss, input, target, weight, ignore_index,
      label_smoothing, z_loss, softcap, reduction, backend) -> grad_input
  pykernels::cross_entropy_scale_grad_(grad!, grad_output, backend) -> ()
"""

import torch
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
    check_targets,
    mean_denominator,
    no_graph_after_inplace,
    reduce,
    row_kernels,
    row_scale,
    scaled_in_place,
    view3d,
)

# Importable from here as before; the function lives in linear_cross_entropy.py.
from .linear_cross_entropy import linear_cross_entropy  # noqa: F401


def _loss_shape(input):
    """reduction='none' output shape: the input's without the class dim."""
    return input.shape[:0] if input.dim() == 1 else input.shape[:1] + input.shape[2:]


@_route.custom_op("pykernels::cross_entropy_forward")
def cross_entropy_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: int,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if not target.is_floating_point():
        check_targets(target, input.shape[reference.class_dim(input)], ignore_index)
    acc = acc_dtype(input.dtype)
    denominator = mean_denominator(reduction, target, weight, ignore_index, acc)
    scale = row_scale(denominator, acc, input.device) if compute_grad else None
    loss_rows, grad = _rows(input, target, weight, ignore_index, label_smoothing, z_loss,
                            softcap, scale, backend)
    loss = reduce(loss_rows, reduction, denominator, _loss_shape(input), input.dtype)
    return loss, (grad if compute_grad else input.new_empty(EMPTY))


def _rows(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale,
          backend):
    """The backend's row kernel over logits of any accepted shape: (row losses, and
    scale * dloss/dinput in input's shape, or None without ``scale``)."""
    rows_kernel, _ = row_kernels(backend)
    logits = view3d(input)
    rows_target = (view3d(target) if target.is_floating_point()
                   else target.reshape(-1).contiguous())
    class_weight = None if weight is None else weight.to(acc_dtype(input.dtype)).contiguous()
    grad = None if scale is None else torch.empty(logits.shape, dtype=input.dtype,
                                                  device=input.device)
    loss_rows = rows_kernel(logits, rows_target, class_weight, ignore_index, label_smoothing,
                            z_loss, softcap, grad, scale)
    return loss_rows, None if grad is None else grad.view(input.shape)


@cross_entropy_forward.register_fake
def _(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
      compute_grad, backend):
    shape = _loss_shape(input) if reduction == NONE else ()
    return input.new_empty(shape), input.new_empty(input.shape if compute_grad else EMPTY)


@torch.library.custom_op("pykernels::cross_entropy_scale_grad_", mutates_args=("grad",))
def cross_entropy_scale_grad_(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    """grad (the loss's input shape, contiguous) *= grad_output: one scalar, or the
    reduction='none' loss (one value per row)."""
    if grad.numel() == 0:
        return
    _, scale_kernel = row_kernels(backend)
    # contiguous: a grad_output from .sum() or .mean() is an expanded (stride 0) view
    scale = grad_output.to(acc_dtype(grad.dtype)).reshape(-1).contiguous()
    scale_kernel(grad.view(1, grad.numel(), 1) if scale.numel() == 1 else view3d(grad), scale)


@cross_entropy_scale_grad_.register_fake
def _(grad, grad_output, backend):
    return None


@_route.custom_op("pykernels::cross_entropy_backward")
def cross_entropy_backward(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: int,
    backend: str,
) -> Tensor:
    """dloss/dinput * grad_loss, from the logits: the row kernel again, writing
    scale * dloss/dlogits with scale = grad_loss (one value, or one per row for 'none')
    times 1 / the mean's denominator."""
    acc = acc_dtype(input.dtype)
    scale = grad_loss.to(acc).reshape(-1)
    denominator = mean_denominator(reduction, target, weight, ignore_index, acc)
    if denominator is not None:  # the forward's factor, as the default forward folds it
        scale = row_scale(denominator, acc, input.device) * scale
    _, grad = _rows(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                    scale.contiguous(), backend)
    return grad


@cross_entropy_backward.register_fake
def _(grad_loss, input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
      reduction, backend):
    return input.new_empty(input.shape)


def _ce_setup_context(ctx, inputs, output):
    (input, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
     compute_grad, backend) = inputs
    ctx.inplace = compute_grad  # the forward wrote the gradient: inplace_backward
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, reduction)
    ctx.backend = backend
    # The default keeps the logits (as eager keeps its log-softmax) and computes the
    # gradient in the backward; inplace_backward keeps only the forward's gradient, unless
    # a probability target needs the logits for its own gradient.
    keeps_input = not ctx.inplace or target.requires_grad
    ctx.save_for_backward(input if keeps_input else None, target, weight,
                          output[1] if ctx.inplace else None)
    ctx.mark_non_differentiable(output[1])
    # The gradient output never receives a gradient: without this, autograd would fill an
    # input-sized tensor of zeros for it on every backward.
    ctx.set_materialize_grads(False)


def _ce_composition(options, weight):
    """The plain-PyTorch cross_entropy of (input, target) with the op's options."""
    ignore_index, ls, z, cap, reduction = options
    return lambda x, t: reference.cross_entropy(
        x, t, weight, ignore_index, REDUCTION_NAMES[reduction], ls, z, cap or None)


def _ce_backward(ctx, grad_loss, grad_grad):
    if grad_loss is None:  # grads are not materialised (above): None means zero
        return (None,) * 10
    input, target, weight, saved_grad = ctx.saved_tensors
    composition = _ce_composition(ctx.options, weight)
    need_input, need_target = ctx.needs_input_grad[:2]
    if _contract.graph_requested():
        no_graph_after_inplace(ctx, "cross_entropy")
        grads = _contract.composition_grads(composition, (input, target),
                                            (need_input, need_target), (grad_loss,))
        return (*grads,) + (None,) * 8
    grad_input = grad_target = None
    if need_input and ctx.inplace:
        (grad_input,) = scaled_in_place((saved_grad,), grad_loss, ctx.backend)
    elif need_input:
        grad_input = _route.call(cross_entropy_backward, grad_loss, input, target, weight,
                                 *ctx.options, ctx.backend)
    if need_target:
        _, grad_target = _contract.composition_grads(
            composition, (input.detach(), target), (False, True), (grad_loss,),
            create_graph=False)
    return (grad_input, grad_target) + (None,) * 8


_route.register_autograd(cross_entropy_forward, _ce_backward, setup_context=_ce_setup_context)


def _check_ce_args(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap, inplace_backward):
    _checks.tensor(input, "input")
    if input.dim() == 0 or input.shape[reference.class_dim(input)] == 0:
        raise ValueError(f"input must be (C,), (N, C) or (N, C, d1, ...) with C >= 1, got "
                         f"shape {tuple(input.shape)}")
    options = check_options(reduction, label_smoothing, z_loss, softcap, ignore_index,
                            inplace_backward)
    check_target_and_weight(input.shape, input, target, weight)
    # PyTorch does not differentiate class weights either (it raises in the backward).
    _checks.no_grad_for(weight, "weight", "cross_entropy",
                        "gradients with respect to class weights are not supported")
    return options


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, inplace_backward=False,
                  backend=None):
    """torch.nn.functional.cross_entropy, fused: one pass over the logits per row.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...), any float dtype the backend takes.
        target: int64 class indices of shape (), (N,) or (N, d1, ...), or class
            probabilities of the input's shape and dtype (differentiable).
        weight: (C,) class weights, or None.
        ignore_index, reduction, label_smoothing: as in PyTorch (same 'mean' divisor,
            same result when every target is ignored).
        z_loss: adds z_loss * logsumexp(logits)**2 to each non-ignored row's loss.
        softcap: computes on softcap * tanh(logits / softcap) when given (> 0).
        inplace_backward: False (default): PyTorch's autograd contract; the logits are kept
            for the backward, which runs the row kernel once more to write the gradient.
            True: the forward writes the gradient in the same pass as the loss and keeps
            only it (the logits can be freed), and the backward scales it in place; a
            second backward through the same graph then raises (autograd's "modified by an
            inplace operation"), and create_graph=True raises. The torch composition
            (backend='torch', or "auto" below its CPU size crossover) keeps PyTorch's
            contract either way.
        backend: cpu, cuda, triton, torch or auto (see pykernels.backends).
    """
    if _shortcut.eager(backend):
        loss = _shortcut.CALLS.cross_entropy(input, target, weight, ignore_index, reduction,
                                             label_smoothing, z_loss, softcap,
                                             inplace_backward, cpu_kernels_from("cross_entropy"))
        if loss is not None:
            return loss
    red, ls, z, cap = _check_ce_args(input, target, weight, ignore_index, reduction,
                                     label_smoothing, z_loss, softcap, inplace_backward)
    name = resolve(backend, input.device, input.dtype, "cross_entropy", input.numel())
    if name == "torch" or _contract.runs_composition(input, target):
        check_eager_targets(target, input.shape[reference.class_dim(input)], ignore_index)
        return reference.cross_entropy(input, target, weight, ignore_index, reduction,
                                       label_smoothing, z_loss, softcap)
    loss, _ = _route.apply(cross_entropy_forward, input, target, weight, ignore_index, ls, z,
                           cap, red, inplace_backward and _contract.wants_grad(input), name)
    return loss
