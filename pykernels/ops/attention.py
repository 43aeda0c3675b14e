"""Fused scaled dot-product attention (flash-style), forward and backward.

The kernels (cpu and cuda in pykernels._C, triton in pykernels.triton.attention; math in
kernels/attention.h) take q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev), an optional
additive mask viewed as (Z, Hq, L, S) with zero strides where it broadcasts, and return the
output plus one logsumexp per query row; the backward recomputes the scores tile by tile.
This layer validates the public arguments, flattens the leading dims, turns a boolean mask
into an additive one (0 / -inf), and draws the dropout seed from torch's default generator
(so ``torch.manual_seed`` reproduces a call; the seed travels as a tensor so that
torch.compile traces it). Registered as custom ops with fake kernels and autograd:

  pykernels::attention_forward(q, k, v, mask, scale, causal, window_left, window_right,
      softcap, dropout_p, rng, backend) -> (out, lse)
  pykernels::attention_backward(grad_out, q, k, v, out, lse, mask, scale, causal,
      window_left, window_right, softcap, dropout_p, rng, deterministic, backend)
      -> (grad_q, grad_k, grad_v)
"""

import contextlib
import math
import numbers

import torch
from torch import Tensor

from .. import reference
from ..backends import backends, extension, resolve
from .autocast import autocast_operands

# Head dims each kernel backend takes (the 'torch' backend takes any): E and Ev up to 256 on
# cuda (kernels/attention.cu instantiates head-dim buckets 32, 64, 128, 256) and triton.
_MAX_HEAD_DIM = {"cpu": None, "cuda": 256, "triton": 256}
_deterministic = []  # use_deterministic's settings, innermost last


@contextlib.contextmanager
def use_deterministic(enabled=True):
    """Inside the block, attention backwards are bitwise reproducible run to run (the cpu,
    cuda and triton backends always are: no atomics)."""
    _deterministic.append(bool(enabled))
    try:
        yield
    finally:
        _deterministic.pop()


def deterministic():
    """Whether attention backwards must be bitwise reproducible (use_deterministic)."""
    return bool(_deterministic and _deterministic[-1])


def _kernels(backend):
    """The (forward, backward) kernel entry points of a backend, with the kernels'
    positional signature."""
    if backend == "triton":
        from ..triton import attention as triton_attention

        return triton_attention.attention_forward, triton_attention.attention_backward
    ext = extension()
    if ext is None:
        raise RuntimeError(f"backend {backend!r} needs pykernels._C, which is not built")
    return ext.attention_forward, ext.attention_backward


def _seed_offset(rng):
    return (0, 0) if rng is None else (int(rng[0]), int(rng[1]))


@torch.library.custom_op("pykernels::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    rng: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    forward, _ = _kernels(backend)
    out, lse = forward(q, k, v, mask, scale, causal, window_left, window_right, softcap,
                       dropout_p, *_seed_offset(rng))
    return out, lse


@attention_forward.register_fake
def _(q, k, v, mask, scale, causal, window_left, window_right, softcap, dropout_p, rng,
      backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape[:3] + v.shape[3:]),
            q.new_empty(q.shape[:3], dtype=lse_dtype))


@torch.library.custom_op("pykernels::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    rng: Tensor | None,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _kernels(backend)
    # Every backend's backward is deterministic by construction (no atomics), so
    # `deterministic` selects nothing; it stays in the op's schema for a faster, atomic path.
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, mask, scale, causal, window_left,
                          window_right, softcap, dropout_p, *_seed_offset(rng))
    return dq, dk, dv


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, scale, causal, window_left, window_right, softcap,
      dropout_p, rng, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, scale, causal, window_left, window_right, softcap, dropout_p, rng,
     backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, rng)
    ctx.options = (scale, causal, window_left, window_right, softcap, dropout_p)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse never gets a gradient: no zeros for it


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:  # grads are not materialised (above): None means zero
        return (None,) * 12
    q, k, v, out, lse, mask, rng = ctx.saved_tensors
    dq, dk, dv = torch.ops.pykernels.attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, mask, *ctx.options, rng, deterministic(),
        ctx.backend)
    return (dq, dk, dv) + (None,) * 9


torch.library.register_autograd(
    "pykernels::attention_forward", _backward, setup_context=_setup_context
)


def _check_tensors(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, features), got "
                             f"{tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")


def _check_shapes(query, key, value, enable_gqa):
    """Returns (Hq, Hkv): the head counts (1 for 2-D inputs)."""
    if key.shape[-1] != query.shape[-1] or query.shape[-1] == 0:
        raise ValueError(f"key must have query's feature size E = {query.shape[-1]} >= 1 "
                         f"(key.shape[-1]), got query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}")
    if value.shape[-2] != key.shape[-2] or value.shape[-1] == 0:
        raise ValueError(f"value must be (..., S, Ev) with key's length S = {key.shape[-2]} "
                         f"and Ev >= 1, got value {tuple(value.shape)}, key "
                         f"{tuple(key.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same number of dims, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    batch = query.shape[:-3]
    if key.shape[:-3] != batch or value.shape[:-3] != batch:
        raise ValueError(f"batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} "
                         f"and value {tuple(value.shape)} do not match")
    if query.dim() == 2:
        return 1, 1
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hk != hv:
        raise ValueError(f"key and value must have the same number of heads, got {hk} and "
                         f"{hv}")
    if enable_gqa:
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"enable_gqa needs the query heads ({hq}) to be a multiple of "
                             f"the key/value heads ({hk})")
    elif hk != hq:
        raise ValueError(f"query has {hq} heads but key/value have {hk}; pass "
                         f"enable_gqa=True for grouped-query attention")
    return hq, hk


def _check_options(query, key, attn_mask, dropout_p, is_causal, scale, window, softcap):
    """Returns (scale, window_left, window_right, softcap or 0)."""
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool or query's dtype {query.dtype}, got "
                            f"{attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on "
                             f"{query.device}")
        target = query.shape[:-2] + (query.shape[-2], key.shape[-2])
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to (..., L, S) = {tuple(target)}")
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as "
                             "F.scaled_dot_product_attention)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) \
            or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is None:
        scale = 1 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
            or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number or None, got {scale!r}")
    left = right = -1
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be a (left, right) pair, got {window!r}")
        sides = []
        for name, side in zip(("left", "right"), window, strict=True):
            if side is None:
                sides.append(-1)
            elif isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 0:
                raise ValueError(f"window {name} must be an int >= 0 or None, got {side!r}")
            else:
                sides.append(int(side))
        # A side beyond L + S is unbounded; clamping keeps the kernels' index arithmetic
        # (i + right, j + left) far from int64 overflow.
        span = query.shape[-2] + key.shape[-2]
        left, right = (side if side < 0 else min(side, span) for side in sides)
    if softcap is None:
        softcap = 0.0
    elif isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) \
            or not softcap > 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    return float(scale), left, right, float(softcap)


def _to4d(t, heads):
    """(..., H, L, E) -> (Z, H, L, E); 2-D (L, E) -> (1, 1, L, E)."""
    if t.dim() == 2:
        return t.view(1, 1, *t.shape)
    return t.reshape(t.shape[:-3].numel(), heads, t.shape[-2], t.shape[-1])


def _mask4d(attn_mask, query, key, hq):
    """The additive (Z, Hq, L, S) view of a mask (bool: 0 where allowed, -inf elsewhere)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    shape = query.shape[:-2] + (query.shape[-2], key.shape[-2])
    full = attn_mask.expand(shape)  # zero strides where it broadcasts
    return _to4d(full, hq)


def _check_backend(name, query, value, attn_mask):
    limit = _MAX_HEAD_DIM.get(name)
    head_dim = max(query.shape[-1], value.shape[-1])
    if limit is not None and head_dim > limit:
        here = backends(query.device)
        able = [b for b, lim in _MAX_HEAD_DIM.items()
                if (lim is None or lim >= head_dim) and b in here]
        names = " or ".join(repr(b) for b in able + ["torch"])
        raise ValueError(f"backend {name!r} supports head dims up to {limit}, got "
                         f"{head_dim}; use backend {names}")
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad:
        raise ValueError("gradients with respect to attn_mask are not supported by the kernel "
                         "backends: detach it, or use backend='torch'")


class AttentionFunction(torch.autograd.Function):
    """Flash-style attention as an autograd.Function over the registered ops.

    ``AttentionFunction.apply(query, key, value, attn_mask, dropout_p, is_causal, scale,
    enable_gqa, window, softcap, backend)`` with the arguments of
    :func:`scaled_dot_product_attention`; ``backend`` names a kernel backend or is None.
    """

    @staticmethod
    def forward(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None, enable_gqa=False, window=None, softcap=None, backend=None):
        inputs, name, shape = _prepare(query, key, value, attn_mask, dropout_p, is_causal,
                                       scale, enable_gqa, window, softcap, backend)
        if name == "torch":
            raise ValueError("AttentionFunction runs kernel backends; for backend='torch' "
                             "call pykernels.reference.scaled_dot_product_attention")
        out, lse = torch.ops.pykernels.attention_forward(*inputs, name)
        _setup_context(ctx, (*inputs, name), (out, lse))
        ctx.shapes = (query.shape, key.shape, value.shape)
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        qs, ks, vs = ctx.shapes
        q4 = ctx.saved_tensors[0]
        dq, dk, dv = _backward(ctx, grad_out.reshape(q4.shape[:3] + (vs[-1],)), None)[:3]
        return (dq.view(qs), dk.view(ks), dv.view(vs)) + (None,) * 8


def _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window,
             softcap, backend):
    """Validated op inputs (without the backend), the backend, and the output shape."""
    _check_tensors(query, key, value)
    hq, hk = _check_shapes(query, key, value, enable_gqa)
    scale, left, right, cap = _check_options(query, key, attn_mask, dropout_p, is_causal,
                                             scale, window, softcap)
    name = resolve(backend, query.device, query.dtype)
    shape = query.shape[:-1] + value.shape[-1:]
    if name == "torch":
        return None, name, shape
    _check_backend(name, query, value, attn_mask)
    rng = None
    if dropout_p > 0:  # seed and offset from torch's default CPU generator
        rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    inputs = (_to4d(query, hq), _to4d(key, hk), _to4d(value, hk),
              _mask4d(attn_mask, query, key, hq), scale, bool(is_causal), left, right, cap,
              float(dropout_p), rng)
    return inputs, name, shape


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *, window=None,
                                 softcap=None, backend=None):
    """torch.nn.functional.scaled_dot_product_attention, flash-style: tiled, online softmax,
    O(L + S) memory per head, the backward recomputing the scores.

    Beyond PyTorch: ``window=(left, right)`` sliding-window attention (query i attends key j
    iff i - left <= j <= i + right; None on a side is unbounded), combined with any mask and
    is_causal; ``softcap`` computes on softcap * tanh(scores / softcap) (scaled scores,
    before the mask). Rows with nothing to attend to return 0 and pass zero gradient.
    Dropout draws a fresh mask per call from torch's default generator (reproducible under
    torch.manual_seed); the backward reuses the forward's mask.
    """
    query, key, value, attn_mask = autocast_operands(query, key, value, attn_mask)
    inputs, name, shape = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                   enable_gqa, window, softcap, backend)
    if name == "torch":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window,
            softcap)
    out, _ = torch.ops.pykernels.attention_forward(*inputs, name)
    return out.view(shape)
