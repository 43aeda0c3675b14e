"""Fused linear + activation in Triton.

Forward:   z = x @ W^T + b,   y = act(z)
Backward:  dZ = dY * act'(S), S = y or z (see pykernels/ops/linear_act.py)
           dX = dZ @ W,   dW = dZ^T @ X,   db[n] = sum_m dZ[m, n]

Every product runs through one GEMM kernel, c = act(a @ b + bias), which takes arbitrary
strides for every operand, so W^T, dZ^T and strided inputs need no copy. The activation math
mirrors kernels/common/activation.h, which the CUDA and C++ CPU backends share.

How the backward gets dZ: a fused elementwise kernel writes dZ once, and the two GEMMs read
it. The alternative was to recompute dY * act'(S) as an A-operand prologue in each GEMM. For
E bytes per element, the prologue reads dY and S in both GEMMs (4 MN E of compulsory
traffic). The separate pass reads them once, writes dZ, and reads dZ twice (5 MN E). That
extra MN E is small next to the GEMMs' 4MNK flops. But a GEMM loads each A tile again for
every output tile along the other dimension (K / BLOCK_N times). So the prologue would
evaluate act' (erf, exp) that many times per element, inside the main loop, on CUDA cores
that are about 15x slower than the tensor cores. It would also double the A-operand traffic
and send A through registers. By a rough count, for gelu with K = 4096 that costs about as
much as the GEMM itself.

The dZ kernel also emits the bias gradient: each program writes fp32 column sums of its
rows, and a second kernel adds them up in a fixed order, so the result is deterministic and
needs no atomics. The CUDA backend uses the same design and the same rounding of dZ to the
dtype.
"""

import torch
import triton
import triton.language as tl

from ..activations import ACTIVATION_IDS
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

# The dZ kernel: each program covers ROWS_PER_PROGRAM rows by BLOCK_N columns, BLOCK_M rows
# at a time, and writes one row of fp32 bias partial sums.
_ACT_GRAD_BLOCK_M = 32
_ACT_GRAD_BLOCK_N = 128
_ACT_GRAD_ROWS_PER_PROGRAM = 256


# H100 candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), most preferred
# first; _fitting_configs drops those a dtype cannot use. Registers and spills of each
# are in CI's table (scripts/triton_aot.py). On sm_90, 128x256 and 256x128 spill 30-900
# bytes in 16-bit, only with an activation epilogue (none without one), which runs once
# per output tile after the main loop: kept as the large tiles that keep the tensor
# cores busiest; a 128x128x32 4-warp tile spilled the same way and is gone (128x128x64
# with 8 warps holds the same tile without spilling).
_GEMM_SHAPES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 32, 32, 4, 4),
]


# Exact float32 (input_precision "ieee") multiplies on CUDA cores, with the accumulator in
# registers: at 128 fp32 values per thread the GEMM spilled kilobytes, at 64 with Triton 3.6
# 4-20 bytes, at 32 nothing (CI's table).
_IEEE_MAX_ACC_PER_THREAD = 32


def _fitting_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: the configs this GEMM can run on this device.

    Drops those whose pipelined tiles (num_stages copies of the BLOCK_M x BLOCK_K and
    BLOCK_K x BLOCK_N operand tiles, an upper bound on Triton's shared memory here) exceed
    the device's shared memory per block, and, for exact float32, those with too many
    accumulators per thread. With PYKERNELS_TRITON_AUTOTUNE=0 only the first that remains
    runs: one known-good config per dtype, nothing to autotune (a first contact with a GPU).
    """
    a = named_args["a_ptr"]
    limit = torch.cuda.get_device_properties(a.device).shared_memory_per_block_optin
    exact_fp32 = a.dtype == torch.float32 and kwargs["INPUT_PRECISION"] == "ieee"

    def fits(c):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if exact_fp32 and m * n > _IEEE_MAX_ACC_PER_THREAD * 32 * c.num_warps:
            return False
        return c.num_stages * (m + n) * k * a.element_size() <= limit

    return first_contact([c for c in configs if fits(c)] or configs[-1:])


@triton.autotune(configs=gemm_configs(_GEMM_SHAPES, interpret_stages=3),
                 key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _fitting_configs})
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, preact_ptr,
    M, N, K,
    M_BUCKET, N_BUCKET, K_BUCKET,  # only the autotune key: the sizes rounded up to powers of 2
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
    slope_hi, slope_lo,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c = act(a @ b + bias), for a (M, K), b (K, N), bias (N), and c, preact (M, N).

    All strides are arbitrary; preact has c's strides. The kernel accumulates in ACC_DTYPE
    (float32, or float64 for float64 inputs). It adds the bias to the accumulator and, when
    STORE_PREACT, stores that pre-activation. It then applies the activation and rounds once
    to c's dtype. The forward runs it on (x, W^T). The backward runs it on (dZ, W) and
    (dZ^T, X), with no bias and no activation.
    """
    rm, rn = tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :] * stride_bn
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    mask_m = rm[:, None] < M
    mask_n = rn[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & mask_n, other=0.0)
        # out_dtype explicit: Triton 3.6's tl.dot asserts a float64 accumulator against its
        # float32 default (the interpreter's float64 gradcheck).
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += a_step
        b_ptrs += b_step

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn * stride_bias, mask=rn < N, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    c_offsets = rm[:, None] * stride_cm + rn[None, :] * stride_cn
    mask = mask_m & mask_n
    if STORE_PREACT:
        tl.store(preact_ptr + c_offsets, acc.to(preact_ptr.dtype.element_ty), mask=mask)
    y = apply_activation(acc, ACTIVATION, f64_arg(slope_hi, slope_lo, ACC_DTYPE))
    tl.store(c_ptr + c_offsets, y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_grad_kernel(
    grad_out_ptr, saved_ptr, dz_ptr, partial_ptr,
    M, N,
    stride_gm, stride_gn, stride_sm, stride_sn,
    slope_hi, slope_lo,
    ACTIVATION: tl.constexpr, SAVED_IS_OUTPUT: tl.constexpr, STORE_DZ: tl.constexpr,
    BIAS_PARTIALS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dZ = dY * act'(S) over one slab of ROWS_PER_PROGRAM rows by BLOCK_N columns.

    dZ is computed in ACC_DTYPE. When STORE_DZ, it is stored to dz (contiguous (M, N)) in
    dz's dtype. When BIAS_PARTIALS, the program writes the slab's column sums,
    partial[pid_m, n] = sum over the slab's rows m of dZ[m, n], in ACC_DTYPE.
    """
    negative_slope = f64_arg(slope_hi, slope_lo, ACC_DTYPE)
    pid_m = tl.program_id(0)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn[None, :] < N
    col_sums = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for m0 in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rm = pid_m.to(tl.int64) * ROWS_PER_PROGRAM + m0 + tl.arange(0, BLOCK_M)
        mask = (rm[:, None] < M) & mask_n
        # Masked elements load dY = 0, so they add nothing to the column sums.
        dz = tl.load(grad_out_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                     mask=mask, other=0.0).to(ACC_DTYPE)
        if ACTIVATION != NONE:
            s = tl.load(saved_ptr + rm[:, None] * stride_sm + rn[None, :] * stride_sn,
                        mask=mask, other=0.0).to(ACC_DTYPE)
            dz = activation_backward(dz, s, ACTIVATION, SAVED_IS_OUTPUT, negative_slope)
        if STORE_DZ:
            tl.store(dz_ptr + rm[:, None] * N + rn[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=mask)
        if BIAS_PARTIALS:
            col_sums += dz
    if BIAS_PARTIALS:
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(col_sums, axis=0),
                 mask=rn < N)


def _gemm(a, b, out, bias=None, activation=0, negative_slope=0.0, preact=None):
    """out = act(a @ b + bias), with a (M, K) and b (K, N) any strided views.

    It also stores the pre-activation into preact, which must be shaped and strided like out.
    """
    M, K = a.shape
    N = b.shape[1]
    if out.numel() == 0:
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _gemm_kernel[grid](
        a, b, out, out if bias is None else bias, out if preact is None else preact,
        M, N, K,
        triton.next_power_of_2(M), triton.next_power_of_2(N), triton.next_power_of_2(K),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        0 if bias is None else bias.stride(0),
        *split_f64(negative_slope),
        HAS_BIAS=bias is not None, ACTIVATION=activation, STORE_PREACT=preact is not None,
        ACC_DTYPE=TL_DTYPES[acc_dtype(a.dtype)], INPUT_PRECISION=input_precision(a.dtype),
    )


def linear_act_forward(input, weight, bias, activation: int, negative_slope: float,
                       save_preact: bool):
    """out = act(input @ weight^T + bias), plus the pre-activation if save_preact.

    input is (M, K) and weight is (N, K), both with any strides; bias is (N) or None. out is
    contiguous (M, N) in input's dtype. preact is (M, N), or empty when not saved.
    """
    M = input.shape[0]
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=input.dtype, device=input.device)
    preact = (torch.empty((M, N), dtype=input.dtype, device=input.device) if save_preact
              else input.new_empty(0))
    _gemm(input, weight.t(), out, bias=bias, activation=activation,
          negative_slope=negative_slope, preact=preact if save_preact else None)
    return out, preact


def linear_act_backward(grad_out, input, weight, saved, activation: int, negative_slope: float,
                        saved_is_output: bool, has_bias: bool, need_input_grad: bool,
                        need_weight_grad: bool):
    """Gradients of out = act(input @ weight^T + bias).

    Takes grad_out (M, N), and saved (M, N), which is y if saved_is_output and z otherwise.
        dZ          = grad_out * act'(saved)
        grad_input  = dZ @ weight            (M, K)
        grad_weight = dZ^T @ input           (N, K)
        grad_bias   = sum_m dZ[m, :]         (N)
    Any gradient that is not needed comes back as an empty tensor.
    """
    M, K = input.shape
    N = weight.shape[0]

    def maybe_empty(shape, needed, like):
        # A fresh tensor per output: the outputs of a custom op must not alias each other.
        return like.new_empty(shape if needed else (0,))

    grad_input = maybe_empty((M, K), need_input_grad, input)
    grad_weight = maybe_empty((N, K), need_weight_grad, weight)
    grad_bias = maybe_empty((N,), has_bias, weight)
    if M == 0:
        return grad_input, grad_weight.zero_(), grad_bias.zero_()

    # Without an activation, dZ is grad_out itself: the GEMMs read it in place. Tensors a
    # launch never reads (saved without an activation, partial without a bias) get a
    # non-empty stand-in, so no launch receives an empty tensor's pointer.
    has_act = activation != ACTIVATION_IDS["none"]
    saved = saved if has_act else grad_out
    store_dz = has_act and (need_input_grad or need_weight_grad)
    dz = torch.empty((M, N), dtype=input.dtype, device=input.device) if store_dz else grad_out
    if (store_dz or has_bias) and N > 0:
        row_programs = triton.cdiv(M, _ACT_GRAD_ROWS_PER_PROGRAM)
        acc = acc_dtype(input.dtype)
        partial = (torch.empty((row_programs, N), dtype=acc, device=input.device)
                   if has_bias else grad_out)
        _act_grad_kernel[(row_programs, triton.cdiv(N, _ACT_GRAD_BLOCK_N))](
            grad_out, saved, dz, partial,
            M, N,
            grad_out.stride(0), grad_out.stride(1), saved.stride(0), saved.stride(1),
            *split_f64(negative_slope),
            ACTIVATION=activation, SAVED_IS_OUTPUT=saved_is_output, STORE_DZ=store_dz,
            BIAS_PARTIALS=has_bias, ACC_DTYPE=TL_DTYPES[acc],
            ROWS_PER_PROGRAM=_ACT_GRAD_ROWS_PER_PROGRAM, BLOCK_M=_ACT_GRAD_BLOCK_M,
            BLOCK_N=_ACT_GRAD_BLOCK_N,
        )
        if has_bias:
            column_sums(partial, grad_bias, row_programs, N, acc)
    if need_input_grad:
        _gemm(dz, weight, grad_input)
    if need_weight_grad:
        _gemm(dz.t(), input, grad_weight)
    return grad_input, grad_weight, grad_bias
