"""Softmax cross-entropy row kernels in Triton.

The Python op layer (pykernels/ops/cross_entropy.py) validates, reduces and does autograd;
these kernels turn logits into row losses and, in the same launch, the scaled gradient.
The math of one row is the one in kernels/cross_entropy.h, which the CUDA and C++ CPU
backends share:

  s_c  = softcap > 0 ? softcap * tanh(x_c / softcap) : x_c
  lse  = log sum_c exp(s_c)
  index target t (eps = label_smoothing, w = class weight or 1, W = sum_c w_c):
    loss       = (1 - eps) w_t (lse - s_t) + eps / C * sum_c w_c (lse - s_c)
    dloss/ds_c = p_c ((1 - eps) w_t + eps / C * W) - (1 - eps) w_t [c == t] - eps / C * w_c
    target == ignore_index: loss 0, gradient 0. Any other target outside [0, C) is never
    used as an index: loss NaN, gradient NaN.
  probability target q: q'_c = (1 - eps) q_c + eps / C, Q = sum_c w_c q'_c,
    loss = sum_c w_c q'_c (lse - s_c),   dloss/ds_c = p_c Q - w_c q'_c
  z_loss adds z lse^2 to the loss and 2 z lse p_c to dloss/ds_c (not on ignored rows);
  softcap multiplies dloss/ds_c by ds_c/dx_c = 1 - (s_c / softcap)^2.

Layout and grid. The logits are an (A, C, B) view with any strides; row r = a * B + b. A
program owns a tile of ROWS rows and walks their classes in chunks of BLOCK_C, so one
code path serves a 131072-class vocabulary (ROWS = 1, many chunks) and 10-class
segmentation maps (many rows, one chunk). With B == 1 the tile's rows are consecutive a;
with B > 1 they are consecutive b of one a, the contiguous direction of an (N, C, d...)
tensor, so the loads coalesce. The grid is one-dimensional (no 65535 limit).

Two passes over each row. Pass 1 keeps, per lane of the [ROWS, BLOCK_C] tile, the
running max m and sum of exp(s - m) (online logsumexp), and, for label smoothing and
probability targets, the weighted sum sum_c v_c (lse - s_c) with v_c = w_c (smoothing) or
w_c q'_c (probabilities). That sum is kept relative to the lane's running max
(sum v (s - m), rebased when m grows), so logits near +-1e4 lose no digits to cancellation.
Entries with s_c = -inf (a masked vocabulary) are counted apart as v_c * inf, which is
+inf, or NaN where v_c = 0, exactly as the product is in PyTorch. Lanes are merged once,
after the loop. Pass 2 re-reads the row (meant to hit L2), and writes
grad = scale * dloss/dx. The only other read of the row, the target's logit, happens
before pass 2, so grad may be the logits tensor itself.

-inf handling: a row that is all -inf has lse = NaN, so its loss and gradient are NaN (as
in PyTorch); a row whose only finite logit is the target has loss 0 and gradient 0.
Ignored rows are not read at all (their loads are masked off).

Accumulation is float32, or float64 for float64 logits (the interpreter's gradcheck).
Triton passes a Python float as float32, so label_smoothing, z_loss and softcap travel as
float32 hi + lo pairs (_common.split_f64), exact enough for float64.
"""

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ._common import INF, NAN, NEG_INF, TL_DTYPES, acc_dtype, capped, f64_arg, split_f64

_SCALE_BLOCK = 1024
_SCALE_BLOCK_INTERPRET = 256


@triton.jit
def _load_logits(logits_ptr, row_offset, c, mask, s_c, cap, SOFTCAP: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """The capped logits s of one chunk; masked lanes are -inf."""
    x = tl.load(logits_ptr + row_offset[:, None] + c[None, :].to(tl.int64) * s_c,
                mask=mask, other=NEG_INF).to(ACC_DTYPE)
    return tl.where(mask, capped(x, cap, SOFTCAP), NEG_INF)


@triton.jit
def _chunk_weights(target_ptr, weight_ptr, q_offset, c, mask, t_c, eps, C,
                   PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   SMOOTH: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """v_c of one chunk, 0 on masked lanes: w_c q'_c for probability targets, w_c else."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c, mask=c < C, other=0.0).to(ACC_DTYPE)[None, :]
    else:
        w = tl.full((1, c.shape[0]), 1.0, ACC_DTYPE)
    if PROB_TARGET:
        q = tl.load(target_ptr + q_offset[:, None] + c[None, :].to(tl.int64) * t_c,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        if SMOOTH:
            q = q * (1.0 - eps) + eps / C
        v = q * w
    else:
        v = w + tl.zeros(mask.shape, ACC_DTYPE)
    return tl.where(mask, v, 0.0)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, target_ptr, weight_ptr, loss_ptr, grad_ptr, scale_ptr,
    A, C, B,
    s_a, s_c, s_b, t_a, t_c, t_b, g_a, g_c, g_b,
    ignore_index,
    eps_hi, eps_lo, z_hi, z_lo, cap_hi, cap_lo,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GRAD: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr, ROWS_ALONG_B: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row losses (and the gradient, when HAS_GRAD) of one tile of ROWS rows.

    logits (A, C, B) strides s_*; probability target (PROB_TARGET) strides t_*, else
    target_ptr holds R int64 indices; grad strides g_*; loss_ptr R values in ACC_DTYPE;
    scale one value (not SCALE_PER_ROW) or R values.
    """
    eps = f64_arg(eps_hi, eps_lo, ACC_DTYPE)
    z = f64_arg(z_hi, z_lo, ACC_DTYPE)
    cap = f64_arg(cap_hi, cap_lo, ACC_DTYPE)
    NEED_V: tl.constexpr = PROB_TARGET or SMOOTH

    pid = tl.program_id(0).to(tl.int64)
    if ROWS_ALONG_B:
        tiles_b = tl.cdiv(B, ROWS)
        a = pid // tiles_b
        b = (pid - a * tiles_b) * ROWS + tl.arange(0, ROWS)
        row_ok = b < B
    else:  # B == 1
        a = pid * ROWS + tl.arange(0, ROWS)
        b = 0
        row_ok = a < A
    row = a * B + b
    x_row = a * s_a + b * s_b
    q_row = a * t_a + b * t_b

    if PROB_TARGET:
        active = row_ok
    else:
        t = tl.load(target_ptr + row, mask=row_ok, other=0)
        ignored = t == ignore_index
        in_range = (t >= 0) & (t < C)
        active = row_ok & (t != ignore_index)
        gather = active & in_range
        # The target's logit, read before pass 2 writes anything (grad may be logits).
        x_t = tl.load(logits_ptr + x_row + t * s_c, mask=gather, other=0.0).to(ACC_DTYPE)
        s_t = capped(x_t, cap, SOFTCAP)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t, mask=gather, other=0.0).to(ACC_DTYPE)
        else:
            w_t = tl.full((ROWS,), 1.0, ACC_DTYPE)

    # Pass 1: per-lane online logsumexp (m, d) and, for NEED_V, the sums of v.
    m = tl.full((ROWS, BLOCK_C), NEG_INF, ACC_DTYPE)
    d = tl.zeros((ROWS, BLOCK_C), ACC_DTYPE)
    sv = tl.zeros((ROWS, BLOCK_C), ACC_DTYPE)    # sum v (s - m) over finite s
    vf = tl.zeros((ROWS, BLOCK_C), ACC_DTYPE)    # sum v over finite s
    vinf = tl.zeros((ROWS, BLOCK_C), ACC_DTYPE)  # sum v * inf over s = -inf
    vtot = tl.zeros((ROWS, BLOCK_C), ACC_DTYPE)  # sum v
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = active[:, None] & (c < C)[None, :]
        s = _load_logits(logits_ptr, x_row, c, mask, s_c, cap, SOFTCAP, ACC_DTYPE)
        # A NaN s makes m, and so d, NaN for good (plain maximum would drop it).
        m_new = tl.maximum(m, s, propagate_nan=tl.PropagateNan.ALL)
        # m_new = -inf: nothing finite yet in the lane, d stays 0.
        d = tl.where(m_new == NEG_INF, 0.0, d * tl.exp(m - m_new) + tl.exp(s - m_new))
        if NEED_V:
            v = _chunk_weights(target_ptr, weight_ptr, q_row, c, mask, t_c, eps, C,
                               PROB_TARGET, HAS_WEIGHT, SMOOTH, ACC_DTYPE)
            finite = s > NEG_INF
            sv = tl.where(m == NEG_INF, 0.0, sv - vf * (m_new - m))
            sv += tl.where(finite, v * (s - m_new), 0.0)
            vf += tl.where(finite, v, 0.0)
            vinf += tl.where(mask & (s == NEG_INF), v * INF, 0.0)
            vtot += v
        m = m_new

    row_max = tl.max(m, axis=1)
    lane_empty = m == NEG_INF
    sum_exp = tl.sum(tl.where(lane_empty, 0.0, d * tl.exp(m - row_max[:, None])), axis=1)
    # A row of only -inf (C > 0) has no softmax: loss and gradient NaN, as in PyTorch.
    no_softmax = (row_max == NEG_INF) & (C > 0)
    log_sum = tl.where(no_softmax, NAN, tl.log(sum_exp))
    # lse - s is formed as (row_max - s) + log_sum, and p as exp(s - row_max) / sum_exp:
    # neither rounds through lse, whose ulp is large for logits near 1e4.
    lse = row_max + log_sum
    inv_sum = 1.0 / sum_exp
    if NEED_V:
        # sum_c v_c (lse - s_c), from the lanes' sums relative to their own max.
        v_lse = vf * ((row_max[:, None] - m) + log_sum[:, None]) - sv
        v_lse = tl.sum(tl.where(lane_empty, 0.0, v_lse) + vinf, axis=1)
        v_sum = tl.sum(vtot, axis=1)

    if PROB_TARGET:
        loss = v_lse
        coef = v_sum  # dloss/ds_c = p_c * coef - (v_c or the target's share)
    else:
        loss = w_t * ((row_max - s_t) + log_sum)
        coef = w_t
        if SMOOTH:
            loss = loss * (1.0 - eps) + v_lse * (eps / C)
            coef = coef * (1.0 - eps) + v_sum * (eps / C)
    if Z_LOSS:
        loss += z * lse * lse
        coef += 2.0 * z * lse
    # The -inf entries' v * inf would make it inf, not NaN.
    loss = tl.where(no_softmax, NAN, loss)
    if not PROB_TARGET:
        loss = tl.where(in_range, loss, NAN)
        loss = tl.where(ignored, 0.0, loss)
        coef = tl.where(in_range, coef, NAN)
        if SMOOTH:
            target_share = w_t * (1.0 - eps)
        else:
            target_share = w_t
    tl.store(loss_ptr + row, loss, mask=row_ok)

    if HAS_GRAD:
        # Pass 2: grad = scale * dloss/dx. The row's scale is folded into the per-row
        # coefficients, so the common case rounds like PyTorch's p * g - g.
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + row, mask=row_ok, other=0.0).to(ACC_DTYPE)
        else:
            scale = tl.load(scale_ptr).to(ACC_DTYPE) + tl.zeros((ROWS,), ACC_DTYPE)
        coef = coef * scale
        if PROB_TARGET:
            v_scale = scale
        else:
            target_share = target_share * scale
            if SMOOTH:
                v_scale = scale * (eps / C)
        g_row = a * g_a + b * g_b
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = active[:, None] & (c < C)[None, :]
            s = _load_logits(logits_ptr, x_row, c, mask, s_c, cap, SOFTCAP, ACC_DTYPE)
            g = tl.exp(s - row_max[:, None]) * (inv_sum * coef)[:, None]
            if not PROB_TARGET:
                g -= tl.where(c[None, :] == t[:, None], target_share[:, None], 0.0)
            if NEED_V:
                v = _chunk_weights(target_ptr, weight_ptr, q_row, c, mask, t_c, eps, C,
                                   PROB_TARGET, HAS_WEIGHT, SMOOTH, ACC_DTYPE)
                g -= v * v_scale[:, None]
            if SOFTCAP:
                tanh_x = s / cap
                g = g * (1.0 - tanh_x * tanh_x)
            if not PROB_TARGET:
                g = tl.where(ignored[:, None], 0.0, g)
            tl.store(grad_ptr + g_row[:, None] + c[None, :].to(tl.int64) * g_c,
                     g.to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (c < C)[None, :])


@triton.jit
def _scale_grad_kernel(grad_ptr, scale_ptr, CB, B, tiles, SCALE_PER_ROW: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """grad (A, C, B) contiguous *= scale of each element's row; scale == 1 is skipped.

    Program pid covers BLOCK elements of the C * B slab of a = pid // tiles.
    """
    pid = tl.program_id(0).to(tl.int64)
    a = pid // tiles
    j = (pid - a * tiles) * BLOCK + tl.arange(0, BLOCK)
    in_slab = j < CB
    if SCALE_PER_ROW:
        scale = tl.load(scale_ptr + a * B + j % B, mask=in_slab, other=1.0).to(ACC_DTYPE)
    else:
        scale = tl.zeros((BLOCK,), ACC_DTYPE) + tl.load(scale_ptr).to(ACC_DTYPE)
    touch = in_slab & (scale != 1.0)
    ptrs = grad_ptr + a * CB + j
    g = tl.load(ptrs, mask=touch, other=0.0).to(ACC_DTYPE)
    tl.store(ptrs, (g * scale).to(grad_ptr.dtype.element_ty), mask=touch)


def _check_scale(scale, rows):
    """The kernels index scale as a contiguous (1,) or (rows,) vector: anything else would
    read out of bounds (e.g. the stride-0 grad_output of a .sum())."""
    if scale.dim() != 1 or scale.numel() not in (1, rows) or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous vector of 1 or {rows} elements, got "
                         f"shape {tuple(scale.shape)}, strides {scale.stride()}")


def _rows_config(A, C, B):
    """(ROWS, BLOCK_C, num_warps) for the rows kernel.

    A row chunk is at most 4096 classes on the GPU; small C packs several rows into a
    tile of at most 2048 elements. Under the interpreter the chunk is small (64) so that
    loops and masks are exercised at test sizes. These are first guesses, not tuned.
    """
    if triton_interpreting():
        max_block_c, max_tile = 64, 256
    else:
        max_block_c, max_tile = 4096, 2048
    block_c = min(max(triton.next_power_of_2(C), 16), max_block_c)
    rows = max(1, max_tile // block_c)
    rows = min(rows, triton.next_power_of_2(B if B > 1 else A))
    elements = rows * block_c
    # A 2048-element tile of several rows gets 16 warps: ptxas holds a kernel to about
    # 2^16 / (2 x threads) registers, and at 8 warps the rows kernel spilled 28 bytes in
    # float32 (sm_90). At 16 nothing spills with Triton 3.6 (the GPU machine's); Triton 3.9
    # spills 8-12 bytes in five configs (CI's AOT tables, scripts/triton_aot.py).
    num_warps = (1 if elements <= 256 else 4 if elements <= 1024
                 else 8 if elements <= 2048 and rows == 1 else 16)
    return rows, block_c, num_warps


def cross_entropy_rows(logits, target, class_weight, ignore_index, label_smoothing, z_loss,
                       softcap, grad, scale):
    """Row losses, and optionally the gradient, in one kernel launch.

    logits: (A, C, B), any strides; rows R = A * B, row r = a * B + b.
    target: R contiguous int64 class indices, or (A, C, B) probabilities (any strides) in
    the logits' dtype. class_weight: (C,) contiguous in the accumulation dtype, or None.
    grad: None, or (A, C, B) (any strides, logits' dtype; may be logits itself) to receive
    scale * dloss/dlogits. scale: (1,) or (R,) in the accumulation dtype, read on the device.
    Returns the (R,) row losses in the accumulation dtype (float64 for float64 logits,
    float32 otherwise). Arguments are assumed valid (the op layer checks them).
    """
    A, C, B = logits.shape
    R = A * B
    if grad is not None:
        _check_scale(scale, R)
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(R, dtype=acc, device=logits.device)
    if R == 0:
        return loss
    prob_target = target.is_floating_point()
    if prob_target:
        t_strides = target.stride()
    else:
        t_strides = (0, 0, 0)
    g_strides = (0, 0, 0) if grad is None else grad.stride()
    scale_per_row = grad is not None and scale.numel() != 1
    rows, block_c, num_warps = _rows_config(A, C, B)
    rows_along_b = B > 1
    grid = (A * triton.cdiv(B, rows) if rows_along_b else triton.cdiv(A, rows),)
    _cross_entropy_rows_kernel[grid](
        logits, target, logits if class_weight is None else class_weight, loss,
        logits if grad is None else grad, loss if grad is None else scale,
        A, C, B,
        *logits.stride(), *t_strides, *g_strides,
        int(ignore_index),
        *split_f64(float(label_smoothing)), *split_f64(float(z_loss)),
        *split_f64(float(softcap)),
        PROB_TARGET=prob_target, HAS_WEIGHT=class_weight is not None,
        SMOOTH=label_smoothing > 0, Z_LOSS=z_loss > 0, SOFTCAP=softcap > 0,
        HAS_GRAD=grad is not None, SCALE_PER_ROW=scale_per_row,
        ROWS_ALONG_B=rows_along_b, ACC_DTYPE=TL_DTYPES[acc],
        ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return loss


def cross_entropy_scale_grad_(grad, scale):
    """In place: grad (A, C, B), contiguous, *= scale[row] ((R,) scale) or scale[0] ((1,)).

    Elements whose scale is exactly 1 are neither read nor written, decided on the device
    (no host synchronisation), so a backward with grad_output 1 costs one tiny read.
    Returns grad.
    """
    A, C, B = grad.shape
    _check_scale(scale, A * B)
    CB = C * B
    if A == 0 or CB == 0:
        return grad
    block = _SCALE_BLOCK_INTERPRET if triton_interpreting() else _SCALE_BLOCK
    tiles = triton.cdiv(CB, block)
    _scale_grad_kernel[(A * tiles,)](
        grad, scale, CB, B, tiles, SCALE_PER_ROW=scale.numel() != 1,
        ACC_DTYPE=TL_DTYPES[acc_dtype(grad.dtype)], BLOCK=block,
        num_warps=1 if triton_interpreting() else 4,
    )
    return grad
