// Launchers of the fused linear + activation CUDA kernels (kernels/linear_act.cu, sm_80+).
// Framework-free: raw pointers, sizes, a dtype tag and a stream; every launcher checks
// its own launches and returns the first cudaError_t. All matrices are row-major and
// contiguous unless a stride says otherwise; sizes are int64 and offsets are computed
// in int64, so tensors past 2^31 elements are addressed correctly. Work is launched on
// `stream` only. Invalid arguments (unknown dtype/activation, negative sizes, a null
// pointer for a tensor that has elements) return cudaErrorInvalidValue; pointers of empty
// tensors may be null. M == 0 or N == 0 launches nothing (except the grad_bias zero-fill).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "common/activation.h"
#include "common/dtype.h"

namespace pykernels {
namespace cuda {

// The GEMM core follows the dtype: tensor cores (nvcuda::wmma, i.e. mma.sync, fp32
// accumulation) for float16/bfloat16; float32 takes the exact FMA path (no TF32), like
// torch's default.

// out = act(input @ weight^T + bias), with bias and activation applied to the fp32
// accumulator in the GEMM epilogue and out written once. When preact is non-null the
// pre-activation input @ weight^T + bias is stored there too (same dtype).
//   input  (M, K), rows input_row_stride apart, unit column stride
//   weight (N, K), contiguous
//   bias   (N) or nullptr; out, preact (M, N) contiguous; preact may be nullptr
// K == 0 gives out = act(bias) (act(0) without bias).
cudaError_t linear_act_forward(DType dtype, const void* input, int64_t input_row_stride,
                               const void* weight, const void* bias, void* out, void* preact,
                               int64_t M, int64_t N, int64_t K, Activation act,
                               float negative_slope, cudaStream_t stream);

// Bytes of scratch linear_act_grad_preact needs for the bias-gradient partial sums (fp32,
// one row of N per chunk of rows; 0 when M == 0 or N == 0). Only used when grad_bias is
// non-null; need not be zeroed.
size_t linear_act_grad_preact_workspace_bytes(int64_t M, int64_t N);

// One pass over (M, N): grad_preact = grad_out * act'(saved), where saved is the output
// (saved_is_output) or the pre-activation; and, when grad_bias is non-null, the fused
// column sums grad_bias[n] = sum_m grad_preact[m, n] of the fp32 values (before rounding),
// reduced in fp32 through workspace (deterministic: fixed partition, fixed order) and
// stored in dtype. With M == 0, grad_bias is filled with zeros. saved_is_output requires
// grad_from_output(act, slope) (else cudaErrorInvalidValue). workspace may be null when
// grad_bias is null.
cudaError_t linear_act_grad_preact(DType dtype, const void* grad_out, const void* saved,
                                   bool saved_is_output, void* grad_preact, void* grad_bias,
                                   void* workspace, int64_t M, int64_t N, Activation act,
                                   float negative_slope, cudaStream_t stream);

// c (M, N, contiguous) = a (M, K) @ b (K, N), fp32 accumulation, one rounding on store.
// Element (i, k) of a sits at a[i * a_row_stride + k * a_col_stride], likewise for b, so
// transposed operands need no copy: the backward calls it for
//   grad_input  = grad_preact (M, N) @ weight (N, K)
//   grad_weight = grad_preact^T (N, M) @ input (M, K).
cudaError_t gemm(DType dtype, const void* a, int64_t a_row_stride, int64_t a_col_stride,
                 const void* b, int64_t b_row_stride, int64_t b_col_stride, void* c, int64_t M,
                 int64_t N, int64_t K, cudaStream_t stream);

// The gated linear unit, on the forward GEMM above: weight (2N, K, contiguous) = [Wg; Wu],
// bias (2N) = [bg; bu] or nullptr, and
//   out (M, N) = act(input @ Wg^T + bg) * (input @ Wu^T + bu),
// each block tile holding the gate and the up accumulators of the same 64 output columns
// (kernels/linear_act.cu, gemm_mainloop), gated in the epilogue; out is the only (M, N)-sized
// store unless preact (M, 2N, contiguous) is non-null, which then gets [g | u] (biases added).
cudaError_t linear_glu_forward(DType dtype, const void* input, int64_t input_row_stride,
                               const void* weight, const void* bias, void* out, void* preact,
                               int64_t M, int64_t N, int64_t K, Activation act,
                               float negative_slope, cudaStream_t stream);

// The GLU backward pass over (M, N): from grad_out dh (M, N) and the saved gu = [g | u]
// (M, 2N), dgu (M, 2N) = [dh * u * act'(g) | dh * act(g)], and when grad_bias (2N) is
// non-null its column sums, deterministic as in linear_act_grad_preact (workspace of
// linear_act_grad_preact_workspace_bytes(M, 2N)). The caller then runs gemm for
// grad_input = dgu @ weight and grad_weight = dgu^T @ input.
cudaError_t linear_glu_grad_preact(DType dtype, const void* grad_out, const void* gu,
                                   void* dgu, void* grad_bias, void* workspace, int64_t M,
                                   int64_t N, Activation act, float negative_slope,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace pykernels
