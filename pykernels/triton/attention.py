"""Flash attention (FlashAttention-2 style) forward and backward in Triton.

The Python op layer (pykernels/ops/attention.py) validates the arguments, builds the mask,
draws the dropout seed and does autograd; these kernels implement the math of
kernels/attention.h, which the CUDA and C++ CPU backends share. Per (z, query head h) and
query row i, with p the dropout probability:

  t_ij  = softcap > 0 ? softcap * tanh(scale <q_i, k_j> / softcap) : scale <q_i, k_j>
  s_ij  = t_ij + mask_ij, and -inf unless allowed(i, j):
          causal: j <= i; window (left, right), -1 unbounded: i - left <= j <= i + right
  lse_i = log sum_j exp(s_ij),  P_ij = exp(s_ij - lse_i)
  out_i = sum_j P_ij D_ij v_j / (1 - p)
  dP_ij = <dO_i, v_j> D_ij / (1 - p),  Delta_i = <dO_i, out_i>
  dS_ij = P_ij (dP_ij - Delta_i), times 1 - (t_ij / softcap)^2 with softcap
  dq_i  = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,
  dv_j  = sum_i P_ij D_ij dO_i / (1 - p)   (dk, dv summed over the query heads of the group)
A row with no allowed finite score gets out 0 and lse +inf, so exp(s - lse) = 0 in the
backward and the row passes zero gradient; masking never makes a NaN.

Kernels, each on a one-dimensional grid (no 65535 limit on any axis); programs of the same
head are adjacent, so they share its K/V (or Q/dO) tiles in L2:
- forward: one program per (z, h, tile of BLOCK_M query rows). It loads its q tile once and
  walks the key tiles of BLOCK_N keys that intersect its rows' band, keeping the running max
  m, the sum l and the accumulator (online softmax; the exponent is taken against 0 while m
  is still -inf, so masked tiles add nothing). With causal masking the heaviest query tiles
  (last rows) start first.
- backward, without atomics (deterministic: every output element is written by one program,
  summed in a fixed order):
  1. Delta = rowsum(dO * out), one program per (z, h, tile of query rows);
  2. dK, dV: one program per (z, kv head, tile of BLOCK_N keys); it keeps k, v and the fp32
     dk, dv accumulators, and loops over the query heads of its GQA group and, for each,
     over the query tiles of the key tile's band, recomputing P = exp(s - lse);
  3. dQ: one program per (z, h, tile of query rows), looping over the band's key tiles.

Band loop bounds. Query rows [m0, m1] (m1 = min(m0 + BLOCK_M, L) - 1) may attend keys
[window_left >= 0 ? m0 - left : 0, min(S - 1, causal ? m1 : .., right >= 0 ? m1 + right : ..)];
key columns [n0, n1] are attended by rows [max(causal ? n0 : 0, right >= 0 ? n0 - right : 0),
min(L - 1, left >= 0 ? n1 + left : ..)]. The loops start at the tile holding the first of
these, so tiles fully outside the band are never visited; the tiles at the band's edges
are masked elementwise.

Dropout keep mask. D_ij = 1 iff (w >> 8) >= ceil(p 2^24), with w the first 32-bit word of
Philox-4x32-10 keyed by the 64-bit seed (k0 = low half, k1 = high half) at the counter
(c0, c1) = the 64-bit element index ((z Hq + h) L + i) S + j, (c2, c3) = the 64-bit offset:
the uniform (w >> 8) / 2^24 >= p, exactly as the C++ CPU backend draws it, so both backends
drop the same elements. The index does not wrap below 2^64 score elements, and distinct
offsets are distinct streams.

Numerics: accumulation in float32 (float64 for float64 inputs, the interpreter's gradcheck);
tl.dot accumulates in that dtype, with input_precision "ieee" for float32 unless torch allows
TF32; P and dS are rounded to the input dtype before their products, as in FlashAttention.
Python floats reach the kernels as float32 hi + lo pairs (scale, softcap, 1 / (1 - p)).
Head dims are padded to powers of two BLOCK_E / BLOCK_EV (at least 16) with masked loads;
sequence lengths need not be multiples of any tile; all offsets are int64.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ._common import (
    INF,
    NEG_INF,
    TL_DTYPES,
    acc_dtype,
    capped,
    f64_arg,
    input_precision,
    split_f64,
)

# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _u32(x):
    """An int32 argument (see _i32_halves) as the uint32 of the same bits.

    tl.cast, not x.to: a launch specialises an argument equal to 1 into a constexpr, which
    has no .to, and tl.cast makes a tensor of it first (Triton 3.6 has no tl.to_tensor).
    """
    return tl.cast(x, tl.uint32, bitcast=True)


@triton.jit
def _dropout_keep(seed_lo, seed_hi, offset_lo, offset_hi, elem_row, j, threshold):
    """The keep mask D of a [BLOCK_M, BLOCK_N] tile.

    elem_row: [BLOCK_M] int64, ((z Hq + h) L + i) S; j: [BLOCK_N] key indices; seed and
    offset as int32 halves. D = (Philox-4x32-10 word 0 >> 8) >= threshold (see the module
    doc).
    """
    e = elem_row[:, None] + j[None, :].to(tl.int64)
    c0 = e.to(tl.uint32)
    c1 = (e >> 32).to(tl.uint32)
    zero = c0 * 0
    seed = (_u32(seed_hi).to(tl.uint64) << 32) | _u32(seed_lo).to(tl.uint64)
    w, _, _, _ = tl.philox(seed, c0, c1, zero + _u32(offset_lo), zero + _u32(offset_hi))
    return (w >> 8).to(tl.int32) >= threshold


@triton.jit
def _scores(qk, i, j, L, S, mask_ptrs, scale, cap, left, right,
            HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
            WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(s, t) of a [BLOCK_M, BLOCK_N] tile of raw products qk = <q_i, k_j>.

    t is the capped score before the mask (for the softcap gradient); s adds the mask and
    is -inf outside the band and outside [0, L) x [0, S).
    """
    t = capped(qk * scale, cap, SOFTCAP)
    ok = (i[:, None] < L) & (j[None, :] < S)
    s = t
    if HAS_MASK:
        s += tl.load(mask_ptrs, mask=ok, other=0.0).to(ACC_DTYPE)
    if CAUSAL:
        ok &= j[None, :] <= i[:, None]
    if WINDOW_LEFT:
        ok &= j[None, :] >= i[:, None] - left
    if WINDOW_RIGHT:
        ok &= j[None, :] <= i[:, None] + right
    return tl.where(ok, s, NEG_INF), t


@triton.jit
def _key_range(m0, L, S, left, right, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
               WINDOW_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first key tile start, key end) of the band of query rows [m0, m0 + BLOCK_M)."""
    m1 = tl.minimum(m0 + BLOCK_M, L) - 1
    lo = m0 * 0
    hi = m0 * 0 + S
    if WINDOW_LEFT:
        lo = tl.maximum(m0 - left, 0)
    if CAUSAL:
        hi = tl.minimum(hi, m1 + 1)
    if WINDOW_RIGHT:
        hi = tl.minimum(hi, m1 + right + 1)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(n0, L, S, left, right, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                 WINDOW_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first query tile start, query end) of the rows attending keys [n0, n0 + BLOCK_N)."""
    n1 = tl.minimum(n0 + BLOCK_N, S) - 1
    lo = n0 * 0
    hi = n0 * 0 + L
    if CAUSAL:
        lo = n0
    if WINDOW_RIGHT:
        lo = tl.maximum(lo, n0 - right)
    if WINDOW_LEFT:
        hi = tl.minimum(hi, n1 + left + 1)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _query_tile(Hq, G, L, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(z Hq + h, z, h, kv head, first row m0, rows i) of this program's query tile.

    Programs of one head are adjacent; with causal masking the longest rows go first.
    """
    pid = tl.program_id(0)
    tiles = tl.cdiv(L, BLOCK_M)
    zh = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    if CAUSAL:
        tile = tiles - 1 - tile
    h = zh % Hq
    m0 = tile * BLOCK_M
    return zh, zh // Hq, h, h // G, m0, m0 + tl.arange(0, BLOCK_M)


@triton.jit
def _score_grads(p, dp, delta, t, cap, seed_lo, seed_hi, offset_lo, offset_hi, elem_row, j,
                 threshold, rescale_hi, rescale_lo, SOFTCAP: tl.constexpr,
                 DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(P D / (1 - p), dS) of a tile from P, dP' = dO v^T (before dropout) and Delta."""
    if DROPOUT:
        rescale = f64_arg(rescale_hi, rescale_lo, ACC_DTYPE)
        keep = _dropout_keep(seed_lo, seed_hi, offset_lo, offset_hi, elem_row, j, threshold)
        pd = tl.where(keep, p * rescale, 0.0)
        dp = tl.where(keep, dp * rescale, 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        r = t / cap
        ds = ds * (1.0 - r * r)
    return pd, ds


@triton.jit
def _tile_ptrs(base, rows, cols, s_row, s_col):
    return base + rows[:, None].to(tl.int64) * s_row + cols[None, :].to(tl.int64) * s_col


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    Hq, G, L, S, E, EV,
    sqz, sqh, sql, sqe, skz, skh, sks, ske, svz, svh, svs, sve, smz, smh, sml, sms,
    left, right,
    scale_hi, scale_lo, cap_hi, cap_lo, rescale_hi, rescale_lo,
    seed_lo, seed_hi, offset_lo, offset_hi, threshold,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """out (Z, Hq, L, Ev) and lse (Z, Hq, L), both contiguous, of one query tile."""
    scale = f64_arg(scale_hi, scale_lo, ACC_DTYPE)
    cap = f64_arg(cap_hi, cap_lo, ACC_DTYPE)
    zh, z, h, hk, m0, i = _query_tile(Hq, G, L, CAUSAL, BLOCK_M)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    row_ok = i < L

    q = tl.load(_tile_ptrs(q_ptr + z * sqz + h * sqh, i, e, sql, sqe),
                mask=row_ok[:, None] & (e < E)[None, :], other=0.0)
    n_start, n_end = _key_range(m0, L, S, left, right, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                                BLOCK_M, BLOCK_N)
    jt = n_start + tl.arange(0, BLOCK_N)
    # K is read transposed, as a [BLOCK_E, BLOCK_N] tile.
    kt_ptrs = _tile_ptrs(k_ptr + z * skz + hk * skh, e, jt, ske, sks)
    v_ptrs = _tile_ptrs(v_ptr + z * svz + hk * svh, jt, ev, svs, sve)
    mask_ptrs = _tile_ptrs(mask_ptr + z * smz + h * smh, i, jt, sml, sms)
    if DROPOUT:
        elem_row = (zh * L + i) * S

    m = tl.full((BLOCK_M,), NEG_INF, ACC_DTYPE)
    l_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), ACC_DTYPE)
    for n0 in range(n_start, n_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        col_ok = j < S
        kt = tl.load(kt_ptrs, mask=(e < E)[:, None] & col_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        s, _ = _scores(qk, i, j, L, S, mask_ptrs, scale, cap, left, right, HAS_MASK, CAUSAL,
                       WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # While a row has seen nothing finite, exponents are taken against 0: p = 0, alpha = 0.
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, offset_lo, offset_hi, elem_row, j,
                                 threshold)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & (ev < EV)[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION,
                     out_dtype=ACC_DTYPE)
        m = m_new
        kt_ptrs += tl.cast(sks, tl.int64) * BLOCK_N
        v_ptrs += tl.cast(svs, tl.int64) * BLOCK_N
        mask_ptrs += tl.cast(sms, tl.int64) * BLOCK_N

    empty = l_sum == 0.0  # no allowed finite score
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_sum))
    if DROPOUT:
        inv = inv * f64_arg(rescale_hi, rescale_lo, ACC_DTYPE)
    out = acc * inv[:, None]
    lse = tl.where(empty, INF, m + tl.log(tl.where(empty, 1.0, l_sum)))
    row = zh * L + i
    tl.store(_tile_ptrs(out_ptr, row, ev, EV, 1), out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (ev < EV)[None, :])
    tl.store(lse_ptr + row, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(out_ptr, do_ptr, delta_ptr, Hq, L, EV,
                           soz, soh, sol, soe, sdz, sdh, sdl, sde,
                           ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_EV: tl.constexpr):
    """Delta (Z, Hq, L) contiguous = rowsum(dO * out), for one tile of query rows."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(L, BLOCK_M)
    zh = (pid // tiles).to(tl.int64)
    z = zh // Hq
    h = zh % Hq
    i = (pid % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    ev = tl.arange(0, BLOCK_EV)
    ok = (i < L)[:, None] & (ev < EV)[None, :]
    o = tl.load(_tile_ptrs(out_ptr + z * soz + h * soh, i, ev, sol, soe), mask=ok, other=0.0)
    do = tl.load(_tile_ptrs(do_ptr + z * sdz + h * sdh, i, ev, sdl, sde), mask=ok, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    tl.store(delta_ptr + zh * L + i, delta, mask=i < L)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    Hq, Hkv, G, L, S, E, EV,
    sqz, sqh, sql, sqe, skz, skh, sks, ske, svz, svh, svs, sve, smz, smh, sml, sms,
    sdz, sdh, sdl, sde,
    left, right,
    scale_hi, scale_lo, cap_hi, cap_lo, rescale_hi, rescale_lo,
    seed_lo, seed_hi, offset_lo, offset_hi, threshold,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """dk (Z, Hkv, S, E) and dv (Z, Hkv, S, Ev), contiguous, of one key tile.

    Sums over the G query heads of the group and the query tiles of the band, in order.
    """
    scale = f64_arg(scale_hi, scale_lo, ACC_DTYPE)
    cap = f64_arg(cap_hi, cap_lo, ACC_DTYPE)
    pid = tl.program_id(0)
    tiles = tl.cdiv(S, BLOCK_N)
    zk = (pid // tiles).to(tl.int64)
    z = zk // Hkv
    hk = zk % Hkv
    n0 = (pid % tiles) * BLOCK_N
    j = n0 + tl.arange(0, BLOCK_N)
    col_ok = j < S
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    e_ok = e < E
    ev_ok = ev < EV

    k = tl.load(_tile_ptrs(k_ptr + z * skz + hk * skh, j, e, sks, ske),
                mask=col_ok[:, None] & e_ok[None, :], other=0.0)
    v = tl.load(_tile_ptrs(v_ptr + z * svz + hk * svh, j, ev, svs, sve),
                mask=col_ok[:, None] & ev_ok[None, :], other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    m_start, m_end = _query_range(n0, L, S, left, right, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                                  BLOCK_M, BLOCK_N)

    dk = tl.zeros((BLOCK_N, BLOCK_E), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), ACC_DTYPE)
    it = m_start + tl.arange(0, BLOCK_M)
    for g in range(0, G):
        h = hk * G + g
        zh = z * Hq + h
        q_ptrs = _tile_ptrs(q_ptr + z * sqz + h * sqh, it, e, sql, sqe)
        do_ptrs = _tile_ptrs(do_ptr + z * sdz + h * sdh, it, ev, sdl, sde)
        mask_ptrs = _tile_ptrs(mask_ptr + z * smz + h * smh, it, j, sml, sms)
        for m0 in range(m_start, m_end, BLOCK_M):
            i = m0 + tl.arange(0, BLOCK_M)
            row_ok = i < L
            q = tl.load(q_ptrs, mask=row_ok[:, None] & e_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & ev_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + zh * L + i, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + zh * L + i, mask=row_ok, other=0.0)
            qk = tl.dot(q, kt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            s, t = _scores(qk, i, j, L, S, mask_ptrs, scale, cap, left, right, HAS_MASK,
                           CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ACC_DTYPE)
            p = tl.exp(s - lse[:, None])  # 0 off the band and on fully masked rows (lse inf)
            dp = tl.dot(do, vt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            pd, ds = _score_grads(p, dp, delta, t, cap, seed_lo, seed_hi, offset_lo, offset_hi,
                                  (zh * L + i) * S, j, threshold, rescale_hi, rescale_lo,
                                  SOFTCAP, DROPOUT, ACC_DTYPE)
            dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION,
                        out_dtype=ACC_DTYPE)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION,
                        out_dtype=ACC_DTYPE)
            q_ptrs += tl.cast(sql, tl.int64) * BLOCK_M
            do_ptrs += tl.cast(sdl, tl.int64) * BLOCK_M
            mask_ptrs += tl.cast(sml, tl.int64) * BLOCK_M

    dk = dk * scale
    tl.store(_tile_ptrs(dk_ptr, zk * S + j, e, E, 1), dk.to(dk_ptr.dtype.element_ty),
             mask=col_ok[:, None] & e_ok[None, :])
    tl.store(_tile_ptrs(dv_ptr, zk * S + j, ev, EV, 1), dv.to(dv_ptr.dtype.element_ty),
             mask=col_ok[:, None] & ev_ok[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    Hq, G, L, S, E, EV,
    sqz, sqh, sql, sqe, skz, skh, sks, ske, svz, svh, svs, sve, smz, smh, sml, sms,
    sdz, sdh, sdl, sde,
    left, right,
    scale_hi, scale_lo, cap_hi, cap_lo, rescale_hi, rescale_lo,
    seed_lo, seed_hi, offset_lo, offset_hi, threshold,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """dq (Z, Hq, L, E), contiguous, of one query tile."""
    scale = f64_arg(scale_hi, scale_lo, ACC_DTYPE)
    cap = f64_arg(cap_hi, cap_lo, ACC_DTYPE)
    zh, z, h, hk, m0, i = _query_tile(Hq, G, L, CAUSAL, BLOCK_M)
    row_ok = i < L
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    e_ok = e < E
    ev_ok = ev < EV

    q = tl.load(_tile_ptrs(q_ptr + z * sqz + h * sqh, i, e, sql, sqe),
                mask=row_ok[:, None] & e_ok[None, :], other=0.0)
    do = tl.load(_tile_ptrs(do_ptr + z * sdz + h * sdh, i, ev, sdl, sde),
                 mask=row_ok[:, None] & ev_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + zh * L + i, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + zh * L + i, mask=row_ok, other=0.0)
    n_start, n_end = _key_range(m0, L, S, left, right, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                                BLOCK_M, BLOCK_N)
    jt = n_start + tl.arange(0, BLOCK_N)
    k_ptrs = _tile_ptrs(k_ptr + z * skz + hk * skh, jt, e, sks, ske)
    vt_ptrs = _tile_ptrs(v_ptr + z * svz + hk * svh, ev, jt, sve, svs)
    mask_ptrs = _tile_ptrs(mask_ptr + z * smz + h * smh, i, jt, sml, sms)

    dq = tl.zeros((BLOCK_M, BLOCK_E), ACC_DTYPE)
    for n0 in range(n_start, n_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        col_ok = j < S
        k = tl.load(k_ptrs, mask=col_ok[:, None] & e_ok[None, :], other=0.0)
        vt = tl.load(vt_ptrs, mask=ev_ok[:, None] & col_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        s, t = _scores(qk, i, j, L, S, mask_ptrs, scale, cap, left, right, HAS_MASK, CAUSAL,
                       WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ACC_DTYPE)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        _, ds = _score_grads(p, dp, delta, t, cap, seed_lo, seed_hi, offset_lo, offset_hi,
                             (zh * L + i) * S, j, threshold, rescale_hi, rescale_lo, SOFTCAP,
                             DROPOUT, ACC_DTYPE)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION,
                    out_dtype=ACC_DTYPE)
        k_ptrs += tl.cast(sks, tl.int64) * BLOCK_N
        vt_ptrs += tl.cast(svs, tl.int64) * BLOCK_N
        mask_ptrs += tl.cast(sms, tl.int64) * BLOCK_N

    dq = dq * scale
    tl.store(_tile_ptrs(dq_ptr, zh * L + i, e, E, 1), dq.to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & e_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration and wrappers
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by max(BLOCK_E, BLOCK_EV) and element size.
# 16-bit: first guesses after the Triton tutorial's fused attention (H100), not tuned on a
# GPU yet; 8 warps throughout and smaller tiles at head dim 256, the largest that compile
# for sm_90 without spilling with every option on (dropout's Philox draws hold many
# registers; CI's AOT table, scripts/triton_aot.py). float32 multiplies exactly on CUDA
# cores with operands in registers, so its tiles are smaller still (at 16-bit sizes it
# spilled 20-60 KB; with dropout and a mask a few tiles still spill 8-50 bytes, where
# ptxas holds them to 80-128 registers). _config shrinks them to the device's shared memory.
_CONFIGS = {
    2: {
        "fwd": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
        "dkdv": {64: (32, 128, 8, 3), 128: (32, 64, 8, 3), 256: (16, 64, 8, 2)},
        "dq": {64: (128, 32, 8, 3), 128: (64, 32, 8, 3), 256: (32, 32, 8, 2)},
    },
    4: {
        "fwd": {64: (64, 32, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 8, 2)},
        "dkdv": {64: (32, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)},
        "dq": {64: (64, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)},
    },
}
_INTERPRET_BLOCK = 16  # small tiles under the interpreter exercise the loops and masks
_DELTA_ROWS = 64


@functools.cache
def _smem_budget(device_index):
    """A share of the shared memory one block may use, leaving room for Triton's scratch."""
    props = torch.cuda.get_device_properties(device_index)
    total = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return int(total * 0.6)


def _smem_estimate(kind, block_m, block_n, stages, block_e, block_ev, size, has_mask):
    """Rough bytes of shared memory: the tiles that stay, the pipelined ones, the P/dS tiles."""
    d = block_e + block_ev
    if kind == "fwd":
        fixed, streamed, extra = block_m * block_e, block_n * d, block_m * block_n
    elif kind == "dkdv":
        fixed, streamed, extra = block_n * d, block_m * d, 2 * block_m * block_n
    else:
        fixed, streamed, extra = block_m * d, block_n * d, block_m * block_n
    if has_mask:
        streamed += block_m * block_n
    return size * (fixed + max(stages, 1) * streamed + extra)


def _config(kind, device, block_e, block_ev, size, has_mask):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel.

    kind "fwd" and "dq" stream key tiles (BLOCK_N), "dkdv" streams query tiles (BLOCK_M).
    Every size is a power of two and at least 16, so every tl.dot tile is GPU-legal.
    """
    if triton_interpreting():
        return _INTERPRET_BLOCK, _INTERPRET_BLOCK, 1, 1
    d = max(block_e, block_ev)
    bucket = 64 if d <= 64 else 128 if d <= 128 else 256
    block_m, block_n, warps, stages = _CONFIGS[size][kind][bucket]
    budget = _smem_budget(device.index if device.index is not None else
                          torch.cuda.current_device())
    while _smem_estimate(kind, block_m, block_n, stages, block_e, block_ev, size,
                         has_mask) > budget:
        if stages > 1:
            stages -= 1
        elif kind == "dkdv" and block_m > 16:
            block_m //= 2
        elif kind != "dkdv" and block_n > 16:
            block_n //= 2
        elif block_m > 16 and block_m >= block_n:
            block_m //= 2
        elif block_n > 16:
            block_n //= 2
        else:
            break
    return block_m, block_n, warps, stages


def _i32_halves(x):
    """A Python int modulo 2^64 as (lo, hi) 32-bit halves, each in int32 range, so the
    kernels always see int32 arguments (_dropout_keep reassembles it)."""
    x &= (1 << 64) - 1
    halves = (x & 0xFFFFFFFF, x >> 32)
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in halves)


def _common_args(q, k, v, mask, scale, causal, window_left, window_right, softcap, dropout_p,
                 seed, offset):
    """The arguments the forward, dK/dV and dQ kernels share, as (strides, scalars, flags):
    the q, k, v and mask strides, the scalars from the window to the dropout threshold (the
    backward kernels take dO's strides between the two), and the constexprs."""
    mask_strides = (0, 0, 0, 0) if mask is None else mask.stride()
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides)
    dropout = dropout_p > 0
    threshold = math.ceil(dropout_p * (1 << 24)) if dropout else 0
    rescale = 1.0 / (1.0 - dropout_p) if dropout else 1.0
    scalars = (
        int(window_left), int(window_right),
        *split_f64(float(scale)), *split_f64(float(softcap) if softcap > 0 else 1.0),
        *split_f64(rescale),
        *_i32_halves(int(seed)), *_i32_halves(int(offset)), threshold,
    )
    flags = dict(
        HAS_MASK=mask is not None, CAUSAL=bool(causal), WINDOW_LEFT=window_left >= 0,
        WINDOW_RIGHT=window_right >= 0, SOFTCAP=softcap > 0, DROPOUT=dropout,
        ACC_DTYPE=TL_DTYPES[acc_dtype(q.dtype)], INPUT_PRECISION=input_precision(q.dtype),
        BLOCK_E=max(16, triton.next_power_of_2(q.shape[3])),
        BLOCK_EV=max(16, triton.next_power_of_2(v.shape[3])),
    )
    return strides, scalars, flags


def _launch_config(kind, q, flags):
    block_m, block_n, warps, stages = _config(kind, q.device, flags["BLOCK_E"],
                                              flags["BLOCK_EV"], q.element_size(),
                                              flags["HAS_MASK"])
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def attention_forward(q, k, v, mask, scale, causal, window_left, window_right, softcap,
                      dropout_p, seed, offset):
    """Flash attention forward (math in the module doc and kernels/attention.h).

    q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev): any strides; Hq % Hkv == 0 (query
    head h uses kv head h // (Hq // Hkv)). mask: None, or an additive float mask in q's dtype
    viewed as (Z, Hq, L, S), possibly with zero strides. scale: float; causal: bool (j <= i);
    window_left / window_right: int in [0, L + S], or -1 for unbounded (i - left <= j <=
    i + right; the op layer clamps wider sides to L + S, which keeps the kernels' index
    arithmetic far from overflow); softcap: float > 0, or 0 for none; dropout_p in [0, 1);
    seed, offset: ints (the keep mask is a pure function of seed, offset, z, h, i, j).
    Returns out (Z, Hq, L, Ev), contiguous, in q's dtype, and lse (Z, Hq, L), contiguous, in
    the accumulation dtype (float64 for float64 inputs, float32 otherwise); a fully masked
    row has out 0 and lse +inf. Arguments are assumed valid (the op layer checks them).
    """
    Z, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Ev = v.shape[3]
    out = torch.empty((Z, Hq, L, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((Z, Hq, L), dtype=acc_dtype(q.dtype), device=q.device)
    if Z * Hq * L == 0:
        return out, lse
    strides, scalars, flags = _common_args(q, k, v, mask, scale, causal, window_left,
                                           window_right, softcap, dropout_p, seed, offset)
    cfg = _launch_config("fwd", q, flags)
    grid = (Z * Hq * triton.cdiv(L, cfg["BLOCK_M"]),)
    _attn_fwd_kernel[grid](
        q, k, v, q if mask is None else mask, out, lse,
        Hq, Hq // Hkv, L, S, E, Ev,
        *strides, *scalars, **flags, **cfg,
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, mask, scale, causal, window_left,
                       window_right, softcap, dropout_p, seed, offset):
    """Gradients (dq, dk, dv), contiguous, shaped like q, k, v, in q's dtype.

    dout and out (Z, Hq, L, Ev) any strides; lse as attention_forward returned it; the other
    arguments as attention_forward's. No atomics: the result is bitwise identical run to run.
    """
    Z, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Ev = v.shape[3]
    dq = torch.empty((Z, Hq, L, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((Z, Hkv, S, E), dtype=q.dtype, device=q.device)
    dv = torch.empty((Z, Hkv, S, Ev), dtype=q.dtype, device=q.device)
    if Z * Hkv * S == 0:  # no keys: every row is fully masked
        return dq.zero_(), dk, dv
    lse = lse.contiguous()
    strides, scalars, flags = _common_args(q, k, v, mask, scale, causal, window_left,
                                           window_right, softcap, dropout_p, seed, offset)
    delta = torch.empty((Z, Hq, L), dtype=acc_dtype(q.dtype), device=q.device)
    if L > 0:
        delta_rows = _INTERPRET_BLOCK if triton_interpreting() else _DELTA_ROWS
        _attn_bwd_delta_kernel[(Z * Hq * triton.cdiv(L, delta_rows),)](
            out, dout, delta, Hq, L, Ev, *out.stride(), *dout.stride(),
            ACC_DTYPE=flags["ACC_DTYPE"], BLOCK_M=delta_rows, BLOCK_EV=flags["BLOCK_EV"],
        )
    mask_arg = q if mask is None else mask
    cfg = _launch_config("dkdv", q, flags)
    _attn_bwd_dkdv_kernel[(Z * Hkv * triton.cdiv(S, cfg["BLOCK_N"]),)](
        q, k, v, mask_arg, dout, lse, delta, dk, dv,
        Hq, Hkv, Hq // Hkv, L, S, E, Ev,
        *strides, *dout.stride(), *scalars, **flags, **cfg,
    )
    if L > 0:
        cfg = _launch_config("dq", q, flags)
        _attn_bwd_dq_kernel[(Z * Hq * triton.cdiv(L, cfg["BLOCK_M"]),)](
            q, k, v, mask_arg, dout, lse, delta, dq,
            Hq, Hq // Hkv, L, S, E, Ev,
            *strides, *dout.stride(), *scalars, **flags, **cfg,
        )
    return dq, dk, dv
