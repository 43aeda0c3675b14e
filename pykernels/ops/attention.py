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
      window_left, window_right, softcap, dropout_p, rng, backend)
      -> (grad_q, grad_k, grad_v)

Every backend's backward is bitwise reproducible run to run (no atomics), so there is no
determinism switch; ``use_deterministic`` only warns that it is deprecated.
"""

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import backends, cpu_kernels_from, kernel_extension, resolve
from . import _checks, _contract, _route, _shortcut
from .autocast import autocast_operands

# Head dims each kernel backend takes (the 'torch' backend takes any): E and Ev up to 256 on
# cuda (kernels/attention.cu instantiates head-dim buckets 32, 64, 128, 256) and triton.
_MAX_HEAD_DIM = {"cpu": None, "cuda": 256, "triton": 256}
# float32's smallest normal and largest finite values: the range of the Triton kernels'
# float arguments.
_F32_NORMAL, _F32_MAX = 2.0 ** -126, float(torch.finfo(torch.float32).max)


@contextlib.contextmanager
def use_deterministic(enabled=True):
    """Deprecated, and a no-op: every pykernels backward is already deterministic (bitwise
    reproducible run to run: no backend uses atomics), whatever ``enabled`` says. Entering
    the block emits a FutureWarning; the function will be removed."""
    warnings.warn("pykernels.use_deterministic is deprecated and does nothing: every "
                  "pykernels backward is already deterministic (bitwise reproducible); it "
                  "will be removed", FutureWarning, stacklevel=3)
    yield


def _kernels(backend):
    """The (forward, backward) kernel entry points of a backend, with the kernels'
    positional signature."""
    if backend == "triton":
        from ..triton import attention as triton_attention

        return triton_attention.attention_forward, triton_attention.attention_backward
    ext = kernel_extension(backend)
    return ext.attention_forward, ext.attention_backward


def _seed_offset(rng):
    return (0, 0) if rng is None else (int(rng[0]), int(rng[1]))


@_route.custom_op("pykernels::attention_forward")
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
    if q.shape[0] * q.shape[1] == 0:  # no (batch, head) pair: nothing for a kernel to do
        return q.new_empty(q.shape[:3] + v.shape[3:]), q.new_empty(q.shape[:3],
                                                                   dtype=_lse_dtype(q))
    forward, _ = _kernels(backend)
    out, lse = forward(q, k, v, mask, scale, causal, window_left, window_right, softcap,
                       dropout_p, *_seed_offset(rng))
    return out, lse


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@attention_forward.register_fake
def _(q, k, v, mask, scale, causal, window_left, window_right, softcap, dropout_p, rng,
      backend):
    return (q.new_empty(q.shape[:3] + v.shape[3:]),
            q.new_empty(q.shape[:3], dtype=_lse_dtype(q)))


@_route.custom_op("pykernels::attention_backward")
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if q.shape[0] * q.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _, backward = _kernels(backend)
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, mask, scale, causal, window_left,
                          window_right, softcap, dropout_p, *_seed_offset(rng))
    return dq, dk, dv


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, scale, causal, window_left, window_right, softcap,
      dropout_p, rng, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, scale, causal, window_left, window_right, softcap, dropout_p, rng,
     backend) = inputs
    out, lse = output
    # The output is kept for Delta = rowsum(dO * O), as the flash and efficient backwards
    # of F.scaled_dot_product_attention keep theirs: an in-place change to it raises
    # autograd's "modified by an inplace operation" there and here.
    ctx.save_for_backward(q, k, v, out, lse, mask, rng)
    ctx.options = (scale, causal, window_left, window_right, softcap, dropout_p)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse never gets a gradient: no zeros for it


def _composition_grads(ctx, inputs, needs, grad_out, what, create_graph=True):
    """Gradients through the plain-PyTorch composition: for a graph of the gradient, and
    for a float mask's gradient (the kernels never write the score gradients dS)."""
    if ctx.options[-1] > 0:
        raise RuntimeError(
            f"pykernels.scaled_dot_product_attention: no {what} with dropout_p > 0, whose "
            f"keep mask only the kernels draw; use dropout_p=0 or backend='torch'")
    q, k, v, mask = inputs
    return _contract.composition_grads(_composition(mask, ctx.options), (q, k, v, mask),
                                       needs, (grad_out,), create_graph=create_graph)


def _composition(mask, options):
    """The plain-PyTorch attention (of q, k, v, mask) of the kernels' (Z, H, L, E) operands
    and options."""
    scale, causal, left, right, softcap, dropout_p = options
    window = None
    if left >= 0 or right >= 0:
        window = (left if left >= 0 else None, right if right >= 0 else None)
    return lambda q, k, v, mask: reference.scaled_dot_product_attention(
        q, k, v, mask, 0.0, causal, scale, q.shape[1] != k.shape[1], window, softcap or None)


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:  # grads are not materialised (above): None means zero
        return (None,) * 12
    q, k, v, out, lse, mask, rng = ctx.saved_tensors
    if _contract.graph_requested():
        grads = _composition_grads(ctx, (q, k, v, mask), ctx.needs_input_grad[:4], grad_out,
                                   "graph of the gradient (create_graph=True)")
        return (*grads,) + (None,) * 8
    dq, dk, dv = _route.call(attention_backward, grad_out.contiguous(), q, k, v, out, lse,
                             mask, *ctx.options, rng, ctx.backend)
    grad_mask = None
    if ctx.needs_input_grad[3]:
        grad_mask = _composition_grads(ctx, (q.detach(), k.detach(), v.detach(), mask),
                                       (False, False, False, True), grad_out,
                                       "gradient of attn_mask", create_graph=False)[3]
    return (dq, dk, dv, grad_mask) + (None,) * 8


_route.register_autograd(attention_forward, _backward, setup_context=_setup_context)


def _check_tensors(query, key, value):
    _checks.tensor(query, "query")
    for name, t in (("key", key), ("value", value)):
        _checks.tensor(t, name, like=query, like_name="query")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., length, features), got "
                             f"{tuple(t.shape)}")


def _layout(query, key, value, enable_gqa):
    """How the operands map onto the kernels' (Z, H, L, E) views, broadcasting the leading
    dims as F.scaled_dot_product_attention does (a 3-D query with 4-D key/value, a key/value
    batch of 1, one key/value head for many query heads).

    Returns (lead, hq, hkv): the output's leading dims (batch..., heads; () when every
    operand is 2-D), and the query and key/value head counts of the kernel views. One
    key/value head, or a GQA group, is read by its query heads without a copy; a broadcast
    batch dim is materialised by the reshape.
    """
    qsh, ksh, vsh = query.shape, key.shape, value.shape  # each .shape builds a torch.Size
    if ksh[-1] != qsh[-1] or qsh[-1] == 0:
        raise ValueError(f"key must have query's feature size E = {qsh[-1]} >= 1 "
                         f"(key.shape[-1]), got query {tuple(qsh)}, key {tuple(ksh)}")
    if vsh[-2] != ksh[-2] or vsh[-1] == 0:
        raise ValueError(f"value must be (..., S, Ev) with key's length S = {ksh[-2]} "
                         f"and Ev >= 1, got value {tuple(vsh)}, key {tuple(ksh)}")
    rank = max(len(qsh), len(ksh), len(vsh)) - 2
    if rank == 0:
        return (), 1, 1
    if len(qsh) == len(ksh) == len(vsh):
        qs, ks, vs = qsh[:-2], ksh[:-2], vsh[:-2]
    else:  # fewer dims broadcast as leading ones
        qs, ks, vs = ((1,) * (rank + 2 - len(t)) + tuple(t[:-2]) for t in (qsh, ksh, vsh))
    try:  # equal batch dims, the usual case, skip torch.broadcast_shapes' host cost
        batch = (torch.Size(qs[:-1]) if qs[:-1] == ks[:-1] == vs[:-1]
                 else torch.broadcast_shapes(qs[:-1], ks[:-1], vs[:-1]))
    except RuntimeError:
        raise ValueError(f"the batch dims of query {tuple(qsh)}, key {tuple(ksh)} and value "
                         f"{tuple(vsh)} do not broadcast") from None
    hq, hk, hv = qs[-1], ks[-1], vs[-1]
    if hk != hv and 1 not in (hk, hv):
        raise ValueError(f"key and value must have the same number of heads, got {hk} and "
                         f"{hv}")
    hkv = max(hk, hv) if 0 not in (hk, hv) else 0
    if enable_gqa:
        if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):
            raise ValueError(f"enable_gqa needs the query heads ({hq}) to be a multiple of "
                             f"the key/value heads ({hkv})")
    elif hkv != hq and hkv != 1:
        if hq != 1:
            raise ValueError(f"query has {hq} heads but key/value have {hkv}; pass "
                             f"enable_gqa=True for grouped-query attention")
        hq = hkv  # one query head broadcast over the key/value heads
    return batch + (hq,), hq, hkv


def _to4d(t, lead, heads):
    """``t`` (..., len, features) broadcast to ``lead`` with ``heads`` heads, viewed as
    (Z, heads, len, features); (1, 1, len, features) when ``lead`` is ()."""
    if not lead:
        return t.view(1, 1, *t.shape)
    full = t.expand(lead[:-1] + (heads,) + t.shape[-2:])
    return full.reshape(lead[:-1].numel(), heads, t.shape[-2], t.shape[-1])


def _check_mask(attn_mask, query, lead, length, is_causal):
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise TypeError(f"attn_mask must be bool or query's dtype {query.dtype}, got "
                        f"{attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on "
                         f"{query.device}")
    target = torch.Size(lead + (query.shape[-2], length))
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


def _check_options(query, key, dropout_p, scale, window, softcap):
    """Returns (scale, window_left, window_right, softcap or 0)."""
    _checks.real(dropout_p, "dropout_p", 0.0, 1.0, high_open=True)
    if scale is None:
        scale = 1 / math.sqrt(query.shape[-1])
    scale = _checks.real(scale, "scale", finite=True)
    left = right = -1
    if window is not None:
        if not isinstance(window, (tuple, list)):
            raise TypeError(f"window must be a (left, right) pair, got {window!r}")
        if len(window) != 2:
            raise ValueError(f"window must be a (left, right) pair, got {window!r}")
        left, right = (-1 if side is None else _checks.integer(side, f"window {name}", low=0)
                       for name, side in zip(("left", "right"), window, strict=True))
        # A side beyond L + S is unbounded; clamping keeps the kernels' index arithmetic
        # (i + right, j + left) far from int64 overflow.
        span = query.shape[-2] + key.shape[-2]
        left, right = (side if side < 0 else min(side, span) for side in (left, right))
    softcap = 0.0 if softcap is None else _checks.real(softcap, "softcap", 0.0,
                                                       low_open=True, finite=True)
    return scale, left, right, softcap


def _mask4d(attn_mask, query, lead, length, heads):
    """The additive (Z, Hq, L, S) view of a mask (bool: 0 where allowed, -inf elsewhere),
    with zero strides where it broadcasts."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    if not lead:
        return attn_mask.expand(query.shape[-2], length).view(1, 1, query.shape[-2], length)
    full = attn_mask.expand(lead + (query.shape[-2], length))
    return full.reshape(lead[:-1].numel(), heads, query.shape[-2], length)


def _check_backend(name, query, value, attn_mask, softcap):
    limit = _MAX_HEAD_DIM.get(name)
    head_dim = max(query.shape[-1], value.shape[-1])
    if limit is not None and head_dim > limit:
        here = backends(query.device)
        able = [b for b, lim in _MAX_HEAD_DIM.items()
                if (lim is None or lim >= head_dim) and b in here]
        names = " or ".join(repr(b) for b in able + ["torch"])
        raise ValueError(f"backend {name!r} supports head dims up to {limit}, got "
                         f"{head_dim}; use backend {names}")
    if name == "triton" and softcap and not _F32_NORMAL <= softcap <= _F32_MAX:
        # The Triton kernels receive Python floats as float32 pairs (pykernels/triton).
        raise ValueError(f"backend 'triton' takes softcap in [{_F32_NORMAL:g}, "
                         f"{_F32_MAX:g}], got {softcap!r}; use backend 'cpu' or 'torch'")


def _triton_scaled_query(name, q4, scale):
    """The Triton kernels receive ``scale`` as a float32 pair, whose range a float64 scale
    can leave (1e-50 would become 0). Moving a power of two of it onto the query is exact
    in float64 and keeps the pair in range; the gradient flows back through the product."""
    if name != "triton" or scale == 0 or 2.0 ** -60 <= abs(scale) <= 2.0 ** 60:
        return q4, scale
    mantissa, exponent = math.frexp(scale)
    return q4 * 2.0 ** exponent, mantissa


def _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window,
             softcap, backend):
    """Validated op inputs (without the backend), the backend, and the output shape."""
    _check_tensors(query, key, value)
    lead, hq, hkv = _layout(query, key, value, enable_gqa)
    _check_mask(attn_mask, query, lead, key.shape[-2], is_causal)
    scale, left, right, cap = _check_options(query, key, dropout_p, scale, window, softcap)
    name = resolve(backend, query.device, query.dtype, "attention",
                   query.numel() * key.shape[-2])
    shape = lead + (query.shape[-2], value.shape[-1])
    if _contract.runs_composition(query, key, value, attn_mask):
        return None, "reference", shape
    if name == "torch":
        return None, name, shape
    _check_backend(name, query, value, attn_mask, cap)
    rng = None
    if dropout_p > 0:  # seed and offset from torch's default CPU generator
        rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    q4, scale = _triton_scaled_query(name, _to4d(query, lead, hq), scale)
    inputs = (q4, _to4d(key, lead, hkv), _to4d(value, lead, hkv),
              _mask4d(attn_mask, query, lead, key.shape[-2], hq), scale, bool(is_causal),
              left, right, cap, float(dropout_p), rng)
    return inputs, name, shape


def _torch_sdpa_agrees(query, key, value, attn_mask, enable_gqa, window, softcap):
    """Whether F.scaled_dot_product_attention computes exactly this call's contract, so that
    the torch backend can run PyTorch's own kernel instead of the composition: no mask,
    window or softcap (so no row is left with nothing to attend to, where PyTorch's
    kernels differ from the composition's zero), at least one key, and the 4-D (B, H, L, E)
    layout with equal batch dims that every PyTorch kernel takes."""
    if attn_mask is not None or window is not None or softcap is not None:
        return False
    qsh, ksh, vsh = query.shape, key.shape, value.shape
    if not len(qsh) == len(ksh) == len(vsh) == 4 or ksh[2] == 0:
        return False
    heads = ksh[:2]
    return heads == vsh[:2] and (qsh[:2] == heads or (enable_gqa and qsh[0] == heads[0]))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *, window=None,
                                 softcap=None, backend=None):
    """torch.nn.functional.scaled_dot_product_attention, flash-style: tiled, online softmax,
    O(L + S) memory per head, the backward recomputing the scores.

    Leading dims broadcast as in PyTorch. Beyond PyTorch: ``window=(left, right)``
    sliding-window attention (query i attends key j iff i - left <= j <= i + right; None
    on a side is unbounded), combined with any mask and is_causal; ``softcap`` computes on
    softcap * tanh(scores / softcap) (scaled scores, before the mask). Rows with nothing to
    attend to return 0 and pass zero gradient. Dropout draws a fresh mask per call from
    torch's default generator (reproducible under torch.manual_seed); the backward reuses
    the forward's mask.
    """
    if _shortcut.eager(backend):
        out = _shortcut.CALLS.attention(query, key, value, attn_mask, dropout_p, is_causal,
                                        scale, enable_gqa, window, softcap,
                                        cpu_kernels_from("attention"))
        if out is not None:
            return out
    query, key, value, attn_mask = autocast_operands(query, key, value, attn_mask)
    inputs, name, shape = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                   enable_gqa, window, softcap, backend)
    if name == "torch" and _torch_sdpa_agrees(query, key, value, attn_mask, enable_gqa, window,
                                             softcap):
        return F.scaled_dot_product_attention(
            query, key, value, None, float(dropout_p), bool(is_causal),
            scale=None if scale is None else float(scale), enable_gqa=bool(enable_gqa))
    if name in ("torch", "reference"):
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window,
            softcap)
    out, _ = _route.apply(attention_forward, *inputs, name)
    return out.view(shape)
