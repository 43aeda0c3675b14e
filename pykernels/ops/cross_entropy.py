"""Fused softmax-cross-entropy, and linear + cross-entropy without materialised logits.

Each backend provides two row kernels (cpu and cuda in pykernels._C, triton in
pykernels.triton.cross_entropy), with the math in kernels/cross_entropy.h:

  cross_entropy_rows(logits (A, C, B), target, class_weight, ignore_index, label_smoothing,
                     z_loss, softcap, grad, scale) -> row losses (A * B), in fp32 (fp64 for
                     fp64 logits); when grad is given, scale * dloss/dlogits is written there
  cross_entropy_scale_grad_(grad (A, C, B), scale)    grad *= scale, per row or one scalar

The gradient is written by the forward, in the same pass over the logits that computes
the loss (the row is still in cache), already divided by the mean's denominator. The
backward then only multiplies it by grad_output, in place, and the kernels skip that
multiply where grad_output is exactly 1, deciding it on the device: the usual
``loss.backward()`` moves the logits once and the gradient once in total, against the
three extra passes of recomputing softmax from a saved logsumexp. Because the backward
consumes the saved gradient in place, a second backward through the same graph raises
autograd's "modified by an inplace operation" error instead of giving a wrong result.
Without autograd (no_grad, or logits that do not require grad) only the loss is computed.

Registered as torch.library custom ops with fake kernels and autograd:

  pykernels::cross_entropy_forward(input, target, weight, ignore_index, label_smoothing,
      z_loss, softcap, reduction, compute_grad, backend) -> (loss, grad_input)
  pykernels::cross_entropy_scale_grad_(grad!, grad_output, backend) -> ()
  pykernels::linear_cross_entropy_forward(input, linear_weight, target, linear_bias, weight,
      ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size, compute_grad,
      backend) -> (loss, grad_input, grad_linear_weight, grad_linear_bias)
  pykernels::linear_cross_entropy_backward(grad_loss, input, linear_weight, target,
      linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      backend) -> (grad_input, grad_linear_weight, grad_linear_bias)

linear_cross_entropy runs over chunks of rows: logits_chunk = x_chunk @ W^T + b, the row
kernel turns them into their gradient in place, then grad_x_chunk = dlogits @ W and
grad_W += dlogits^T @ x_chunk (each GEMM accumulating in fp32; grad_W adds chunk by chunk in
W's dtype, as torch's own chunked linear_cross_entropy does on CUDA, so no (V, H) fp32 buffer
is held), grad_b += column sums in fp32. Peak extra memory is one (chunk, V) logits block.
With reduction='none' the per-row grad_output is only known in the backward, so the
forward computes the loss alone and the backward recomputes the chunks.
"""

import numbers

import torch
from torch import Tensor

from .. import reference
from ..backends import extension, resolve
from .autocast import autocast_operands

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_NONE, _MEAN, _SUM = 0, 1, 2
_EMPTY = (0,)


def _kernels(backend):
    """The (rows, scale_grad_) row kernels of a backend."""
    if backend == "triton":
        from ..triton import cross_entropy as triton_cross_entropy

        return (triton_cross_entropy.cross_entropy_rows,
                triton_cross_entropy.cross_entropy_scale_grad_)
    ext = extension()
    if ext is None:
        raise RuntimeError(f"backend {backend!r} needs pykernels._C, which is not built")
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
        return loss_rows.view(shape).to(dtype)
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
    rows_kernel, _ = _kernels(backend)
    acc = _acc_dtype(input.dtype)
    logits = _view3d(input)
    num_classes = logits.shape[1]
    if target.is_floating_point():
        rows_target = _view3d(target)
    else:
        rows_target = target.reshape(-1).contiguous()
        _check_targets(rows_target, num_classes, ignore_index)
    class_weight = None if weight is None else weight.to(acc).contiguous()
    grad = scale = None
    if compute_grad:
        grad = torch.empty(logits.shape, dtype=input.dtype, device=input.device)
        scale = _row_scale(reduction, target, weight, ignore_index, acc)
    loss_rows = rows_kernel(logits, rows_target, class_weight, ignore_index, label_smoothing,
                            z_loss, softcap, grad, scale)
    loss = _reduce(loss_rows, reduction, target, weight, ignore_index, _loss_shape(input),
                   input.dtype)
    return loss, (grad.view(input.shape) if compute_grad else input.new_empty(_EMPTY))


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


def _save_grad(ctx, grad, backend):
    ctx.save_for_backward(grad)
    ctx.backend = backend


def _scaled_saved_grad(ctx, grad_output):
    """The forward's gradient times grad_output, scaled in place (see the module notes)."""
    (grad,) = ctx.saved_tensors
    torch.ops.pykernels.cross_entropy_scale_grad_(grad, grad_output, ctx.backend)
    return grad


def _ce_setup_context(ctx, inputs, output):
    _save_grad(ctx, output[1], inputs[-1])
    ctx.mark_non_differentiable(output[1])
    # The gradient output never receives a gradient: without this, autograd would fill an
    # input-sized tensor of zeros for it on every backward.
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_loss, grad_grad):
    if grad_loss is None:  # grads are not materialised (above): None means zero
        return (None,) * 10
    return (_scaled_saved_grad(ctx, grad_loss),) + (None,) * 9


torch.library.register_autograd(
    "pykernels::cross_entropy_forward", _ce_backward, setup_context=_ce_setup_context
)


def _check_real(value, name, low, high=None, *, low_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high) or value != value:
        bound = f"({low}, inf)" if low_open else (f"[{low}, {high}]" if high is not None
                                                   else f"[{low}, inf)")
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_common(reduction, label_smoothing, z_loss, softcap, ignore_index):
    """Options shared by both functions; returns (reduction id, ls, z, softcap or 0)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of none, mean, sum; got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    label_smoothing = _check_real(label_smoothing, "label_smoothing", 0.0, 1.0)
    z_loss = _check_real(z_loss, "z_loss", 0.0)
    if z_loss == float("inf"):
        raise ValueError("z_loss must be finite")
    softcap = 0.0 if softcap is None else _check_real(softcap, "softcap", 0.0, low_open=True)
    return _REDUCTIONS[reduction], label_smoothing, z_loss, softcap


def _check_tensor(t, name, device, floating=True):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}")


def _check_target_and_weight(logits_shape, input, target, weight, target_name="target"):
    """target: int64 of logits_shape less the class dim, or probabilities of logits_shape
    in input's dtype; weight: (C,) floating."""
    _check_tensor(target, target_name, input.device, floating=False)
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
        _check_tensor(weight, "weight", input.device)
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},) (one per class), "
                             f"got {tuple(weight.shape)}")


def _no_target_grad(target):
    """The kernels differentiate the logits only; backend='torch' differentiates all."""
    if target.is_floating_point() and target.requires_grad:
        raise ValueError("gradients with respect to probability targets are not supported "
                         "by the kernel backends: detach target, or use backend='torch'")


def _check_ce_args(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor (logits), got {input.dtype}")
    if input.dim() == 0 or input.shape[reference.class_dim(input)] == 0:
        raise ValueError(f"input must be (C,), (N, C) or (N, C, d1, ...) with C >= 1, got "
                         f"shape {tuple(input.shape)}")
    options = _check_common(reduction, label_smoothing, z_loss, softcap, ignore_index)
    _check_target_and_weight(input.shape, input, target, weight)
    return options


class CrossEntropyFunction(torch.autograd.Function):
    """Fused cross-entropy as an autograd.Function over the registered ops.

    ``CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, backend)`` with the arguments of
    :func:`cross_entropy`; ``backend`` names a kernel backend (cpu, cuda, triton) or is
    None for the default selection.
    """

    @staticmethod
    def forward(ctx, input, target, weight=None, ignore_index=-100, reduction="mean",
                label_smoothing=0.0, z_loss=0.0, softcap=None, backend=None):
        options = _check_ce_args(input, target, weight, ignore_index, reduction,
                                 label_smoothing, z_loss, softcap)
        _no_target_grad(target)
        name = _kernel_backend(backend, input, "CrossEntropyFunction", "cross_entropy")
        red, ls, z, cap = options
        loss, grad = torch.ops.pykernels.cross_entropy_forward(
            input, target, weight, ignore_index, ls, z, cap, red, ctx.needs_input_grad[0],
            name)
        _save_grad(ctx, grad, name)
        ctx.mark_non_differentiable(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (_scaled_saved_grad(ctx, grad_loss),) + (None,) * 8


def _kernel_backend(backend, input, cls, fn):
    name = resolve(backend, input.device, input.dtype)
    if name == "torch":
        raise ValueError(f"{cls} runs kernel backends; for backend='torch' call "
                         f"pykernels.reference.{fn}")
    return name


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, backend=None):
    """torch.nn.functional.cross_entropy, fused: one pass over the logits per row.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...), any float dtype the backend takes.
        target: int64 class indices of shape (), (N,) or (N, d1, ...), or class
            probabilities of the input's shape and dtype.
        weight: (C,) class weights, or None.
        ignore_index, reduction, label_smoothing: as in PyTorch (same 'mean' divisor,
            same result when every target is ignored).
        z_loss: adds z_loss * logsumexp(logits)**2 to each non-ignored row's loss.
        softcap: computes on softcap * tanh(logits / softcap) when given (> 0).
        backend: cpu, cuda, triton, torch or auto (see pykernels.backends).
    """
    red, ls, z, cap = _check_ce_args(input, target, weight, ignore_index, reduction,
                                     label_smoothing, z_loss, softcap)
    name = resolve(backend, input.device, input.dtype)
    if name == "torch":
        return reference.cross_entropy(input, target, weight, ignore_index, reduction,
                                       label_smoothing, z_loss, softcap)
    _no_target_grad(target)
    loss, _ = torch.ops.pykernels.cross_entropy_forward(
        input, target, weight, ignore_index, ls, z, cap, red, _wants_grad(input), name)
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
        grad_weight = torch.zeros_like(linear_weight)
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
      z_loss, softcap, reduction, chunk_size, compute_grad, backend):
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


def _lce_save(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, z_loss,
     softcap, reduction, chunk_size, compute_grad, backend) = inputs
    ctx.reduction = reduction
    ctx.has_bias = linear_bias is not None
    ctx.backend = backend
    if reduction == _NONE:
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
    else:
        ctx.save_for_backward(*output[1:])


def _lce_grads(ctx, grad_loss):
    """(grad_input, grad_linear_weight, grad_linear_bias or None)."""
    if ctx.reduction == _NONE:
        input, linear_weight, target, linear_bias, weight = ctx.saved_tensors
        grads = torch.ops.pykernels.linear_cross_entropy_backward(
            grad_loss, input, linear_weight, target, linear_bias, weight, *ctx.options,
            ctx.backend)
    else:
        grads = ctx.saved_tensors
        for g in grads:
            torch.ops.pykernels.cross_entropy_scale_grad_(g, grad_loss, ctx.backend)
    return grads[0], grads[1], grads[2] if ctx.has_bias else None


def _lce_setup_context(ctx, inputs, output):
    _lce_save(ctx, inputs, output)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the gradient outputs


def _lce_backward(ctx, grad_loss, *unused):
    if grad_loss is None:  # grads are not materialised (above): None means zero
        return (None,) * 13
    gi, gw, gb = _lce_grads(ctx, grad_loss)
    return (gi, gw, None, gb) + (None,) * 9


torch.library.register_autograd(
    "pykernels::linear_cross_entropy_forward", _lce_backward, setup_context=_lce_setup_context
)


def _check_lce_args(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                    label_smoothing, z_loss, softcap, chunk_size):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    _check_tensor(input, "input", input.device)
    _check_tensor(linear_weight, "linear_weight", input.device)
    if linear_weight.dim() != 2 or linear_weight.shape[0] == 0:
        raise ValueError(f"linear_weight must be 2-D (num_classes >= 1, in_features), got "
                         f"shape {tuple(linear_weight.shape)}")
    if input.dim() not in (1, 2) or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(f"input must be (N, in_features) or (in_features,) with in_features "
                         f"= linear_weight.shape[1] = {linear_weight.shape[1]}, got shape "
                         f"{tuple(input.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}")
    if linear_bias is not None:
        _check_tensor(linear_bias, "linear_bias", input.device)
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got "
                             f"{tuple(linear_bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    options = _check_common(reduction, label_smoothing, z_loss, softcap, ignore_index)
    _check_target_and_weight(input.shape[:-1] + linear_weight.shape[:1], input, target, weight)
    return options


def _lce_rows(input, target, linear_weight, chunk_size):
    """(input as (N, H), target as (N,) or (N, C), rows per chunk): a 1-D input is one row."""
    rows = input.view(1, -1) if input.dim() == 1 else input
    rows_target = target.reshape(rows.shape[0], -1) if target.is_floating_point() \
        else target.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows.shape[0], rows.shape[1], linear_weight.shape[0],
                                        rows.device.type)
    return rows, rows_target, chunk_size


def _lce_op_inputs(input, linear_weight, target, linear_bias, weight, ignore_index, options,
                   chunk_size, compute_grad, backend):
    """The arguments of pykernels::linear_cross_entropy_forward, in order."""
    red, ls, z, cap = options
    rows, rows_target, chunk = _lce_rows(input, target, linear_weight, chunk_size)
    return (rows, linear_weight, rows_target, linear_bias, weight, ignore_index, ls, z, cap, red,
            chunk, compute_grad, backend)


def _lce_loss(loss, input, reduction):
    """reduction='none' of a 1-D input is a 0-d loss."""
    return loss.view(()) if reduction == _NONE and input.dim() == 1 else loss


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused linear + cross-entropy as an autograd.Function over the registered ops.

    ``LinearCrossEntropyFunction.apply(input, linear_weight, target, linear_bias, weight,
    reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend)`` with
    the arguments of :func:`linear_cross_entropy`.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, target, linear_bias=None, weight=None,
                reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                softcap=None, chunk_size=None, backend=None):
        options = _check_lce_args(input, linear_weight, target, linear_bias, weight,
                                  ignore_index, reduction, label_smoothing, z_loss, softcap,
                                  chunk_size)
        _no_target_grad(target)
        name = _kernel_backend(backend, input, "LinearCrossEntropyFunction",
                               "linear_cross_entropy")
        wants = any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        inputs = _lce_op_inputs(input, linear_weight, target, linear_bias, weight, ignore_index,
                                options, chunk_size, wants and options[0] != _NONE, name)
        out = torch.ops.pykernels.linear_cross_entropy_forward(*inputs)
        _lce_save(ctx, inputs, out)
        ctx.mark_non_differentiable(*out[1:])
        ctx.input_shape = input.shape
        return _lce_loss(out[0], input, options[0])

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == _NONE:
            grad_loss = grad_loss.reshape(-1)
        gi, gw, gb = _lce_grads(ctx, grad_loss)
        return (gi.view(ctx.input_shape), gw, None, gb) + (None,) * 8


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None, chunk_size=None, backend=None):
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) without ever
    materialising the (N, num_classes) logits: rows go through in chunks of ``chunk_size``
    (default :func:`default_chunk_size`), so peak extra memory is one chunk of logits.

    Same signature and result as torch.nn.functional.linear_cross_entropy (torch >= 2.13),
    plus z_loss, softcap (see :func:`cross_entropy`), chunk_size and backend. input is
    (N, in_features) or (in_features,); target int64 (N,) / () or probabilities (N, C) / (C,).
    """
    input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    options = _check_lce_args(input, linear_weight, target, linear_bias, weight, ignore_index,
                              reduction, label_smoothing, z_loss, softcap, chunk_size)
    name = resolve(backend, input.device, input.dtype)
    if name == "torch":
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias,
                                              weight, reduction, ignore_index,
                                              label_smoothing, z_loss, softcap)
    _no_target_grad(target)
    # With reduction='none' the backward recomputes (grad_output is per row).
    compute_grad = options[0] != _NONE and _wants_grad(input, linear_weight, linear_bias)
    out = torch.ops.pykernels.linear_cross_entropy_forward(*_lce_op_inputs(
        input, linear_weight, target, linear_bias, weight, ignore_index, options, chunk_size,
        compute_grad, name))
    return _lce_loss(out[0], input, options[0])
