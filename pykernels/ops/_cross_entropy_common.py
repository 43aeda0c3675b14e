"""What the two softmax cross-entropy families (cross_entropy.py, linear_cross_entropy.py)
share: a backend's row kernels, the reductions with PyTorch's 'mean' divisor, the in-place
scaling of inplace_backward, and the argument checks.

Each backend provides two row kernels (cpu and cuda in pykernels._C, triton in
pykernels.triton.cross_entropy), with the math in kernels/cross_entropy.h:

  cross_entropy_rows(logits (A, C, B), target, class_weight, ignore_index, label_smoothing,
                     z_loss, softcap, grad, scale) -> row losses (A * B), in fp32 (fp64 for
                     fp64 logits); when grad is given, scale * dloss/dlogits is written there
  cross_entropy_scale_grad_(grad (A, C, B), scale)    grad *= scale, per row or one scalar
"""

import torch

from ..backends import extension, kernel_extension
from . import _checks

REDUCTION_NAMES = ("none", "mean", "sum")
_REDUCTIONS = {name: i for i, name in enumerate(REDUCTION_NAMES)}
NONE, MEAN = 0, 1
EMPTY = (0,)


def row_kernels(backend):
    """The (rows, scale_grad_) row kernels of a backend."""
    if backend == "triton":
        from ..triton import cross_entropy as triton_cross_entropy

        return (triton_cross_entropy.cross_entropy_rows,
                triton_cross_entropy.cross_entropy_scale_grad_)
    ext = kernel_extension(backend)
    return ext.cross_entropy_rows, ext.cross_entropy_scale_grad_


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def view3d(t):
    """Logits-shaped ``t`` as (A, C, B): (C,) -> (1, C, 1), (N, C, d...) -> (N, C, prod d)."""
    if t.dim() == 1:
        return t.view(1, t.shape[0], 1)
    return t.reshape(t.shape[0], t.shape[1], t.shape[2:].numel())


def check_targets(target, num_classes, ignore_index):
    """Index targets must be in [0, C) or ignore_index. For CPU tensors a ValueError names
    the first other one before any kernel runs: a loop on the host in pykernels._C, no
    tensor operations. On a GPU asynchronously (no host sync): a bad target fails the device
    assertion, raised at the latest when the loss is read, and the kernels never use it as
    an index (its row is NaN)."""
    if target.device.type == "cpu":
        kernel_extension("cpu").cross_entropy_check_targets(target, num_classes, ignore_index)
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    torch._assert_async(~bad.any(), "pykernels cross_entropy: target out of range")


def check_eager_targets(target, num_classes, ignore_index):
    """check_targets for the torch composition's route, so that a bad CPU target raises the
    kernels' ValueError at every size "auto" may route there (F.cross_entropy would raise
    an IndexError of its own). Only index targets of ordinary CPU tensors in an eager call:
    fake, meta and traced tensors have no data, and F.cross_entropy still reports a bad
    target there (as it does where pykernels._C is not built)."""
    ext = extension()
    if (ext is not None and type(target) is torch.Tensor and target.dtype == torch.int64
            and target.is_cpu and not torch.compiler.is_compiling()):
        ext.cross_entropy_check_targets(target, num_classes, ignore_index)


def mean_denominator(reduction, target, weight, ignore_index, acc):
    """For reduction 'mean', the divisor PyTorch uses, as a device tensor (None for the
    other reductions): the summed class weight of the non-ignored index targets (their count
    without weights), or the row count for probability targets. Out-of-range targets are
    clamped for the gather only. A forward computes it once for its loss and its gradient's
    scale."""
    if reduction != MEAN:
        return None
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


def _mean(total, denominator):
    """total / the 'mean' denominator; NaN when that is 0, as in PyTorch, where the
    nll part is then 0/0 whatever the label-smoothing part adds."""
    return torch.where(denominator == 0, torch.nan, total / denominator)


def row_scale(denominator, acc, device):
    """The (1,) factor the forward folds into the gradient: 1 / the 'mean' denominator, 1
    for the other reductions (denominator None)."""
    one = torch.ones(1, dtype=acc, device=device)
    return one if denominator is None else _mean(one, denominator)


def reduce(loss_rows, reduction, denominator, shape, dtype):
    if reduction == NONE:
        # A view of the row buffer would be an output autograd treats as a view, so that
        # in-place changes to the loss (``loss *= w``) would raise: copy the N values.
        loss = loss_rows.view(shape)
        return loss.to(dtype) if loss.dtype != dtype else loss.clone()
    total = loss_rows.sum()
    if reduction == MEAN:
        total = _mean(total, denominator)
    return total.to(dtype)


def scaled_in_place(grads, grad_loss, backend):
    """inplace_backward: the forward's gradients times grad_loss, scaled where they lie."""
    for g in grads:
        torch.ops.pykernels.cross_entropy_scale_grad_(g, grad_loss, backend)
    return grads


def no_graph_after_inplace(ctx, op):
    if ctx.inplace:
        raise RuntimeError(
            f"pykernels.{op}(inplace_backward=True) keeps only its own first-order "
            f"gradient, so no graph of the gradient can be built (create_graph=True): "
            f"call it with inplace_backward=False")


def check_options(reduction, label_smoothing, z_loss, softcap, ignore_index,
                  inplace_backward):
    """Options shared by both functions; returns (reduction id, ls, z, softcap or 0)."""
    _checks.choice(reduction, "reduction", REDUCTION_NAMES)
    _checks.integer(ignore_index, "ignore_index")
    label_smoothing = _checks.real(label_smoothing, "label_smoothing", 0.0, 1.0)
    z_loss = _checks.real(z_loss, "z_loss", 0.0, finite=True)
    softcap = 0.0 if softcap is None else _checks.real(softcap, "softcap", 0.0,
                                                       low_open=True)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    return _REDUCTIONS[reduction], label_smoothing, z_loss, softcap


def check_target_and_weight(logits_shape, input, target, weight, target_name="target"):
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
