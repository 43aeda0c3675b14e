"""What several Triton families share: dtypes, float64 scalars as float32 pairs, tanh and
softcap, the GEMM tile order and configs, and the fixed-order column sum.

Not a family: every name here is meant to be imported by the family modules.
"""

import os
import struct

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting

NEG_INF = tl.constexpr(float("-inf"))
INF = tl.constexpr(float("inf"))
NAN = tl.constexpr(float("nan"))

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

# The column-sum kernel's tile: BLOCK_R partial rows by BLOCK_N columns at a time.
COLUMN_SUM_BLOCK_R = 16
COLUMN_SUM_BLOCK_N = 128


def acc_dtype(dtype):
    """The accumulation dtype of the kernels: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def input_precision(dtype):
    """The tl.dot precision.

    float32 uses TF32 only where torch allows it; torch's default is exact fp32. The setting
    has no effect on 16-bit operands, and float64 is always exact.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def split_f64(value):
    """A Python float as hi + lo, two float32 values (f64_arg adds them up in a kernel).

    Triton passes a Python float to a kernel as float32, which would round it for float64
    tensors. hi + lo carries about 48 bits, and in float32 it rounds back to hi.
    """
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


@triton.jit
def f64_arg(hi, lo, ACC_DTYPE: tl.constexpr):
    """A float argument in ACC_DTYPE, from the float32 pair of split_f64."""
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def tanh(z):
    """tanh(z) = sign(z) (1 - e) / (1 + e), with e = exp(-2|z|) in (0, 1], so nothing overflows.

    This is built from exp because tl.math has no tanh, and libdevice does not run under the
    interpreter. The absolute error is about 1 ulp of 1. Near
    0 the relative error grows, because 1 - e cancels.
    """
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def tanh_accurate(z):
    """tanh(z) within about 1.5 ulp in float32; tanh's exp form in float64.

    The exp form is accurate to about 1 ulp of 1, which near 0 is many ulps of tanh. Below
    |z| = 0.625 float32 takes Cephes' tanhf polynomial instead (under 0.8 ulp), so that
    softcap * tanh(x / softcap) keeps the precision of x for small logits.
    """
    if z.dtype == tl.float64:
        t = tanh(z)
    else:
        z2 = z * z
        poly = ((((z2 * -5.70498872745e-3 + 2.06390887954e-2) * z2 - 5.37397155531e-2) * z2
                 + 1.33314422036e-1) * z2 - 3.33332819422e-1)
        t = tl.where(tl.abs(z) < 0.625, z + z * z2 * poly, tanh(z))
    return t


@triton.jit
def capped(x, cap, SOFTCAP: tl.constexpr):
    """s = cap * tanh(x / cap) when SOFTCAP, else x."""
    if SOFTCAP:
        return tanh_accurate(x / cap) * cap
    else:
        return x


def gemm_configs(shapes, interpret_stages):
    """The autotuner's candidates from (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
    shapes; under the interpreter (CPU tensors) one small tile, which keeps it fast and
    skips autotuning."""
    if triton_interpreting():
        shapes = [(32, 32, 32, interpret_stages, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=warps, num_stages=stages)
        for bm, bn, bk, stages, warps in shapes
    ]


def first_contact(configs):
    """PYKERNELS_TRITON_AUTOTUNE=0 (scripts/gpu_run.sh's default): the first of the configs
    an autotuner's prune kept, nothing to benchmark; else all of them."""
    return configs[:1] if os.environ.get("PYKERNELS_TRITON_AUTOTUNE", "1") == "0" else configs


@triton.jit
def tile_rows_cols(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows, cols): the int64 indices of this program's (BLOCK_M, BLOCK_N) tile of an (M, N)
    product, in grouped order: GROUP_M row tiles in a row use each column tile of b while it
    is in L2. int64, so tensors past 2^31 elements stay addressable."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return (pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M),
            pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N))


@triton.jit
def column_sum_kernel(partial_ptr, out_ptr, R, N, ACC_DTYPE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = sum_r partial[r, n] for a contiguous (R, N) partial, rounded once to out's dtype.

    The summation order is fixed, so the result is deterministic.
    """
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(partial_ptr + rr[:, None].to(tl.int64) * N + rn[None, :],
                       mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    tl.store(out_ptr + rn, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=rn < N)


def column_sums(partial, out, rows, columns, acc):
    """out = the column sums of the first ``columns`` columns of ``partial`` (rows, columns),
    in the fixed order of column_sum_kernel; ``acc`` is the torch accumulation dtype."""
    column_sum_kernel[(triton.cdiv(columns, COLUMN_SUM_BLOCK_N),)](
        partial, out, rows, columns, ACC_DTYPE=TL_DTYPES[acc],
        BLOCK_R=COLUMN_SUM_BLOCK_R, BLOCK_N=COLUMN_SUM_BLOCK_N,
    )
