"""Fused softmax-cross-entropy, and linear + cross-entropy without materialised logits.

Each backend provides two row kernels (cpu and cuda in pykernels._C, triton in
pykernels.triton.cross_entropy), with the math in kernels/cross_entropy.h:

  cross_entropy_rows(logits (A, C, B), target, class_weight, ignore_index, label_smoothing,
                     z_loss, softcap, grad, scale) -> row losses (A * B), in fp32 (fp64 for
                     fp64 logits); when grad is given, scale * dloss/dlogits is written there
  cross_entropy_scale_grad_(grad (A, C, B), scale)    grad *= scale, per row or one scalar

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
  pykernels::linear_cross_entropy_forward(input, linear_weight, target, linear_bias, weight,
      ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size, compute_grad,
      inplace_backward, backend) -> (loss, grad_input, grad_linear_weight, grad_linear_bias)
  pykernels::linear_cross_entropy_backward(grad_loss, input, linear_weight, target,
      linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      backend) -> (grad_input, grad_linear_weight, grad_linear_bias)

linear_cross_entropy runs over chunks of rows: logits_chunk = x_chunk @ W^T + b, the row
kernel turns them into their gradient in place, then grad_x_chunk = dlogits @ W and
grad_W += dlogits^T @ x_chunk (each GEMM accumulating in fp32; grad_W adds chunk by chunk in
W's dtype, as torch's own chunked linear_cross_entropy does on CUDA, so no (V, H) fp32 buffer
is held), grad_b += column sums in fp32. Peak extra memory is one (chunk, V) logits block.
With 'mean' and 'sum' the forward keeps these gradients and the backward returns them times
grad_output as new tensors (inplace_backward=True: scaled in place). With reduction='none'
the per-row grad_output is only known in the backward, so the forward computes the loss
alone and the backward recomputes the chunks.
"""

import torch
from torch import Tensor

from .. import reference
from ..backends import kernel_extension, resolve
from . import _checks, _contract
from .autocast import autocast_operands

_REDUCTION_NAMES = ("none", "mean", "sum")
_REDUCTIONS = {name: i for i, name in enumerate(_REDUCTION_NAMES)}
_NONE, _MEAN, _SUM = 0, 1, 2
_EMPTY = (0,)


def _kernels(backend):
    """The (rows, scale_grad_) row kernels of a backend."""
    if backend == "triton":
        from ..triton import cross_entropy as triton_cross_entropy

        return (triton_cross_entropy.cross_entropy_rows,
                triton_cross_entropy.cross_entropy_scale_grad_)
    ext = kernel_extension(backend)
    return ext.cross_entropy_rows, ext.cross_entropy_scale_grad_


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view3d(t):
    """Logits-shaped ``t`` as (A, C, B): (C,) -> (1, C, 1), (N, C, d...) -> (N, C, prod d)."""
    if t.dim() == 1:
        return t.view(1, t.shape[0], 1)
    return t.reshape(t.shape[0], t.shape[1], t.shape[2:].numel())


def _check_targets(target, num_classes, ignore_index):
    """Index targets must be in [0, C) or ignore_index. Checked on the host for CPU tensors
    before any kernel runs; on a GPU asynchronously (no host sync): a bad target fails the
    device assertion, raised at the latest when the loss is read, and the kernels never use
    it as an index (its row is NaN)."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if target.device.type != "cpu":
        torch._assert_async(~bad.any(), "pykernels cross_entropy: target out of range")
    elif bad.any():
        value = int(target[bad][0])
        raise ValueError(f"target contains class index {value}, outside [0, {num_classes}) "
                         f"and not ignore_index ({ignore_index})")


def _denominator(target, weight, ignore_index, acc):
    """The 'mean' divisor PyTorch uses, as a device tensor: the summed class weight of the
    non-ignored index targets (their count without weights), or the row count for
    probability targets. Out-of-range targets are clamped for the gather only."""
    if target.is_floating_point():
        rows = target.shape[0] if target.dim() > 1 else 1
        if target.dim() > 2:
            rows *= target.shape[2:].numel()
        return torch.full((), rows, dtype=acc, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(acc)
    classes = target.clamp(0, weight.shape[0] - 1)
    return (weight.to(acc)[classes] * valid).sum()


def _mean(total, target, weight, ignore_index):
    """total / the 'mean' denominator; NaN when that is 0, as in PyTorch, where the
    nll part is then 0/0 whatever the label-smoothing part adds."""
    denominator = _denominator(target, weight, ignore_index, total.dtype)
    return torch.where(denominator == 0, torch.nan, total / denominator)


def _row_scale(reduction, target, weight, ignore_index, acc):
    """The (1,) factor the forward folds into the gradient: 1 / denominator for 'mean'."""
    one = torch.ones(1, dtype=acc, device=target.device)
    return _mean(one, target, weight, ignore_index) if reduction == _MEAN else one


def _reduce(loss_rows, reduction, target, weight, ignore_index, shape, dtype):
    if reduction == _NONE:
        # A view of the row buffer would be an output autograd treats as a view, so that
        # in-place changes to the loss (``loss *= w``) would raise: copy the N values.
        loss = loss_rows.view(shape)
        return loss.to(dtype) if loss.dtype != dtype else loss.clone()
    total = loss_rows.sum()
    if reduction == _MEAN:
        total = _mean(total, target, weight, ignore_index)
    return total.to(dtype)


def _loss_shape(input):
    """reduction='none' output shape: the input's without the class dim."""
    return input.shape[:0] if input.dim() == 1 else input.shape[:1] + input.shape[2:]


# ---------------------------------------------------------------------------------------
# cross_entropy


@torch.library.custom_op("pykernels::cross_entropy_forward", mutates_args=())
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
        _check_targets(target.reshape(-1), input.shape[reference.class_dim(input)],
                       ignore_index)
    scale = (_row_scale(reduction, target, weight, ignore_index, _acc_dtype(input.dtype))
             if compute_grad else None)
    loss_rows, grad = _rows(input, target, weight, ignore_index, label_smoothing, z_loss,
                            softcap, scale, backend)
    loss = _reduce(loss_rows, reduction, target, weight, ignore_index, _loss_shape(input),
                   input.dtype)
    return loss, (grad if compute_grad else input.new_empty(_EMPTY))


def _rows(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale,
          backend):
    """The backend's row kernel over logits of any accepted shape: (row losses, and
    scale * dloss/dinput in input's shape, or None without ``scale``)."""
    rows_kernel, _ = _kernels(backend)
    logits = _view3d(input)
    rows_target = (_view3d(target) if target.is_floating_point()
                   else target.reshape(-1).contiguous())
    class_weight = None if weight is None else weight.to(_acc_dtype(input.dtype)).contiguous()
    grad = None if scale is None else torch.empty(logits.shape, dtype=input.dtype,
                                                  device=input.device)
    loss_rows = rows_kernel(logits, rows_target, class_weight, ignore_index, label_smoothing,
                            z_loss, softcap, grad, scale)
    return loss_rows, None if grad is None else grad.view(input.shape)


@cross_entropy_forward.register_fake
def _(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
      compute_grad, backend):
    shape = _loss_shape(input) if reduction == _NONE else ()
    return input.new_empty(shape), input.new_empty(input.shape if compute_grad else _EMPTY)


@torch.library.custom_op("pykernels::cross_entropy_scale_grad_", mutates_args=("grad",))
def cross_entropy_scale_grad_(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    """grad (the loss's input shape, contiguous) *= grad_output: one scalar, or the
    reduction='none' loss (one value per row)."""
    if grad.numel() == 0:
        return
    _, scale_kernel = _kernels(backend)
    # contiguous: a grad_output from .sum() or .mean() is an expanded (stride 0) view
    scale = grad_output.to(_acc_dtype(grad.dtype)).reshape(-1).contiguous()
    scale_kernel(grad.view(1, grad.numel(), 1) if scale.numel() == 1 else _view3d(grad), scale)


@cross_entropy_scale_grad_.register_fake
def _(grad, grad_output, backend):
    return None


@torch.library.custom_op("pykernels::cross_entropy_backward", mutates_args=())
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
    acc = _acc_dtype(input.dtype)
    scale = _row_scale(reduction, target, weight, ignore_index, acc) \
        * grad_loss.to(acc).reshape(-1)
    _, grad = _rows(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                    scale.contiguous(), backend)
    return grad


@cross_entropy_backward.register_fake
def _(grad_loss, input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
      reduction, backend):
    return input.new_empty(input.shape)


def _scaled_in_place(grads, grad_loss, backend):
    """inplace_backward: the forward's gradients times grad_loss, scaled where they lie."""
    for g in grads:
        torch.ops.pykernels.cross_entropy_scale_grad_(g, grad_loss, backend)
    return grads


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
        x, t, weight, ignore_index, _REDUCTION_NAMES[reduction], ls, z, cap or None)


def _ce_backward(ctx, grad_loss, grad_grad):
    if grad_loss is None:  # grads are not materialised (above): None means zero
        return (None,) * 10
    input, target, weight, saved_grad = ctx.saved_tensors
    composition = _ce_composition(ctx.options, weight)
    need_input, need_target = ctx.needs_input_grad[:2]
    if _contract.graph_requested():
        _no_graph_after_inplace(ctx, "cross_entropy")
        grads = _contract.composition_grads(composition, (input, target),
                                            (need_input, need_target), (grad_loss,))
        return (*grads,) + (None,) * 8
    grad_input = grad_target = None
    if need_input and ctx.inplace:
        (grad_input,) = _scaled_in_place((saved_grad,), grad_loss, ctx.backend)
    elif need_input:
        grad_input = torch.ops.pykernels.cross_entropy_backward(
            grad_loss, input, target, weight, *ctx.options, ctx.backend)
    if need_target:
        _, grad_target = _contract.composition_grads(
            composition, (input.detach(), target), (False, True), (grad_loss,),
            create_graph=False)
    return (grad_input, grad_target) + (None,) * 8


def _no_graph_after_inplace(ctx, op):
    if ctx.inplace:
        raise RuntimeError(
            f"pykernels.{op}(inplace_backward=True) keeps only its own first-order "
            f"gradient, so no graph of the gradient can be built (create_graph=True): "
            f"call it with inplace_backward=False")


torch.library.register_autograd(
    "pykernels::cross_entropy_forward", _ce_backward, setup_context=_ce_setup_context
)


def _check_common(reduction, label_smoothing, z_loss, softcap, ignore_index,
                  inplace_backward):
    """Options shared by both functions; returns (reduction id, ls, z, softcap or 0)."""
    _checks.choice(reduction, "reduction", _REDUCTION_NAMES)
    _checks.integer(ignore_index, "ignore_index")
    label_smoothing = _checks.real(label_smoothing, "label_smoothing", 0.0, 1.0)
    z_loss = _checks.real(z_loss, "z_loss", 0.0, finite=True)
    softcap = 0.0 if softcap is None else _checks.real(softcap, "softcap", 0.0,
                                                       low_open=True)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    return _REDUCTIONS[reduction], label_smoothing, z_loss, softcap


def _check_target_and_weight(logits_shape, input, target, weight, target_name="target"):
    """target: int64 of logits_shape less the class dim, or probabilities of logits_shape
    in input's dtype; weight: (C,) floating."""
    _checks.tensor(target, target_name, floating=False, like=input, same_dtype=False)
    num_classes = logits_shape[0 if len(logits_shape) == 1 else 1]
    if target.is_floating_point():
        if tuple(target.shape) != tuple(logits_shape):
            raise ValueError(f"probability {target_name} must have the logits' shape "
                             f"{tuple(logits_shape)}, got {tuple(target.shape)}")
        if target.dtype != input.dtype:
            raise TypeError(f"probability {target_name} has dtype {target.dtype} but input "
                            f"has dtype {input.dtype}")
    else:
        if target.dtype != torch.int64:
            raise TypeError(f"{target_name} must be int64 class indices or floating-point "
                            f"probabilities, got dtype {target.dtype}")
        want = tuple(logits_shape[1:0] if len(logits_shape) == 1
                     else (logits_shape[0],) + tuple(logits_shape[2:]))
        if tuple(target.shape) != want:
            raise ValueError(f"class-index {target_name} must have shape {want} for logits "
                             f"of shape {tuple(logits_shape)}, got {tuple(target.shape)}")
    if weight is not None:
        _checks.tensor(weight, "weight", like=input, same_dtype=False)
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},) (one per class), "
                             f"got {tuple(weight.shape)}")


def _check_ce_args(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap, inplace_backward):
    _checks.tensor(input, "input")
    if input.dim() == 0 or input.shape[reference.class_dim(input)] == 0:
        raise ValueError(f"input must be (C,), (N, C) or (N, C, d1, ...) with C >= 1, got "
                         f"shape {tuple(input.shape)}")
    options = _check_common(reduction, label_smoothing, z_loss, softcap, ignore_index,
                            inplace_backward)
    _check_target_and_weight(input.shape, input, target, weight)
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
            inplace operation"), and create_graph=True raises.
        backend: cpu, cuda, triton, torch or auto (see pykernels.backends).
    """
    red, ls, z, cap = _check_ce_args(input, target, weight, ignore_index, reduction,
                                     label_smoothing, z_loss, softcap, inplace_backward)
    name = resolve(backend, input.device, input.dtype)
    if name == "torch" or _contract.runs_composition(input, target):
        return reference.cross_entropy(input, target, weight, ignore_index, reduction,
                                       label_smoothing, z_loss, softcap)
    loss, _ = torch.ops.pykernels.cross_entropy_forward(
        input, target, weight, ignore_index, ls, z, cap, red,
        inplace_backward and _contract.wants_grad(input), name)
    return loss


# ---------------------------------------------------------------------------------------
# linear_cross_entropy


# CPU floor on the rows per chunk. Each chunk runs three ATen GEMMs, each one OpenMP
# parallel region that ends when its slowest thread does; beside another busy process a
# preempted thread holds every region up by about a scheduler slice (~10 ms measured, 2
# threads), so short GEMMs lose their parallel speedup and more: at N=2048, H=256, V=8192,
# fp32, 2 threads, 64-row chunks (96 regions) took 1.3-1.5 s against 0.5 s in one chunk and
# 0.65 s eager. GEMMs of at least 2^30 multiply-adds (512 rows there) run tens of ms each, so
# the slice is small beside them; they are also the fastest on one thread (K = 64 rows makes
# grad_W += dlogits^T x re-read and re-write all of grad_W for little work). The floor never
# grows a logits block past 2^24 elements (64 MiB in fp32), so small H keeps memory bounded.
_CPU_CHUNK_MIN_MACS = 1 << 30
_CPU_CHUNK_FLOOR_MAX_ELEMENTS = 1 << 24


def default_chunk_size(rows, in_features, num_classes, device_type="cuda"):
    """Rows per chunk: the (chunk, V) logits block about as large as the (N, H) input,
    and at least 64 rows so the GEMMs stay efficient; on the CPU (``device_type="cpu"``)
    at least enough rows for 2^30 multiply-adds per GEMM, capped at 2^24 logits."""
    classes = max(1, num_classes)
    chunk = max(64, -(-rows * in_features // classes))
    if device_type == "cpu":
        gemm_rows = -(-_CPU_CHUNK_MIN_MACS // (max(1, in_features) * classes))
        chunk = max(chunk, min(gemm_rows, _CPU_CHUNK_FLOOR_MAX_ELEMENTS // classes))
    return max(1, min(rows, chunk))


def _lce_chunks(input, linear_weight, target, linear_bias, weight, ignore_index,
                label_smoothing, z_loss, softcap, chunk_size, backend, scale, grads):
    """The chunk loop of both linear_cross_entropy ops. Returns the (N,) row losses; with
    ``scale`` ((1,) or (N,)) also the gradients times it: (grad_input, grad_linear_weight,
    grad_linear_bias or None)."""
    rows_kernel, _ = _kernels(backend)
    acc = _acc_dtype(input.dtype)
    n, num_classes = input.shape[0], linear_weight.shape[0]
    class_weight = None if weight is None else weight.to(acc).contiguous()
    prob = target.is_floating_point()
    if not prob:
        _check_targets(target, num_classes, ignore_index)
    loss_rows = torch.empty(n, dtype=acc, device=input.device)
    grad_input = grad_weight = grad_bias = None
    if grads:
        grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
        # contiguous whatever linear_weight's strides (e.g. a transposed view): the
        # in-place scaling views it flat
        grad_weight = torch.zeros(linear_weight.shape, dtype=linear_weight.dtype,
                                  device=linear_weight.device)
        if linear_bias is not None:
            grad_bias = torch.zeros(num_classes, dtype=acc, device=input.device)
    weight_t = linear_weight.t()
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        x = input[start:stop]
        logits = (x @ weight_t if linear_bias is None
                  else torch.addmm(linear_bias, x, weight_t))
        logits3d = logits.view(stop - start, num_classes, 1)
        rows_target = (_view3d(target[start:stop]) if prob
                       else target[start:stop].contiguous())
        chunk_scale = None
        if grads:
            chunk_scale = scale if scale.numel() == 1 else scale[start:stop].contiguous()
        loss_rows[start:stop] = rows_kernel(
            logits3d, rows_target, class_weight, ignore_index, label_smoothing, z_loss,
            softcap, logits3d if grads else None, chunk_scale)
        if grads:  # logits now hold dloss/dlogits of the chunk
            torch.mm(logits, linear_weight, out=grad_input[start:stop])
            grad_weight.addmm_(logits.t(), x)
            if grad_bias is not None:
                grad_bias += logits.sum(0, dtype=acc)
    if grads and grad_bias is not None:
        grad_bias = grad_bias.to(input.dtype)
    return loss_rows, (grad_input, grad_weight, grad_bias)


@torch.library.custom_op("pykernels::linear_cross_entropy_forward", mutates_args=())
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
    acc = _acc_dtype(input.dtype)
    scale = _row_scale(reduction, target, weight, ignore_index, acc) if compute_grad else None
    loss_rows, grads = _lce_chunks(input, linear_weight, target, linear_bias, weight,
                                   ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                                   backend, scale, compute_grad)
    loss = _reduce(loss_rows, reduction, target, weight, ignore_index, input.shape[:1],
                   input.dtype)
    return (loss,) + tuple(input.new_empty(_EMPTY) if g is None else g for g in grads)


@linear_cross_entropy_forward.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
      z_loss, softcap, reduction, chunk_size, compute_grad, inplace_backward, backend):
    loss = input.new_empty(input.shape[:1] if reduction == _NONE else ())
    if not compute_grad:
        return loss, input.new_empty(_EMPTY), input.new_empty(_EMPTY), input.new_empty(_EMPTY)
    bias_shape = linear_weight.shape[:1] if linear_bias is not None else _EMPTY
    return (loss, input.new_empty(input.shape), input.new_empty(linear_weight.shape),
            input.new_empty(bias_shape))


@torch.library.custom_op("pykernels::linear_cross_entropy_backward", mutates_args=())
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
    scale = grad_loss.to(_acc_dtype(input.dtype)).contiguous()
    _, grads = _lce_chunks(input, linear_weight, target, linear_bias, weight, ignore_index,
                           label_smoothing, z_loss, softcap, chunk_size, backend, scale, True)
    return tuple(input.new_empty(_EMPTY) if g is None else g for g in grads)


@linear_cross_entropy_backward.register_fake
def _(grad_loss, input, linear_weight, target, linear_bias, weight, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, backend):
    bias_shape = linear_weight.shape[:1] if linear_bias is not None else _EMPTY
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
    keeps_operands = reduction == _NONE or not ctx.inplace or target.requires_grad
    operands = (input, linear_weight, target, linear_bias, weight) if keeps_operands \
        else (None,) * 5
    forward_grads = output[1:] if reduction != _NONE else (None,) * 3
    ctx.save_for_backward(*operands, *forward_grads)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the gradient outputs


def _lce_composition(ctx, weight):
    """The plain-PyTorch linear_cross_entropy of (input, linear_weight, target, bias)."""
    ignore_index, ls, z, cap, _ = ctx.options
    return lambda x, w, t, b: reference.linear_cross_entropy(
        x, w, t, b, weight, _REDUCTION_NAMES[ctx.reduction], ignore_index, ls, z, cap or None)


def _lce_backward(ctx, grad_loss, *unused):
    if grad_loss is None:  # grads are not materialised (above): None means zero
        return (None,) * 14
    input, linear_weight, target, linear_bias, weight, *forward_grads = ctx.saved_tensors
    need_input, need_weight, need_target, need_bias = ctx.needs_input_grad[:4]
    operands = (input, linear_weight, target, linear_bias)
    if _contract.graph_requested():
        _no_graph_after_inplace(ctx, "linear_cross_entropy")
        grads = _contract.composition_grads(_lce_composition(ctx, weight), operands,
                                            ctx.needs_input_grad[:4], (grad_loss,))
        return (*grads,) + (None,) * 10
    if ctx.reduction == _NONE:
        gi, gw, gb = torch.ops.pykernels.linear_cross_entropy_backward(
            grad_loss, input, linear_weight, target, linear_bias, weight, *ctx.options,
            ctx.backend)
    elif ctx.inplace:
        gi, gw, gb = _scaled_in_place(forward_grads, grad_loss, ctx.backend)
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


torch.library.register_autograd(
    "pykernels::linear_cross_entropy_forward", _lce_backward, setup_context=_lce_setup_context
)


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
    options = _check_common(reduction, label_smoothing, z_loss, softcap, ignore_index,
                            inplace_backward)
    _check_target_and_weight(input.shape[:-1] + linear_weight.shape[:1], input, target, weight)
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
    raises, and so does create_graph=True).
    """
    input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    red, ls, z, cap = _check_lce_args(input, linear_weight, target, linear_bias, weight,
                                      ignore_index, reduction, label_smoothing, z_loss,
                                      softcap, chunk_size, inplace_backward)
    name = resolve(backend, input.device, input.dtype)
    if name == "torch" or _contract.runs_composition(input, linear_weight, target,
                                                      linear_bias):
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias,
                                              weight, reduction, ignore_index,
                                              label_smoothing, z_loss, softcap)
    rows, rows_target, chunk = _lce_rows(input, target, linear_weight, chunk_size)
    # With reduction='none' the backward recomputes (grad_output is per row).
    compute_grad = red != _NONE and _contract.wants_grad(input, linear_weight, linear_bias)
    loss, *_ = torch.ops.pykernels.linear_cross_entropy_forward(
        rows, linear_weight, rows_target, linear_bias, weight, ignore_index, ls, z, cap, red,
        chunk, compute_grad, inplace_backward, name)
    return loss.view(()) if red == _NONE and input.dim() == 1 else loss
