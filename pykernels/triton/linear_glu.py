"""The gated linear unit in Triton: h = act(x @ Wg^T + bg) * (x @ Wu^T + bu).

weight = [Wg; Wu] is (2N, K) and bias = [bg; bu] is (2N). The forward kernel keeps two
accumulators per tile, the gate columns j and the up columns N + j of the same output tile,
fed by one load of the x tile per k step, and gates them in the epilogue: h is the only
(M, N) store unless the backward needs [g | u] (stored then, (M, 2N), biases added).

Backward, with h = act(g) u:
    dg = dh * u * act'(g)      (relu: the select of activation_backward)
    du = dh * act(g)
    grad_bias   = column sums of [dg | du]
    grad_input  = [dg | du] @ W,   grad_weight = [dg | du]^T @ x
One kernel forms [dg | du] and the fp32 column partials of both halves (added up in a fixed
order by _common.column_sum_kernel); the GEMMs are linear_act's backward without
activation (pykernels/ops/linear_glu.py).
"""

import torch
import triton
import triton.language as tl

from ._activation import NONE, activation_backward, apply_activation
from ._common import (
    TL_DTYPES,
    acc_dtype,
    column_sums,
    f64_arg,
    first_contact,
    gemm_configs,
    input_precision,
    split_f64,
    tile_rows_cols,
)

# The backward kernel: a program covers _GRAD_ROWS_PER_PROGRAM rows by _GRAD_BLOCK_N output
# columns (both halves), _GRAD_BLOCK_M rows at a time.
_GRAD_BLOCK_M = 32
_GRAD_BLOCK_N = 64
_GRAD_ROWS_PER_PROGRAM = 256

# Shared memory a config may use (bytes): the H100/H200 limit is 227 KiB per block; A100's 163.
_SMEM_LIMIT = 160 * 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); every stage holds one x tile and two
# weight tiles, so these are smaller than linear_act's; _prune drops what does not fit.
_SHAPES = [
    (128, 128, 64, 3, 8),
    (128, 128, 32, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 4),
]


def _prune(configs, named_args, **kwargs):
    """The configs whose pipeline stages (x tile + gate and up tiles) fit _SMEM_LIMIT."""
    size = named_args["a_ptr"].element_size()

    def smem(c):
        k = c.kwargs
        return c.num_stages * (k["BLOCK_M"] + 2 * k["BLOCK_N"]) * k["BLOCK_K"] * size

    fitting = [c for c in configs if smem(c) <= _SMEM_LIMIT]
    return first_contact(fitting or [min(configs, key=smem)])


@triton.autotune(configs=gemm_configs(_SHAPES, interpret_stages=2),
                 key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _glu_forward_kernel(
    a_ptr, w_ptr, h_ptr, bias_ptr, gu_ptr,
    M, N, K,
    M_BUCKET, N_BUCKET, K_BUCKET,  # only the autotune key: the sizes rounded up to powers of 2
    stride_am, stride_ak, stride_wn, stride_wk, stride_bias,
    slope_hi, slope_lo,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h (M, N) = act(a @ Wg^T + bg) * (a @ Wu^T + bu), gu (M, 2N) = [g | u] if STORE_PREACT.

    a (M, K) and w (2N, K) take any strides; h and gu are contiguous.
    """
    rm, rn = tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # rn: output columns
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :].to(tl.int64) * stride_ak
    # b = W^T: element (k, j) of the gate half at w[j, k], of the up half at w[N + j, k].
    g_ptrs = w_ptr + rk[:, None].to(tl.int64) * stride_wk + rn[None, :] * stride_wn
    up_offset = tl.cast(N, tl.int64) * stride_wn
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K
    mask_m = rm[:, None] < M
    mask_n = rn[None, :] < N

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m & (rk[None, :] < K - k0), other=0.0)
        mask_w = (rk[:, None] < K - k0) & mask_n
        wg = tl.load(g_ptrs, mask=mask_w, other=0.0)
        wu = tl.load(g_ptrs + up_offset, mask=mask_w, other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_u = tl.dot(a, wu, acc_u, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += a_step
        g_ptrs += w_step

    if HAS_BIAS:
        bias_ptrs = bias_ptr + rn * stride_bias
        acc_g += tl.load(bias_ptrs, mask=rn < N, other=0.0).to(ACC_DTYPE)[None, :]
        acc_u += tl.load(bias_ptrs + tl.cast(N, tl.int64) * stride_bias, mask=rn < N,
                         other=0.0).to(ACC_DTYPE)[None, :]
    mask = mask_m & mask_n
    if STORE_PREACT:
        gu_offsets = rm[:, None] * (2 * N) + rn[None, :]
        tl.store(gu_ptr + gu_offsets, acc_g.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + gu_offsets + N, acc_u.to(gu_ptr.dtype.element_ty), mask=mask)
    h = apply_activation(acc_g, ACTIVATION, f64_arg(slope_hi, slope_lo, ACC_DTYPE)) * acc_u
    tl.store(h_ptr + rm[:, None] * N + rn[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_grad_kernel(
    dh_ptr, gu_ptr, dgu_ptr, partial_ptr,
    M, N,
    stride_dm, stride_dn,
    slope_hi, slope_lo,
    ACTIVATION: tl.constexpr, BIAS_PARTIALS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """[dg | du] (contiguous (M, 2N)) from dh (M, N) and gu = [g | u] (contiguous (M, 2N)) over
    one slab of ROWS_PER_PROGRAM rows; with BIAS_PARTIALS also the slab's column sums,
    partial[pid_m, c] for the 2N columns c, in ACC_DTYPE.
    """
    negative_slope = f64_arg(slope_hi, slope_lo, ACC_DTYPE)
    pid_m = tl.program_id(0)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn[None, :] < N
    sums_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    sums_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for m0 in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rm = pid_m.to(tl.int64) * ROWS_PER_PROGRAM + m0 + tl.arange(0, BLOCK_M)
        mask = (rm[:, None] < M) & mask_n
        # Masked elements load dh = 0, so they add nothing to the column sums.
        dh = tl.load(dh_ptr + rm[:, None] * stride_dm + rn[None, :] * stride_dn, mask=mask,
                     other=0.0).to(ACC_DTYPE)
        gu_offsets = rm[:, None] * (2 * N) + rn[None, :]
        g = tl.load(gu_ptr + gu_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        u = tl.load(gu_ptr + gu_offsets + N, mask=mask, other=0.0).to(ACC_DTYPE)
        if ACTIVATION == NONE:
            dg = dh * u
        else:
            dg = activation_backward(dh * u, g, ACTIVATION, False, negative_slope)
        du = dh * apply_activation(g, ACTIVATION, negative_slope)
        tl.store(dgu_ptr + gu_offsets, dg.to(dgu_ptr.dtype.element_ty), mask=mask)
        tl.store(dgu_ptr + gu_offsets + N, du.to(dgu_ptr.dtype.element_ty), mask=mask)
        if BIAS_PARTIALS:
            sums_g += dg
            sums_u += du
    if BIAS_PARTIALS:
        row = partial_ptr + pid_m.to(tl.int64) * (2 * N) + rn
        tl.store(row, tl.sum(sums_g, axis=0), mask=rn < N)
        tl.store(row + N, tl.sum(sums_u, axis=0), mask=rn < N)


def linear_glu_forward(input, weight, bias, activation: int, negative_slope: float,
                       save_preact: bool):
    """(h, gu): h = act(g) * u for [g | u] = input @ weight^T + bias, weight (2N, K), input
    (M, K) with any strides. h is contiguous (M, N); gu is (M, 2N) or empty when not saved."""
    M, K = input.shape
    N = weight.shape[0] // 2
    h = torch.empty((M, N), dtype=input.dtype, device=input.device)
    gu = (torch.empty((M, 2 * N), dtype=input.dtype, device=input.device) if save_preact
          else input.new_empty(0))
    if h.numel() == 0:
        return h, gu

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _glu_forward_kernel[grid](
        input, weight, h, h if bias is None else bias, gu if save_preact else h,
        M, N, K,
        triton.next_power_of_2(M), triton.next_power_of_2(N), triton.next_power_of_2(K),
        input.stride(0), input.stride(1), weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0),
        *split_f64(negative_slope),
        HAS_BIAS=bias is not None, ACTIVATION=activation, STORE_PREACT=save_preact,
        ACC_DTYPE=TL_DTYPES[acc_dtype(input.dtype)],
        INPUT_PRECISION=input_precision(input.dtype),
    )
    return h, gu


def linear_glu_grad_preact(grad_out, gu, activation: int, negative_slope: float,
                           has_bias: bool):
    """(dgu, grad_bias): dgu = [dh * u * act'(g) | dh * act(g)] (M, 2N) from grad_out (M, N)
    and gu = [g | u]; grad_bias = its column sums (2N), or empty without a bias."""
    M, N = grad_out.shape
    gu = gu.contiguous()
    dgu = grad_out.new_empty((M, 2 * N))
    grad_bias = grad_out.new_empty((2 * N,) if has_bias else (0,))
    if M == 0 or N == 0:
        return dgu, grad_bias.zero_()
    row_programs = triton.cdiv(M, _GRAD_ROWS_PER_PROGRAM)
    acc = acc_dtype(grad_out.dtype)
    # Without a bias the partial sums are not stored: dgu stands in for the pointer.
    partial = (torch.empty((row_programs, 2 * N), dtype=acc, device=grad_out.device)
               if has_bias else dgu)
    _glu_grad_kernel[(row_programs, triton.cdiv(N, _GRAD_BLOCK_N))](
        grad_out, gu, dgu, partial,
        M, N,
        grad_out.stride(0), grad_out.stride(1),
        *split_f64(negative_slope),
        ACTIVATION=activation, BIAS_PARTIALS=has_bias, ACC_DTYPE=TL_DTYPES[acc],
        ROWS_PER_PROGRAM=_GRAD_ROWS_PER_PROGRAM, BLOCK_M=_GRAD_BLOCK_M, BLOCK_N=_GRAD_BLOCK_N,
    )
    if has_bias:
        column_sums(partial, grad_bias, row_programs, 2 * N, acc)
    return dgu, grad_bias

